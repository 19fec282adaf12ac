"""The plug-in contract, checked by property tests for every registered allocator.

The names are collected at import time from ``list_allocators()``, so allocators other
modules register (``arr_coc``, ``arr_coc_adapter``) are covered automatically.

Permutation: "permuting the candidates permutes the choice" holds for methods that look
only at token content (they declare ``permutation_equivariant = True``): permute the patch
tokens (grid, prefix and query unchanged) and the chosen set is the permuted set. It does
not hold for spatial methods (``pool``, ``tome``'s alternating split, ``visionzip``'s
uniformly spaced contextual targets, pyramid-based methods whose pooled candidates change
when patches move), nor for ``random``. For ``pool`` the right statement is the opposite
one, checked here: its choice of indices does not depend on the content at all.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arr_coc.allocators import create_allocator, list_allocators
from arr_coc.pyramid import pyramid_positions, raster_key

NAMES = list_allocators()
STOCHASTIC = {"random"}  # results depend on a random draw, not only on the input
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

# non-default configurations that change the code path, checked against the same contract
VARIANTS = {
    "pool[mode=pyramid]": ("pool", {"mode": "pyramid"}),
    "visionzip[merge=mean]": ("visionzip", {"merge": "mean"}),
    "cdpruner[theta=0.5]": ("cdpruner", {"theta": 0.5}),
    "cdpruner[negate_relevance]": ("cdpruner", {"negate_relevance": True}),
    "cls_attention[num_heads=2]": ("cls_attention", {"num_heads": 2}),
    "fastv_like[num_heads=2]": ("fastv_like", {"num_heads": 2}),
}

_ALLOCATORS: dict[str, torch.nn.Module] = {}


def get(name: str) -> torch.nn.Module:
    """One instance per name or variant (a bare name must build with no arguments)."""
    if name not in _ALLOCATORS:
        base, cfg = VARIANTS.get(name, (name, {}))
        _ALLOCATORS[name] = create_allocator(base, **cfg).eval()
    return _ALLOCATORS[name]


@st.composite
def cases(draw, dtypes=DTYPES):
    b = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    n = h * w
    p = draw(st.integers(0, 2))
    d = draw(st.sampled_from([2, 4, 8]))
    t = draw(st.integers(1, 3))
    budget = draw(st.lists(st.integers(0, n + 2), min_size=b, max_size=b))
    query_kind = draw(st.sampled_from(["none", "full", "masked"]))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, p + n, d, generator=g).to(dtype)
    query = query_mask = None
    if query_kind != "none":
        query = torch.randn(b, t, d, generator=g).to(dtype)
        if query_kind == "masked":
            query_mask = torch.rand(b, t, generator=g) < 0.5  # rows may be all padding
    return dict(tokens=tokens, query=query, query_mask=query_mask, budget=torch.tensor(budget),
                grid=(h, w), num_prefix_tokens=p)


def run(name: str, case: dict):
    alloc = get(name)
    with torch.no_grad():
        out = alloc(case["tokens"], query=case["query"], query_mask=case["query_mask"], budget=case["budget"],
                    grid=case["grid"], num_prefix_tokens=case["num_prefix_tokens"])
    return alloc, out


def check_contract(name: str, case: dict) -> None:
    alloc, out = run(name, case)
    tokens, budget, grid = case["tokens"], case["budget"], case["grid"]
    b, _, d = tokens.shape
    n = grid[0] * grid[1]
    positions_all, _ = pyramid_positions(grid, tuple(alloc.pyramid_levels))
    m = positions_all.shape[0]
    k = out.indices.shape[1]
    assert out.indices.shape == (b, k) and out.mask.shape == (b, k)
    assert out.positions.shape == (b, k, 3) and out.tokens.shape == (b, k, d)
    assert out.mask.dtype == torch.bool and out.indices.dtype == torch.long
    counts = out.mask.sum(1)
    want = budget.clamp(max=n)
    if getattr(alloc, "ignores_budget", False):  # `full`: every token at every budget
        want = torch.full_like(budget, n)
        budget = want
    assert (counts <= want).all(), (name, counts, budget)
    if alloc.fixed_budget:
        assert torch.equal(counts, want), (name, counts, budget)
    assert k == int(counts.max()) if b else True  # padded to the batch's longest row, no more
    for row in range(b):
        c = int(counts[row])
        # mask: real entries first, then padding
        assert out.mask[row, :c].all() and not out.mask[row, c:].any()
        idx = out.indices[row, :c]
        assert (out.indices[row, c:] == -1).all() and (out.positions[row, c:] == -1).all()
        assert (out.tokens[row, c:] == 0).all()
        assert ((idx >= 0) & (idx < m)).all(), (name, idx, m)
        assert idx.unique().numel() == c, (name, idx)
        assert torch.equal(out.positions[row, :c], positions_all[idx])
        key = raster_key(out.positions[row, :c], grid)
        assert (key[1:] > key[:-1]).all(), (name, out.positions[row, :c])
        assert torch.isfinite(out.tokens[row].float()).all(), name
        if int(budget[row]) >= n:  # everything, unchanged
            assert torch.equal(idx, torch.arange(n))
            assert torch.equal(out.tokens[row, :n], tokens[row, case["num_prefix_tokens"]:])
        if int(budget[row]) == 0:
            assert c == 0
    if out.gain is not None:
        assert out.gain.shape == (b,) and torch.isfinite(out.gain.float()).all()


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, **SETTINGS)
@given(case=cases())
def test_contract_properties(name, case):
    check_contract(name, case)


@pytest.mark.parametrize("name", [v for v, (base, _) in VARIANTS.items() if base in NAMES])
@settings(max_examples=10, **SETTINGS)
@given(case=cases())
def test_contract_properties_of_variants(name, case):
    check_contract(name, case)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_half_precision_no_nan_at_realistic_size(name, dtype):
    """fp16 / bf16 tokens of realistic magnitude (norm ~ 30 in D = 64) give finite outputs."""
    g = torch.Generator().manual_seed(1)
    tokens = (4 * torch.randn(2, 1 + 64, 64, generator=g)).to(dtype)
    query = (4 * torch.randn(2, 5, 64, generator=g)).to(dtype)
    case = dict(tokens=tokens, query=query, query_mask=torch.tensor([[1, 1, 1, 0, 0], [0] * 5]).bool(),
                budget=torch.tensor([16, 7]), grid=(8, 8), num_prefix_tokens=1)
    check_contract(name, case)


@pytest.mark.parametrize("name", sorted(set(NAMES) - STOCHASTIC))
@settings(max_examples=10, **SETTINGS)
@given(case=cases(dtypes=[torch.float32]))
def test_rows_do_not_depend_on_batch_mates(name, case):
    """Row b of a ragged batch is what the allocator returns for example b alone."""
    _, out = run(name, case)
    for row in range(case["tokens"].shape[0]):
        single = {k: (v[row:row + 1] if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
        _, one = run(name, single)
        c = int(out.mask[row].sum())
        assert one.indices.shape[1] == c
        assert torch.equal(out.indices[row, :c], one.indices[0]), (name, row)
        torch.testing.assert_close(out.tokens[row, :c], one.tokens[0], rtol=1e-5, atol=1e-5)


def _equivariant() -> list[str]:
    return [n for n in NAMES if getattr(type(get(n)), "permutation_equivariant", False)]


@pytest.mark.parametrize("name", _equivariant())
@settings(max_examples=15, **SETTINGS)
@given(case=cases(dtypes=[torch.float32]), perm_seed=st.integers(0, 2**16))
def test_permuting_candidates_permutes_the_choice(name, case, perm_seed):
    p = case["num_prefix_tokens"]
    n = case["grid"][0] * case["grid"][1]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))
    permuted = dict(case)
    permuted["tokens"] = torch.cat([case["tokens"][:, :p], case["tokens"][:, p:][:, perm]], dim=1)
    _, out = run(name, case)
    _, out_p = run(name, permuted)
    for row in range(case["tokens"].shape[0]):
        chosen = set(out.indices[row][out.mask[row]].tolist())
        chosen_p = {int(perm[i]) for i in out_p.indices[row][out_p.mask[row]].tolist()}
        assert chosen == chosen_p, (name, row)


@pytest.mark.parametrize("name", ["pool"])
@settings(max_examples=15, **SETTINGS)
@given(case=cases(dtypes=[torch.float32]), perm_seed=st.integers(0, 2**16))
def test_spatial_choice_ignores_content(name, case, perm_seed):
    """Pool is spatial: moving the content around leaves the chosen indices unchanged."""
    p = case["num_prefix_tokens"]
    n = case["grid"][0] * case["grid"][1]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))
    permuted = dict(case)
    permuted["tokens"] = torch.cat([case["tokens"][:, :p], case["tokens"][:, p:][:, perm]], dim=1)
    _, out = run(name, case)
    _, out_p = run(name, permuted)
    assert torch.equal(out.indices, out_p.indices)


def test_the_published_baselines_are_registered():
    expected = {"full", "random", "pool", "cls_attention", "visionzip", "tome", "divprune", "cdpruner", "fastv_like"}
    assert expected <= set(NAMES)


# ---------------------------------------------------------------------------- bad input
def _good():
    return dict(tokens=torch.randn(2, 1 + 16, 8), grid=(4, 4), num_prefix_tokens=1, budget=4)


def _call(name, tokens, **kw):
    return get(name)(tokens, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_raises_value_error(name):
    g = _good()
    tok = g.pop("tokens")
    with pytest.raises(ValueError, match="patch_tokens"):
        _call(name, tok[0], **g)  # rank 2
    with pytest.raises(ValueError, match="patch_tokens"):
        _call(name, tok[None], **g)  # rank 4
    with pytest.raises(ValueError, match="grid"):
        _call(name, tok, **{**g, "grid": (3, 5)})
    with pytest.raises(ValueError, match="grid"):
        _call(name, tok, **{**g, "num_prefix_tokens": 0})  # 17 tokens, 4 x 4 grid
    with pytest.raises(ValueError, match="budget"):
        _call(name, tok, **{**g, "budget": -1})
    with pytest.raises(ValueError, match="budget"):
        _call(name, tok, **{**g, "budget": torch.tensor([3, -2])})
    bad = tok.clone()
    bad[1, 5, 2] = float("nan")
    with pytest.raises(ValueError, match="patch_tokens"):
        _call(name, bad, **g)
    bad[1, 5, 2] = float("inf")
    with pytest.raises(ValueError, match="patch_tokens"):
        _call(name, bad, **g)
    with pytest.raises(ValueError, match="query"):
        _call(name, tok, query=torch.randn(2, 8), **g)  # rank 2 query
    q = torch.randn(2, 3, 8)
    q[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="query"):
        _call(name, tok, query=q, **g)
    with pytest.raises(ValueError, match="query_mask"):
        _call(name, tok, query=torch.randn(2, 3, 8), query_mask=torch.ones(2, 4, dtype=torch.bool), **g)
