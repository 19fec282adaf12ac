"""Each published baseline's defining behaviour, checked against independent reference code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arr_coc.allocators import create_allocator
from arr_coc.allocators.cdpruner import dpp_greedy_map
from arr_coc.allocators.divprune import max_min_diversity_greedy
from arr_coc.allocators.pool import pooled_grid
from arr_coc.allocators.tome import bipartite_merge_round
from arr_coc.pyramid import build_pyramid
from arr_coc.token_scores import (
    cls_attention_scores,
    content_tiebreak,
    cosine_similarity_matrix,
    feature_norm_scores,
    query_attention_scores,
    query_relevance,
    valid_query_rows,
)


def chosen(out, row=0):
    return set(out.indices[row][out.mask[row]].tolist())


def np_cos(x):
    xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return xn @ xn.T


def np_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------- token scores
def test_cls_attention_scores_match_a_reference_attention():
    g = torch.Generator().manual_seed(0)
    prefix, fine = torch.randn(2, 2, 8, generator=g), torch.randn(2, 10, 8, generator=g)
    p, x = prefix.double().numpy(), fine.double().numpy()
    # two heads of 4 dims each, two prefix tokens: average of the four softmaxes
    want = np.zeros((2, 10))
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        want += np_softmax(np.einsum("bqe,bne->bqn", p[..., sl], x[..., sl]) / 2.0).mean(1) / 2
    torch.testing.assert_close(cls_attention_scores(prefix.double(), fine.double(), num_heads=2), torch.from_numpy(want))
    # no prefix: the mean patch token asks
    want0 = np_softmax(np.einsum("bd,bnd->bn", x.mean(1), x) / math.sqrt(8))
    torch.testing.assert_close(cls_attention_scores(prefix[:, :0].double(), fine.double()), torch.from_numpy(want0))
    with pytest.raises(ValueError, match="num_heads"):
        cls_attention_scores(prefix, fine, num_heads=3)


def test_query_scores_respect_padding():
    g = torch.Generator().manual_seed(1)
    fine, query = torch.randn(2, 7, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    att = query_attention_scores(query, fine, mask)
    want = np_softmax(np.einsum("td,nd->tn", query[0, :2].numpy(), fine[0].numpy()) / 2.0).mean(0)
    np.testing.assert_allclose(att[0].numpy(), want, rtol=1e-5)
    torch.testing.assert_close(att[1], torch.full((7,), 1 / 7))  # all padding: uniform
    rel = query_relevance(query, fine, mask)
    np.testing.assert_allclose(rel[0].numpy(), np_cos(np.concatenate([fine[0], query[0, :2]]))[:7, 7:].mean(1), rtol=1e-5)
    assert torch.equal(rel[1], torch.zeros(7))
    changed = query.clone()
    changed[0, 2] = 100.0  # padded token: no effect
    torch.testing.assert_close(query_attention_scores(changed, fine, mask), att)
    assert valid_query_rows(query, mask).tolist() == [True, False]
    assert valid_query_rows(None, None) is None
    with pytest.raises(ValueError, match="query"):
        query_relevance(torch.randn(2, 3, 5), fine)


def test_similarity_and_norm_scores():
    x = torch.randn(2, 6, 5)
    x[1, 2] = 0.0
    s = cosine_similarity_matrix(x)
    assert torch.equal(s, s.transpose(1, 2))
    assert torch.equal(torch.diagonal(s, dim1=1, dim2=2), (x != 0).any(-1).float())
    np.testing.assert_allclose(s[0].numpy(), np_cos(x[0].numpy()), atol=1e-6)
    torch.testing.assert_close(feature_norm_scores(x), x.norm(dim=-1))
    perm = torch.randperm(6)
    torch.testing.assert_close(content_tiebreak(x[:, perm]), content_tiebreak(x)[:, perm])


# ---------------------------------------------------------------------------- cls_attention
def test_cls_attention_keeps_the_top_attended_patches():
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(3, 2 + 36, 16, generator=g)
    tokens[0, 2 + 7] = 3 * tokens[0, 0]  # a patch the CLS strongly attends to
    out = create_allocator("cls_attention")(tokens, budget=torch.tensor([5, 1, 9]), grid=(6, 6), num_prefix_tokens=2)
    scores = cls_attention_scores(tokens[:, :2], tokens[:, 2:])
    for row, k in enumerate([5, 1, 9]):
        assert chosen(out, row) == set(scores[row].topk(k).indices.tolist())
        torch.testing.assert_close(out.tokens[row, :k], tokens[row, 2:][out.indices[row, :k]])
    assert 7 in chosen(out, 0)


# ---------------------------------------------------------------------------- fastv_like
def test_fastv_like_ranks_by_query_attention_and_falls_back_without_a_query():
    g = torch.Generator().manual_seed(3)
    tokens, query = torch.randn(2, 1 + 25, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    mask = torch.tensor([[True, True, True, False], [False] * 4])
    fv, cls = create_allocator("fastv_like"), create_allocator("cls_attention")
    out = fv(tokens, query=query, query_mask=mask, budget=6, grid=(5, 5), num_prefix_tokens=1)
    att = query_attention_scores(query, tokens[:, 1:], mask)
    assert chosen(out, 0) == set(att[0].topk(6).indices.tolist())
    ref = cls(tokens, budget=6, grid=(5, 5), num_prefix_tokens=1)
    assert chosen(out, 1) == chosen(ref, 1)  # all-padding row: the CLS ranking
    none = fv(tokens, budget=6, grid=(5, 5), num_prefix_tokens=1)
    assert torch.equal(none.indices, ref.indices)
    with pytest.raises(ValueError, match="query"):
        fv(tokens, query=torch.randn(2, 4, 3), budget=6, grid=(5, 5), num_prefix_tokens=1)
    proj = torch.nn.Linear(3, 8)
    q3 = torch.randn(2, 4, 3, generator=g)
    with torch.no_grad():
        out3 = create_allocator("fastv_like", query_proj=proj)(tokens, query=q3, budget=6, grid=(5, 5), num_prefix_tokens=1)
        assert chosen(out3, 0) == set(query_attention_scores(proj(q3), tokens[:, 1:])[0].topk(6).indices.tolist())


# ---------------------------------------------------------------------------- divprune
@pytest.mark.parametrize("seed", range(4))
def test_divprune_is_the_greedy_max_min_selection(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 9, 3, generator=g, dtype=torch.float64)
    out = create_allocator("divprune")(x, budget=5, grid=(3, 3))
    d = 1 - np_cos(x[0].numpy())
    picks = out.extras["pick_order"][0].tolist()
    nn_dist = np.where(np.eye(9, dtype=bool), np.inf, d).min(1)
    assert picks[0] == int(np.argmax(nn_dist))
    for step in range(1, 5):
        rest = [i for i in range(9) if i not in picks[:step]]
        best = max(rest, key=lambda i: min(d[i, s] for s in picks[:step]))
        assert picks[step] == best, (step, picks)
    assert chosen(out) == set(picks)


def test_divprune_takes_one_token_per_cluster():
    g = torch.Generator().manual_seed(7)
    centres = torch.eye(4)[:3] * 10
    x = (centres.repeat_interleave(4, 0) + 0.1 * torch.randn(12, 4, generator=g))[None]
    out = create_allocator("divprune")(x, budget=3, grid=(3, 4))
    assert sorted(i // 4 for i in chosen(out)) == [0, 1, 2]
    picks, _ = max_min_diversity_greedy(1 - cosine_similarity_matrix(x), 3)
    assert set(picks[0].tolist()) == chosen(out)


# ---------------------------------------------------------------------------- cdpruner
def brute_force_logdet_greedy(kernel: np.ndarray, k: int) -> list[int]:
    picks: list[int] = []
    for _ in range(k):
        rest = [i for i in range(kernel.shape[0]) if i not in picks]
        picks.append(max(rest, key=lambda i: np.linalg.slogdet(kernel[np.ix_(picks + [i], picks + [i])])[1]))
    return picks


@pytest.mark.parametrize("seed", range(4))
def test_dpp_fast_greedy_equals_brute_force_log_det_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 8, 12, generator=g, dtype=torch.float64)
    kernel = feats @ feats.transpose(1, 2)
    picks, gains = dpp_greedy_map(kernel, 6)
    for b in range(2):
        want = brute_force_logdet_greedy(kernel[b].numpy(), 6)
        assert picks[b].tolist() == want
        sub = kernel[b].numpy()[np.ix_(want, want)]
        np.testing.assert_allclose(gains[b].sum().item(), np.linalg.slogdet(sub)[1], rtol=1e-9)


def test_cdpruner_matches_an_independent_reference():
    g = torch.Generator().manual_seed(11)
    tokens = torch.randn(2, 1 + 12, 16, generator=g, dtype=torch.float64)
    query = torch.randn(2, 3, 16, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    out = create_allocator("cdpruner")(tokens, query=query, query_mask=mask, budget=torch.tensor([5, 3]),
                                       grid=(3, 4), num_prefix_tokens=1)
    for b, k in enumerate([5, 3]):
        x, q = tokens[b, 1:].numpy(), query[b][mask[b]].numpy()
        rel = np_cos(np.concatenate([x, q]))[:12, 12:].mean(1)
        r = (rel - rel.min()) / (rel.max() - rel.min())
        kernel = r[:, None] * np_cos(x) * r[None, :]
        assert chosen(out, b) == set(brute_force_logdet_greedy(kernel, k))
        np.testing.assert_allclose(out.extras["quality"][b].numpy(), r, atol=1e-12)


def test_cdpruner_quality_fallbacks_and_theta():
    g = torch.Generator().manual_seed(12)
    tokens, query = torch.randn(2, 16, 8, generator=g), torch.randn(2, 2, 8, generator=g)
    a = create_allocator("cdpruner")
    out = a(tokens, budget=4, grid=(4, 4))
    assert torch.equal(out.extras["quality"], torch.ones(2, 16))  # no query: r = 1, a plain DPP
    out = a(tokens, query=query, query_mask=torch.tensor([[True, True], [False, False]]), budget=4, grid=(4, 4))
    assert torch.equal(out.extras["quality"][1], torch.ones(16))
    r = out.extras["quality"][0]
    assert r.min() == 0 and r.max() == 1
    out_t = create_allocator("cdpruner", theta=0.5)(tokens, query=query, budget=4, grid=(4, 4))
    torch.testing.assert_close(out_t.extras["quality"][0], torch.exp(0.5 * r))
    # the token most similar to the query is the first pick
    tokens[0, 9] = query[0].mean(0) * 5
    out = a(tokens, query=query, budget=4, grid=(4, 4))
    assert out.extras["pick_order"][0, 0].item() == 9
    with pytest.raises(ValueError, match="theta"):
        create_allocator("cdpruner", theta=1.0)


# ---------------------------------------------------------------------------- tome
def test_tome_preserves_the_size_weighted_sum_and_reaches_the_budget():
    g = torch.Generator().manual_seed(13)
    tokens = torch.randn(3, 1 + 48, 8, generator=g, dtype=torch.float64)
    budget = torch.tensor([5, 17, 0])
    out = create_allocator("tome")(tokens, budget=budget, grid=(6, 8), num_prefix_tokens=1)
    sizes = out.extras["sizes"]
    for b, k in enumerate([5, 17]):
        assert int(out.mask[b].sum()) == k
        assert sizes[b, :k].sum().item() == 48 and (sizes[b, :k] >= 1).all()
        total = (sizes[b, :k, None] * out.tokens[b, :k]).sum(0)
        torch.testing.assert_close(total, tokens[b, 1:].sum(0))  # weighted mean preserved
    assert int(out.mask[2].sum()) == 0


def test_tome_merges_duplicates_first():
    g = torch.Generator().manual_seed(14)
    base = torch.randn(6, 8, generator=g)
    tokens = base.repeat_interleave(2, 0)[None]  # A/B alternation pairs each token with its twin
    out = create_allocator("tome")(tokens, budget=6, grid=(3, 4))
    assert chosen(out) == {1, 3, 5, 7, 9, 11}  # each pair merged into its B member
    torch.testing.assert_close(out.tokens[0], base)
    assert torch.equal(out.extras["sizes"][0], torch.full((6,), 2.0))


def test_bipartite_round_matches_a_reference():
    g = torch.Generator().manual_seed(15)
    x = torch.randn(1, 7, 4, generator=g, dtype=torch.float64)
    new, size, alive = bipartite_merge_round(x, torch.ones(1, 7, dtype=torch.float64), torch.tensor([7]), torch.tensor([2]))
    xs = x[0].numpy()
    a, b = list(range(0, 7, 2)), list(range(1, 7, 2))
    s = np_cos(xs)
    best = {i: max(b, key=lambda j: s[i, j]) for i in a}
    merged = sorted(a, key=lambda i: -s[i, best[i]])[:2]
    want = {j: [j] for j in b}
    for i in merged:
        want[best[i]].append(i)
    assert sorted(np.nonzero(~alive[0].numpy())[0].tolist()) == sorted(merged)
    for j, group in want.items():
        np.testing.assert_allclose(new[0, j].numpy(), xs[group].mean(0), rtol=1e-12)
        assert size[0, j].item() == len(group)


# ---------------------------------------------------------------------------- visionzip
def test_visionzip_keeps_top_attention_tokens_and_merges_the_rest():
    g = torch.Generator().manual_seed(16)
    tokens = torch.randn(2, 1 + 100, 8, generator=g, dtype=torch.float64)
    vz = create_allocator("visionzip", merge="mean")
    assert [t.tolist() for t in vz.split_budget(torch.tensor([64, 128, 192, 1]))] == [[54, 108, 162, 1], [10, 20, 30, 0]]
    out = vz(tokens, budget=torch.tensor([64, 20]), grid=(10, 10), num_prefix_tokens=1)
    scores = cls_attention_scores(tokens[:, :1], tokens[:, 1:])
    for b, (kd, kc) in enumerate([(54, 10), (17, 3)]):
        dominant = set(scores[b].topk(kd).indices.tolist())
        assert set(out.extras["dominant"][b][:kd].tolist()) == dominant
        assert int(out.mask[b].sum()) == kd + kc
        rest = [i for i in range(100) if i not in dominant]
        step = len(rest) // kc
        targets = rest[::step][:kc]
        assert sorted(out.extras["contextual"][b][:kc].tolist()) == targets
        # every remaining patch joins its most similar target; the contextual token is the group mean
        x = tokens[b, 1:].numpy()
        s = np_cos(x)
        groups = {t: [t] for t in targets}
        for i in rest:
            if i not in targets:
                groups[max(targets, key=lambda t: s[i, t])].append(i)
        for pos in range(int(out.mask[b].sum())):
            i = int(out.indices[b, pos])
            want = x[groups[i]].mean(0) if i in groups else x[i]
            np.testing.assert_allclose(out.tokens[b, pos].numpy(), want, rtol=1e-10)
        assert out.extras["contextual_sizes"][b].sum().item() == len(rest)
    # the released code's merge (the default): target + mean of the other members of its group
    released = create_allocator("visionzip")(tokens, budget=20, grid=(10, 10), num_prefix_tokens=1)
    x = tokens[1, 1:].numpy()
    s = np_cos(x)
    dominant = set(out.extras["dominant"][1][:17].tolist())
    targets = [t for t in out.extras["contextual"][1].tolist() if t >= 0]
    assert len(targets) == 3
    for t in targets:
        members = [i for i in range(100) if i not in dominant and i not in targets
                   and max(targets, key=lambda u: s[i, u]) == t]
        pos = (released.indices[1] == t).nonzero().item()
        want = x[t] + (x[members].mean(0) if members else 0.0)
        np.testing.assert_allclose(released.tokens[1, pos].numpy(), want, rtol=1e-10)


# ---------------------------------------------------------------------------- pool
def test_pool_is_three_by_three_average_pooling_at_64_of_576():
    g = torch.Generator().manual_seed(17)
    tokens = torch.randn(2, 1 + 576, 8, generator=g, dtype=torch.float64)
    assert pooled_grid(64, (24, 24)) == (8, 8) and pooled_grid(144, (24, 24)) == (12, 12)
    assert pooled_grid(50, (2, 100)) == (1, 50) and pooled_grid(63, (24, 24)) == (7, 9)
    out = create_allocator("pool")(tokens, budget=torch.tensor([64, 144]), grid=(24, 24), num_prefix_tokens=1)
    maps = tokens[:, 1:].reshape(2, 24, 24, 8).permute(0, 3, 1, 2)
    want = F.avg_pool2d(maps, 3).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.tokens[0, :64], want[0])
    anchors = [(3 * i) * 24 + 3 * j for i in range(8) for j in range(8)]
    assert out.indices[0, :64].tolist() == anchors
    want2 = F.avg_pool2d(maps, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.tokens[1, :144], want2[1])
    assert out.counts.tolist() == [64, 144]


def test_pool_handles_uneven_regions_and_the_pyramid_mode():
    g = torch.Generator().manual_seed(18)
    tokens = torch.randn(1, 5 * 7, 4, generator=g, dtype=torch.float64)
    out = create_allocator("pool")(tokens, budget=6, grid=(5, 7))
    hp, wp = pooled_grid(6, (5, 7))
    assert int(out.mask.sum()) == hp * wp <= 6
    maps = tokens[0].reshape(5, 7, 4)
    rb = [math.floor(i * 5 / hp) for i in range(hp + 1)]
    cb = [math.floor(j * 7 / wp) for j in range(wp + 1)]
    want = [maps[rb[i]:rb[i + 1], cb[j]:cb[j + 1]].mean((0, 1)) for i in range(hp) for j in range(wp)]
    torch.testing.assert_close(out.tokens[0], torch.stack(want))
    assert out.extras["regions"][0, 0].tolist() == [0, 0, rb[1], cb[1]]
    tokens = torch.randn(2, 576, 8, generator=g)
    out = create_allocator("pool", mode="pyramid")(tokens, budget=torch.tensor([64, 144]), grid=(24, 24))
    assert out.counts.tolist() == [36, 144]
    assert (out.positions[0, :36, 2] == 2).all() and (out.positions[1, :, 2] == 1).all()
    pyr = build_pyramid(tokens, (24, 24), (1, 2))
    torch.testing.assert_close(out.tokens[0, :36], pyr.candidates[0, 576 + 144:])


def test_every_baseline_builds_with_defaults_and_on_unusual_layouts():
    """No 576, no CLS at 0: 3 register tokens, a 5 x 9 grid, B = 2 with per-example budgets."""
    g = torch.Generator().manual_seed(19)
    tokens, query = torch.randn(2, 3 + 45, 12, generator=g), torch.randn(2, 4, 12, generator=g)
    for name in ("pool", "cls_attention", "visionzip", "tome", "divprune", "cdpruner", "fastv_like", "fastv", "sparsevlm"):
        out = create_allocator(name)(tokens, query=query, budget=torch.tensor([7, 20]), grid=(5, 9), num_prefix_tokens=3)
        alloc = create_allocator(name)
        if alloc.fixed_budget:
            assert out.counts.tolist() == [7, 20], name
        else:
            assert (out.counts <= torch.tensor([7, 20])).all() and (out.counts > 0).all(), name
        assert out.positions[..., 0].max() < 5 and out.positions[..., 1].max() < 9, name

