"""Exact greedy conditional-MI allocation: values against brute-force log-dets, behaviour, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from arr_coc.attending import gaussian_set_mi, greedy_conditional_mi, kernel_matrix


# ---------------------------------------------------------------------- brute force
def _sigma(c, q, kernel, jitter):
    """Joint covariance of [candidates; query] for one example: kernel + jitter I."""
    x = torch.cat([c, q])[None]
    if kernel == "cosine":
        k = kernel_matrix(x, kernel="cosine")[0]
    else:
        # bandwidth from the candidates only, as the greedy does
        centred = c - c.mean(0)
        ell = centred.pow(2).sum(-1).mean().sqrt()
        d2 = torch.cdist(x[0], x[0]).pow(2)
        k = torch.exp(-0.5 * d2 / ell**2)
    return k + jitter * torch.eye(k.shape[0], dtype=k.dtype)


def _logdet(sig, idx):
    if len(idx) == 0:
        return 0.0
    sub = sig[idx][:, idx]
    return torch.linalg.slogdet(sub)[1].item()


def _cond_var(sig, j, given):
    return math.exp(_logdet(sig, given + [j]) - _logdet(sig, given))


def _brute_cmi(sig, j, s, qidx):
    """I(c_j ; Q | c_S) from log-dets."""
    return 0.5 * math.log(_cond_var(sig, j, s) / _cond_var(sig, j, s + qidx))


def _set_mi(sig, s, qidx):
    """I(c_S ; Q) = 1/2 (log det S + log det Q - log det (S, Q))."""
    return 0.5 * (_logdet(sig, s) + _logdet(sig, qidx) - _logdet(sig, s + qidx))


@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
@pytest.mark.parametrize("t", [1, 3])
def test_gains_equal_brute_force_logdet(kernel, t):
    b, m, r, k = 3, 9, 16, 6
    jitter = 1e-3
    c = torch.randn(b, m, r, dtype=torch.float64)
    q = torch.randn(b, t, r, dtype=torch.float64)
    res = greedy_conditional_mi(c, q, None, torch.full((b,), k), alpha=1.0, kernel=kernel, jitter=jitter, var_floor=1e-12)
    assert res.indices.shape == (b, k)
    for i in range(b):
        sig = _sigma(c[i], q[i], kernel, jitter)
        qidx = list(range(m, m + t))
        s = []
        for step in range(k):
            brute = {j: _brute_cmi(sig, j, s, qidx) for j in range(m) if j not in s}
            j_star = max(brute, key=brute.get)
            assert res.indices[i, step].item() == j_star
            assert res.gains[i, step].item() == pytest.approx(brute[j_star], abs=1e-6)
            assert res.query_gains[i, step].item() == pytest.approx(brute[j_star], abs=1e-6)
            s.append(j_star)
        # chain rule: the per-step gains sum to the log-det MI of the chosen set
        assert res.total[i].item() == pytest.approx(_set_mi(sig, s, qidx), abs=1e-6)
    # the differentiable closed form agrees
    closed = gaussian_set_mi(c, q, res.indices, kernel=kernel, jitter=jitter)
    torch.testing.assert_close(closed, res.total, atol=1e-6, rtol=0)


def _samples_with_covariance(sig, n):
    """n samples whose sample covariance is exactly sig (centred orthonormal columns times a Cholesky factor)."""
    d = sig.shape[0]
    a = torch.randn(n, d, dtype=torch.float64)
    q, _ = torch.linalg.qr(a - a.mean(0))
    return math.sqrt(n - 1) * q @ torch.linalg.cholesky(sig).T


def test_total_matches_arr_coc_info_gaussian_mi():
    """Oracle: arr_coc.info.gaussian_mi on samples whose covariance is exactly the model's."""
    info = pytest.importorskip("arr_coc.info")
    gm = getattr(info, "gaussian_mi", None)
    if gm is None:
        pytest.skip("arr_coc.info.gaussian_mi not available")
    b, m, r, t, k = 2, 8, 12, 2, 4
    c = torch.randn(b, m, r, dtype=torch.float64)
    q = torch.randn(b, t, r, dtype=torch.float64)
    for kernel in ("cosine", "rbf"):
        res = greedy_conditional_mi(c, q, None, k, alpha=1.0, kernel=kernel, jitter=1e-3, var_floor=1e-12)
        for i in range(b):
            sig = _sigma(c[i], q[i], kernel, 1e-3)
            sel = res.indices[i].tolist() + list(range(m, m + t))
            x = _samples_with_covariance(sig[sel][:, sel], 64)
            ref = gm(x[:, :k], x[:, k:])
            assert float(ref) == pytest.approx(res.total[i].item(), abs=1e-6)


def test_coverage_gain_is_rate_distortion_of_residual():
    b, m, r = 2, 7, 10
    c = torch.randn(b, m, r, dtype=torch.float64)
    d, jitter = 0.05, 1e-3
    res = greedy_conditional_mi(c, None, None, 5, alpha=0.0, jitter=jitter, var_floor=1e-12, distortion=d)
    for i in range(b):
        sig = kernel_matrix(c[i : i + 1])[0] + jitter * torch.eye(m, dtype=torch.float64)
        s = []
        for step in range(5):
            var = {j: _cond_var(sig, j, s) for j in range(m) if j not in s}
            j_star = res.indices[i, step].item()
            # alpha = 0: largest residual variance (max volume); ties allowed at step 0
            assert var[j_star] >= max(var.values()) - 1e-9
            assert res.coverage_gains[i, step].item() == pytest.approx(max(0.0, 0.5 * math.log(var[j_star] / d)), abs=1e-9)
            s.append(j_star)
    assert torch.all(res.total == 0)  # no query: no query information


# ---------------------------------------------------------------------- behaviour
def test_candidate_equal_to_query_is_picked_first():
    b, m, r = 4, 50, 32
    c = torch.randn(b, m, r)
    target = torch.tensor([3, 17, 0, 49])
    q = c[torch.arange(b), target][:, None] * 2.5  # same direction, other scale
    res = greedy_conditional_mi(c, q, None, 5, alpha=0.5)
    assert torch.equal(res.indices[:, 0], target)
    assert torch.isfinite(res.gains).all()


def test_duplicate_never_picked_while_positive_gain_remains():
    torch.manual_seed(1)
    b, m, r = 3, 20, 32
    c = torch.randn(b, m, r)
    q = c[:, :1] + 0.3 * torch.randn(b, 1, r)
    c = torch.cat([c, c[:, :1]], 1)  # candidate m duplicates candidate 0
    for alpha in (1.0, 0.7, 0.3):
        res = greedy_conditional_mi(c, q, None, m + 1, alpha=alpha, kernel="cosine")
        for i in range(b):
            picks = res.indices[i].tolist()
            gains = res.gains[i].tolist()
            assert 0 in picks[:3] or m in picks[:3]
            first = min(picks.index(0), picks.index(m))
            # after one copy is picked, the other appears only after every positive gain is spent
            later = max(picks.index(0), picks.index(m))
            assert all(g > 0 for g in gains[:later]) and gains[later] == 0
            assert first < later


def test_alpha_zero_is_diversity_driven():
    # three tight clusters; the query sits on cluster 0
    torch.manual_seed(2)
    r = 16
    centres = torch.eye(r)[:3] * 3
    pts = torch.cat([centres[i] + 0.05 * torch.randn(10, r) for i in range(3)])[None]
    q = centres[:1][None]
    div = greedy_conditional_mi(pts, q, None, 3, alpha=0.0, kernel="cosine")
    foc = greedy_conditional_mi(pts, q, None, 3, alpha=1.0, kernel="cosine")
    clusters_div = set((div.indices[0] // 10).tolist())
    assert clusters_div == {0, 1, 2}  # coverage: one per cluster
    assert (foc.indices[0, 0] // 10).item() == 0  # focus: the query's cluster first
    # the focused choice carries more information about the query
    assert foc.total[0] > div.total[0]


def test_price_stops_early_and_easy_query_spends_less():
    torch.manual_seed(3)
    b, m, r = 2, 64, 64
    basis = torch.linalg.qr(torch.randn(r, r))[0].T  # orthonormal rows
    c = basis[:m].expand(b, m, r).clone()
    easy = c[0, 5]  # one candidate carries it all
    hard = c[1, :12].sum(0)  # spread over twelve candidates
    q = torch.stack([easy, hard])[:, None]
    res = greedy_conditional_mi(c, q, None, 32, alpha=1.0, price=0.02)
    assert res.counts[0] < res.counts[1] <= 32
    assert res.counts[0] == 1 and res.indices[0, 0] == 5
    assert set(res.indices[1, :12].tolist()) == set(range(12))
    assert (res.gains[1, : res.counts[1]] >= 0.02).all()
    # no price: the budget is spent
    full = greedy_conditional_mi(c, q, None, 32, alpha=1.0, price=0.0)
    assert torch.equal(full.counts, torch.tensor([32, 32]))
    assert (full.indices >= 0).all()
    assert all(len(set(row.tolist())) == 32 for row in full.indices)


def test_per_example_budgets_and_padding():
    b, m, r, t = 3, 30, 8, 4
    c = torch.randn(b, m, r, dtype=torch.float64)
    q = torch.randn(b, t, r, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    res = greedy_conditional_mi(c, q, mask, torch.tensor([5, 0, 40]), alpha=0.8)
    assert res.indices.shape == (3, 30)
    assert res.counts.tolist() == [5, 0, 30]
    assert (res.indices[0, 5:] == -1).all() and (res.indices[1] == -1).all()
    assert sorted(res.indices[2].tolist()) == list(range(30))
    # padded tokens are ignored: same answer as the query truncated to its real tokens
    alone = greedy_conditional_mi(c[:1], q[:1, :2], None, 5, alpha=0.8)
    assert torch.equal(alone.indices[0], res.indices[0, :5])
    torch.testing.assert_close(alone.gains[0], res.gains[0, :5])
    # an all-padding query is coverage only: same picks as no query, zero query information
    nq = greedy_conditional_mi(c[1:2], None, None, 6, alpha=0.0)
    pad = greedy_conditional_mi(c[1:2], q[1:2], mask[1:2], 6, alpha=0.8)
    assert torch.equal(nq.indices, pad.indices)
    assert pad.total.item() == 0


def test_low_precision_inputs_and_rank_deficiency():
    b, m, r = 2, 40, 4  # rank 4 < budget: every candidate becomes redundant
    c = torch.randn(b, m, r)
    q = torch.randn(b, 3, r)
    for dt in (torch.float16, torch.bfloat16):
        res = greedy_conditional_mi(c.to(dt), q.to(dt), None, 12, alpha=0.5)
        assert torch.isfinite(res.gains).all() and torch.isfinite(res.total).all()
        assert (res.counts == 12).all()
        assert all(len(set(row.tolist())) == 12 for row in res.indices)
        # at most rank-many picks carry information
        assert ((res.gains > 0).sum(1) <= r + 1).all()


def test_batched_equals_one_by_one():
    b, m, r, t = 4, 25, 12, 3
    c = torch.randn(b, m, r, dtype=torch.float64)
    q = torch.randn(b, t, r, dtype=torch.float64)
    alpha = torch.tensor([0.0, 0.3, 0.9, 1.0], dtype=torch.float64)
    res = greedy_conditional_mi(c, q, None, torch.tensor([3, 7, 10, 2]), alpha=alpha, kernel="rbf")
    for i in range(b):
        one = greedy_conditional_mi(c[i : i + 1], q[i : i + 1], None, int(res.counts[i]), alpha=alpha[i].item(), kernel="rbf")
        n = int(res.counts[i])
        assert torch.equal(one.indices[0], res.indices[i, :n])
        torch.testing.assert_close(one.gains[0], res.gains[i, :n])


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cand_emb=torch.randn(5, 4)), "cand_emb"),
        (dict(query_emb=torch.randn(2, 3, 7)), "query_emb"),
        (dict(budget=torch.tensor([1, -1])), "budget"),
        (dict(budget=torch.tensor([1.0, 2.0])), "budget"),
        (dict(alpha=1.5), "alpha"),
        (dict(price=-0.1), "price"),
        (dict(kernel="linear"), "kernel"),
        (dict(jitter=0.0), "jitter"),
        (dict(var_floor=-1.0), "var_floor"),
        (dict(query_mask=torch.ones(2, 5, dtype=torch.bool)), "query_mask"),
        (dict(cand_emb=torch.full((2, 6, 8), float("nan"))), "cand_emb"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(cand_emb=torch.randn(2, 6, 8), query_emb=torch.randn(2, 3, 8), query_mask=None, budget=torch.tensor([2, 3]))
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in args}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        greedy_conditional_mi(args["cand_emb"], args["query_emb"], args["query_mask"], args["budget"], **extra)


def test_unit_vectors_make_cosine_and_linear_agree():
    # sanity of the kernel helper: cosine of unit vectors is their inner product
    x = F.normalize(torch.randn(1, 5, 6, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(kernel_matrix(x), x @ x.transpose(1, 2))


@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
def test_precomputed_kernel_and_kernel_columns_agree(kernel):
    c = torch.randn(3, 40, 16, dtype=torch.float64)
    q = torch.randn(3, 4, 16, dtype=torch.float64)
    a = greedy_conditional_mi(c, q, None, 12, alpha=0.6, kernel=kernel, precompute_kernel=True)
    b = greedy_conditional_mi(c, q, None, 12, alpha=0.6, kernel=kernel, precompute_kernel=False)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.gains, b.gains)


def test_given_gram_equals_computed_gram():
    c = torch.randn(2, 30, 8, dtype=torch.float64)
    q = torch.randn(2, 3, 8, dtype=torch.float64)
    ref = greedy_conditional_mi(c, q, None, 10, alpha=0.7, kernel="rbf")
    got = greedy_conditional_mi(c, q, None, 10, alpha=0.7, kernel="rbf", cand_gram=c @ c.transpose(1, 2))
    assert torch.equal(ref.indices, got.indices)
    torch.testing.assert_close(ref.gains, got.gains)
    with pytest.raises(ValueError, match="cand_gram"):
        greedy_conditional_mi(c, q, None, 10, cand_gram=torch.zeros(2, 30, 29, dtype=torch.float64))


def test_total_is_reported_whatever_alpha():
    c = torch.randn(2, 12, 16, dtype=torch.float64)
    q = torch.randn(2, 2, 16, dtype=torch.float64)
    for alpha in (0.0, 0.4):
        res = greedy_conditional_mi(c, q, None, 5, alpha=alpha, jitter=1e-3, var_floor=1e-12)
        closed = gaussian_set_mi(c, q, res.indices, jitter=1e-3)
        torch.testing.assert_close(res.total, closed, atol=1e-6, rtol=0)
        assert (res.total > 0).all()


def test_unary_prior_steers_the_picks_but_not_the_reported_information():
    g = torch.Generator().manual_seed(3)
    cand = torch.randn(2, 30, 8, generator=g, dtype=torch.float64)
    query = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    budget = torch.tensor([6, 6])
    base = greedy_conditional_mi(cand, query, None, budget, 0.5)
    zero = greedy_conditional_mi(cand, query, None, budget, 0.5, unary=torch.zeros(2, 30, dtype=torch.float64))
    assert torch.equal(base.indices, zero.indices) and torch.allclose(base.total, zero.total)
    # a large bonus on one candidate that the plain greedy does not pick first: it goes first
    target = next(j for j in range(30) if j not in base.indices[0, :1].tolist())
    unary = torch.zeros(2, 30, dtype=torch.float64)
    unary[0, target] = 100.0
    steered = greedy_conditional_mi(cand, query, None, budget, 0.5, unary=unary)
    assert steered.indices[0, 0].item() == target
    assert torch.equal(steered.indices[1], base.indices[1])  # the other row is untouched
    # the reported information is still the chain-rule I(c_S ; Q) of the chosen set
    exact = gaussian_set_mi(cand, query, steered.indices)
    assert torch.allclose(steered.total, exact, atol=1e-6)
    assert torch.allclose(steered.query_gains.sum(1), steered.total)
    with pytest.raises(ValueError, match="unary"):
        greedy_conditional_mi(cand, query, None, budget, 0.5, unary=-unary)
    with pytest.raises(ValueError, match="unary"):
        greedy_conditional_mi(cand, query, None, budget, 0.5, unary=unary[:, :5])


def test_fused_scorers_change_the_selection_and_check_their_names():
    from arr_coc.allocators import create_allocator

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 1 + 64, 16, generator=g)
    x[:, 1 + 10] *= 25.0  # one patch with a far larger norm (propositional) than the rest
    q = torch.randn(2, 4, 16, generator=g)
    plain = create_allocator("arr_coc").eval()(x, query=q, budget=5, grid=(8, 8), num_prefix_tokens=1)
    fused = create_allocator("arr_coc", fuse=("propositional",), fuse_weight=10.0).eval()(
        x, query=q, budget=5, grid=(8, 8), num_prefix_tokens=1
    )
    assert (fused.positions[..., :2] == torch.tensor([1, 2])).all(-1).any(-1).all()  # patch 10 = (1, 2)
    assert not torch.equal(plain.indices, fused.indices)
    with pytest.raises(ValueError, match="fuse"):
        create_allocator("arr_coc", fuse=("semantic",))
