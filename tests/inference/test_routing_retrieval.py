"""Routing (monotone in the threshold, per-path batches), retrieval (equals brute force), critic pmi."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arr_coc.inference import (
    InfoNCECritic,
    MIRouter,
    chunked_topk,
    cosine_topk,
    embed_gallery,
    mi_topk,
    plan_batches,
    pointwise_mi,
    route,
    train_critic,
)


# ------------------------------------------------------------------ routing
def test_route_monotone_in_threshold():
    scores = torch.randn(200, generator=torch.Generator().manual_seed(0))
    prev = None
    for t in torch.linspace(3, -3, 25).tolist():  # dropping threshold
        full = route(scores, t)
        assert torch.equal(full, scores >= t)
        if prev is not None:
            assert (full | ~prev).all() and full.sum() >= prev.sum()  # full set only grows
        prev = full
    assert route(scores, -math.inf).all() and not route(scores, math.inf).any()


@given(st.lists(st.booleans(), min_size=0, max_size=40), st.integers(1, 7))
@settings(max_examples=40, deadline=None)
def test_plan_batches_per_path(flags, size):
    full = torch.tensor(flags, dtype=torch.bool)
    plan = plan_batches(full, size)
    seen = torch.cat([rows for _, rows in plan]) if plan else torch.zeros(0, dtype=torch.long)
    assert sorted(seen.tolist()) == list(range(len(flags)))  # every request exactly once
    for path, rows in plan:
        assert 1 <= len(rows) <= size
        assert bool(full[rows].all()) if path == "full" else not bool(full[rows].any())
    n_full = int(full.sum())
    assert sum(p == "full" for p, _ in plan) == math.ceil(n_full / size)
    assert sum(p == "compressed" for p, _ in plan) == math.ceil((len(flags) - n_full) / size)


def test_router_runs_each_path_on_its_requests():
    x = torch.arange(10.0)[:, None]
    calls = []

    def full(b):
        calls.append(("full", b["x"].squeeze(1).tolist()))
        return b["x"] * 10

    def comp(b):
        calls.append(("compressed", b["x"].squeeze(1).tolist()))
        return -b["x"]

    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.6, 0.0, 1.0, 0.3, 0.4])
    res = MIRouter(full, comp, threshold=0.5, max_batch_size=2)({"x": x}, scores)
    want = torch.where(scores >= 0.5, x.squeeze(1) * 10, -x.squeeze(1))
    assert torch.equal(res.outputs.squeeze(1), want)
    assert calls[:3] == [("full", [1.0, 2.0]), ("full", [3.0, 5.0]), ("full", [7.0])]
    assert calls[3:] == [("compressed", [0.0, 4.0]), ("compressed", [6.0, 8.0]), ("compressed", [9.0])]


def test_router_bad_input():
    f = lambda b: b["x"]  # noqa: E731
    with pytest.raises(ValueError, match="threshold"):
        MIRouter(f, f, threshold=float("nan"))
    with pytest.raises(ValueError, match="max_batch_size"):
        MIRouter(f, f, threshold=0.0, max_batch_size=0)
    with pytest.raises(ValueError, match="compressed_path"):
        MIRouter(f, None, threshold=0.0)
    r = MIRouter(f, f, threshold=0.0)
    with pytest.raises(ValueError, match="scores"):
        r({"x": torch.zeros(3, 1)}, torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="batch"):
        r({"x": torch.zeros(2, 1)}, torch.zeros(3))
    with pytest.raises(ValueError, match="full_path"):
        MIRouter(lambda b: b["x"][:1], f, threshold=0.0)({"x": torch.zeros(3, 1)}, torch.ones(3))


def test_router_promotes_dtypes_across_paths():
    # a float64 compressed path beside a float32 full path used to crash in index_put
    x = torch.arange(6.0)[:, None]
    scores = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.0])
    res = MIRouter(lambda b: b["x"] * 2, lambda b: (b["x"] / 3).double(), threshold=0.5, max_batch_size=2)({"x": x}, scores)
    assert res.outputs.dtype == torch.float64
    want = torch.where(scores[:, None] >= 0.5, (x * 2).double(), (x / 3).double())
    assert torch.equal(res.outputs, want)  # the compressed rows keep their float64 values exactly
    # int and half outputs promote to float16 without losing the ints
    res = MIRouter(lambda b: b["x"].long(), lambda b: b["x"].half(), threshold=0.5)({"x": x}, scores)
    assert res.outputs.dtype == torch.float16 and torch.equal(res.outputs, x.half())


def test_router_refuses_mismatched_shapes_and_no_requests():
    x = torch.arange(4.0)[:, None]
    scores = torch.tensor([0.9, 0.1, 0.8, 0.2])
    with pytest.raises(ValueError, match="compressed_path"):
        MIRouter(lambda b: b["x"], lambda b: b["x"].repeat(1, 2), threshold=0.5)({"x": x}, scores)
    # no requests: a ValueError, not outputs=None
    with pytest.raises(ValueError, match="scores"):
        MIRouter(lambda b: b["x"], lambda b: b["x"], threshold=0.5)({"x": x[:0]}, scores[:0])


# ------------------------------------------------------------------ retrieval
@pytest.mark.parametrize("chunk", [3, 64, 10_000])
def test_topk_equals_brute_force(chunk):
    g = torch.Generator().manual_seed(0)
    critic = InfoNCECritic(6, 9, dim=8, hidden=16)
    q, imgs = torch.randn(5, 6, generator=g), torch.randn(300, 9, generator=g)
    gal = embed_gallery(critic, imgs, chunk_size=chunk)
    s, i = mi_topk(critic, q, gal, 10, chunk_size=chunk)
    with torch.no_grad():
        f = critic(q, imgs)  # [5, 300] brute force
    pmi = f - (torch.logsumexp(f, 1, keepdim=True) - math.log(300))
    ref = torch.sort(pmi, dim=1, descending=True, stable=True)
    assert torch.equal(i, ref.indices[:, :10])
    torch.testing.assert_close(s, ref.values[:, :10], atol=1e-5, rtol=1e-5)
    # pmi of every pair equals pointwise_mi with the gallery as the reference sample
    torch.testing.assert_close(pointwise_mi(critic, q, imgs[i[:, 0]], imgs), s[:, 0], atol=1e-5, rtol=1e-5)
    cs, ci = cosine_topk(q[:, :6], torch.randn(300, 6, generator=g), 4, chunk_size=chunk)
    assert ci.shape == (5, 4) and (cs.diff(dim=1) <= 0).all()


def test_topk_ties_across_chunks_keep_lower_index_and_cosine_reference():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [3.0, 0.0]])
    s, i = cosine_topk(torch.tensor([[1.0, 0.0]]), gallery, 4, chunk_size=1)
    assert i.tolist() == [[0, 2, 4, 3]]
    torch.testing.assert_close(s, torch.tensor([[1.0, 1.0, 1.0, 2**-0.5]]))
    s, i = cosine_topk(torch.tensor([[1.0, 0.0]]), gallery, 4, chunk_size=2)
    assert sorted(i[0, :3].tolist()) == [0, 2, 4] and i[0, 3] == 3
    s, i, lse = chunked_topk(lambda g: g[:, 0][None], gallery, 2, chunk_size=3)
    assert i.tolist() == [[4, 2]] and torch.allclose(lse, torch.logsumexp(gallery[:, 0], 0)[None])


def test_retrieval_bad_input():
    critic = InfoNCECritic(3, 4, dim=5, hidden=8)
    gal = embed_gallery(critic, torch.randn(10, 4))
    with pytest.raises(ValueError, match="k"):
        mi_topk(critic, torch.randn(2, 3), gal, 11)
    with pytest.raises(ValueError, match="queries"):
        mi_topk(critic, torch.randn(2, 4), gal, 2)
    with pytest.raises(ValueError, match="gallery_emb"):
        mi_topk(critic, torch.randn(2, 3), torch.randn(10, 6), 2)
    with pytest.raises(ValueError, match="chunk_size"):
        cosine_topk(torch.randn(2, 3), torch.randn(10, 3), 2, chunk_size=0)
    with pytest.raises(ValueError, match="gallery"):
        cosine_topk(torch.randn(2, 3), torch.full((10, 3), float("nan")), 2)


# ------------------------------------------------------------------ critic
def test_critic_learns_dependence_and_pmi_averages_to_bound():
    # images: one-hot of a class (plus noise); queries: the class one-hot (plus noise).
    # I(Q; X) = log 8 for 8 equiprobable classes; the pmi estimate with N >> 8 references
    # approaches it, and an independent pairing gives ~0.
    g = torch.Generator().manual_seed(0)
    cls = torch.randint(0, 8, (2000,), generator=g)
    eye = torch.eye(8)
    q = eye[cls] + 0.05 * torch.randn(2000, 8, generator=g)
    x = torch.cat([eye[cls], torch.randn(2000, 4, generator=g)], 1)
    critic, hist = train_critic(q, x, steps=80, batch_size=128, lr=1e-2, seed=0)
    assert hist[-1] > hist[0] and hist[-1] > 0.8 * math.log(8)
    pmi = pointwise_mi(critic, q[:500], x[:500], x[1000:2000])
    assert abs(float(pmi.mean()) - math.log(8)) < 0.25
    shuffled = pointwise_mi(critic, q[:500], x[500:1000], x[1000:2000])
    assert float(shuffled.mean()) < float(pmi.mean()) - 1.0
    with pytest.raises(ValueError, match="images"):
        train_critic(q, x[:10])
    with pytest.raises(ValueError, match="batch_size"):
        train_critic(q, x, batch_size=1)
    with pytest.raises(ValueError, match="reference"):
        pointwise_mi(critic, q[:2], x[:2], x[:0, :3])
