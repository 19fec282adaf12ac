"""Property fuzz over every public function of ``arr_coc.inference`` (its ``__all__``).

Each function gets valid arguments with one of them replaced by a hostile value: NaN, inf,
huge or tiny magnitudes, empty, wrong rank, wrong dtype, mismatched lengths. The outcome must
be a ValueError whose message names an argument of the function, or a result without NaN
(finite, except where infinity is the documented answer). Any other exception type fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from tests.analysis.fuzzing import FUZZ, check, tensors

import arr_coc.inference as inference
from arr_coc.inference import (
    CMIPress,
    InfoNCECritic,
    MIRouter,
    chunked_topk,
    cmi_keep_indices,
    compressed_answer_logits,
    cosine_topk,
    embed_gallery,
    kv_cache_entries,
    mi_topk,
    plan_batches,
    pointwise_mi,
    route,
    train_critic,
    vlm_features,
)


def test_every_public_function_is_fuzzed():
    fuzzed = {
        "CMIPress", "InfoNCECritic", "MIRouter", "RoutedOutput", "chunked_topk", "cmi_keep_indices",
        "compressed_answer_logits", "cosine_topk", "embed_gallery", "kv_cache_entries", "mi_topk",
        "plan_batches", "pointwise_mi", "route", "train_critic", "vlm_features",
    }
    assert set(inference.__all__) == fuzzed  # RoutedOutput is a plain record, built by MIRouter


@pytest.fixture(scope="module")
def critic():
    torch.manual_seed(0)
    return InfoNCECritic(3, 4, dim=5, hidden=8).eval()


@pytest.fixture(scope="module")
def tiny_vlm():
    from arr_coc.training.backbones import LLMConfig
    from arr_coc.training.base_vlm import BaseVLM, BaseVLMConfig
    from arr_coc.training.datamodule import EmbeddedVQADataset, VQACollator
    from arr_coc.training.task import VQATask
    from arr_coc.training.tokenizer import build_tokenizer

    torch.manual_seed(0)
    task = VQATask(seed=0, image_size=32, grid=4)
    tok = build_tokenizer(task)
    vlm = BaseVLM(BaseVLMConfig.for_task(task, tok, llm=LLMConfig(hidden_size=32, num_layers=2, num_heads=4))).eval()
    ds = EmbeddedVQADataset(task, start=0, length=3)
    return vlm, VQACollator(tok)([ds[i] for i in range(len(ds))])


# ------------------------------------------------------------------ KV press
@FUZZ
@given(
    keys=tensors(rank=(3, 5), size=(0, 6)),
    queries=tensors(rank=(3, 5), size=(0, 4)),
    n_kept=st.one_of(st.integers(-1, 8), st.just(2.5)),
    window_size=st.one_of(st.integers(0, 4), st.just(True)),
    alpha=st.sampled_from([0.0, 0.5, 1.0, -0.1, math.nan]),
    kernel=st.sampled_from(["cosine", "rbf", "dot"]),
    per_head=st.sampled_from([True, False, 1]),
)
def test_cmi_keep_indices(keys, queries, n_kept, window_size, alpha, kernel, per_head):
    names = ["keys", "queries", "n_kept", "window_size", "alpha", "kernel", "per_head"]
    out = check(cmi_keep_indices, names, keys, queries, n_kept, window_size=window_size, alpha=alpha, kernel=kernel, per_head=per_head)
    if out is not None:
        length = keys.shape[2]
        assert out.shape == (keys.shape[0], keys.shape[1], n_kept)
        assert ((out >= 0) & (out < length)).all()
        assert (out.diff(dim=-1) > 0).all()  # distinct, sorted


@FUZZ
@given(
    keys=tensors(shape=(1, 2, 9, 4), dtypes=[torch.float32, torch.float64]),
    queries=tensors(shape=(1, 4, 3, 4), dtypes=[torch.float32, torch.float64]),
    kernel=st.sampled_from(["cosine", "rbf"]),
)
def test_cmi_keep_indices_values(keys, queries, kernel):
    # well-shaped input of any magnitude (or poisoned): valid sorted positions or a ValueError
    out = check(cmi_keep_indices, ["keys", "queries"], keys, queries, 6, window_size=3, kernel=kernel)
    if out is not None:
        assert ((out >= 0) & (out < 9)).all() and (out[..., -3:] == torch.arange(6, 9)).all()


@FUZZ
@given(
    ratio=st.sampled_from([0.0, 0.5, 0.99, 1.0, -0.1, math.nan, True, "0.5"]),
    window=st.sampled_from([1, 8, 0, -1, 2.0, True]),
    alpha=st.sampled_from([0.0, 1.0, 1.5, math.nan, math.inf]),
    kernel=st.sampled_from(["cosine", "rbf", None]),
    per_head=st.sampled_from([True, False]),
)
def test_cmi_press_options(ratio, window, alpha, kernel, per_head):
    check(
        CMIPress, ["compression_ratio", "window_size", "alpha", "kernel", "per_head"],
        compression_ratio=ratio, window_size=window, alpha=alpha, kernel=kernel, per_head=per_head,
    )


@FUZZ
@given(
    visual=tensors(rank=(2, 4), size=(0, 17), dtypes=[torch.float32, torch.float64, torch.int64]),
    poison_ids=st.sampled_from([None, "negative", "too_big", "float", "rank", "rows"]),
    poison_mask=st.sampled_from([None, "empty_row", "shape", "values"]),
)
def test_compressed_answer_logits(tiny_vlm, visual, poison_ids, poison_mask):
    vlm, batch = tiny_vlm
    good_visual = torch.randn(3, vlm.num_patches, vlm.llm_dim)
    ids, mask = batch["question_ids"].clone(), batch["question_mask"].clone()
    if poison_ids == "negative":
        ids[0, 0] = -1
    elif poison_ids == "too_big":
        ids[0, 0] = 10**6
    elif poison_ids == "float":
        ids = ids.float()
    elif poison_ids == "rank":
        ids = ids[0]
    elif poison_ids == "rows":
        ids, mask = ids[:2], mask[:2]
    if poison_mask == "empty_row":
        mask[1] = False
    elif poison_mask == "shape":
        mask = mask[:, :-1]
    elif poison_mask == "values":
        mask = mask.long() * 3
    names = ["vlm", "visual", "visual_positions", "question_ids", "question_mask", "press"]
    use_visual = visual if visual.shape != (0,) else good_visual
    for v in (use_visual, good_visual):
        out = check(compressed_answer_logits, names, vlm, v, None, ids, mask, press=CMIPress(compression_ratio=0.5, window_size=2))
        if out is not None:
            logits, entries = out
            assert logits.shape == (v.shape[0], vlm.llm.lm_head.out_features) and (entries > 0).all()


def test_kv_cache_entries():
    assert kv_cache_entries(DynamicCache()) == 0
    for bad in (None, [], torch.zeros(2)):
        check(kv_cache_entries, ["cache"], bad)
        with pytest.raises(ValueError, match="cache"):
            kv_cache_entries(bad)


# ------------------------------------------------------------------ critic
@FUZZ
@given(
    q=tensors(rank=(1, 3), size=(0, 4)),
    x=tensors(rank=(1, 3), size=(0, 5)),
    reference=tensors(rank=(1, 3), size=(0, 5)),
)
def test_pointwise_mi(critic, q, x, reference):
    out = check(pointwise_mi, ["critic", "q", "x", "reference"], critic, q, x, reference)
    if out is not None:
        assert out.shape == (q.shape[0],)
        # pmi <= log N: a pair cannot beat the marginal by more than the sample size allows
        assert (out <= math.log(reference.shape[0]) + 2 * float(critic.scale) + 1e-4).all()


@FUZZ
@given(
    q=tensors(shape=(3, 3), dtypes=[torch.float32, torch.float64]),
    x=tensors(shape=(3, 4), dtypes=[torch.float32, torch.float64]),
)
def test_pointwise_mi_values(critic, q, x):
    # well-shaped input of any magnitude: finite pmi, and against itself as the reference
    # sample the mean pmi is bounded by log N (the InfoNCE bound)
    out = check(pointwise_mi, ["q", "x", "reference"], critic, q, x, x)
    if out is not None:
        assert float(out.mean()) <= math.log(3) + 1e-5


@settings(max_examples=12, deadline=None)
@given(
    queries=tensors(rank=(1, 3), size=(0, 4)),
    images=tensors(rank=(1, 3), size=(0, 4)),
    steps=st.sampled_from([1, 2, 0, 1.5]),
    batch_size=st.sampled_from([2, 4, 1, True]),
    lr=st.sampled_from([1e-3, 0.0, -1.0, math.nan, math.inf]),
)
def test_train_critic(queries, images, steps, batch_size, lr):
    names = ["queries", "images", "steps", "batch_size", "lr", "dim", "seed"]
    out = check(train_critic, names, queries, images, steps=steps, batch_size=batch_size, lr=lr, dim=4)
    if out is not None:
        _, hist = out
        assert len(hist) == steps


@FUZZ
@given(
    query_dim=st.sampled_from([1, 3, 0, -2, 2.0, True]),
    temperature=st.sampled_from([0.1, 1.0, 0.0, -1.0, math.nan, math.inf]),
)
def test_critic_options(query_dim, temperature):
    check(InfoNCECritic, ["query_dim", "image_dim", "dim", "hidden", "temperature"], query_dim, 4, dim=3, hidden=5, temperature=temperature)


@FUZZ
@given(
    pixels=st.one_of(st.none(), tensors(rank=(3, 5), size=(0, 4))),
    which=st.sampled_from(["good", "nan", "size", "int", "ids_float", "ids_big", "mask_only"]),
)
def test_vlm_features(tiny_vlm, pixels, which):
    vlm, batch = tiny_vlm
    good_pixels = batch["pixels"].clone()
    ids, mask = batch["question_ids"], batch["question_mask"]
    if which == "nan":
        good_pixels[0, 0, 0, 0] = math.nan
    elif which == "size":
        good_pixels = good_pixels[..., :-1]
    elif which == "int":
        good_pixels = (good_pixels * 255).long()
    elif which == "ids_float":
        ids = ids.float()
    elif which == "ids_big":
        ids = ids + 10**6
    elif which == "mask_only":
        ids = None
    names = ["vlm", "pixels", "question_ids", "question_mask"]
    for px in (pixels, good_pixels):
        out = check(vlm_features, names, vlm, px, ids, mask)
        if out is not None:
            q, x = out
            assert (q is None) == (ids is None) and (x is None) == (px is None)


# ------------------------------------------------------------------ retrieval
@FUZZ
@given(
    queries=tensors(rank=(1, 3), size=(0, 4)),
    gallery=tensors(rank=(1, 3), size=(0, 6)),
    k=st.sampled_from([1, 2, 0, -1, 1.0, True, 100]),
    chunk_size=st.sampled_from([1, 2, 8192, 0]),
)
def test_cosine_topk(queries, gallery, k, chunk_size):
    out = check(cosine_topk, ["queries", "gallery", "k", "chunk_size"], queries, gallery, k, chunk_size=chunk_size)
    if out is not None:
        s, i = out
        assert s.shape == i.shape == (queries.shape[0], k)
        assert (s.abs() <= 1 + 1e-5).all() and ((i >= 0) & (i < gallery.shape[0])).all()


@FUZZ
@given(
    queries=tensors(rank=(1, 3), size=(0, 4)),
    images=tensors(rank=(1, 3), size=(0, 5)),
    k=st.sampled_from([1, 3, 0, 2.0]),
    chunk_size=st.sampled_from([1, 3, 8192, 0, -1]),
)
def test_embed_gallery_and_mi_topk(critic, queries, images, k, chunk_size):
    gal = check(embed_gallery, ["critic", "images", "chunk_size"], critic, images, chunk_size=chunk_size)
    if gal is None:
        return
    assert gal.shape == (images.shape[0], 5)
    out = check(mi_topk, ["critic", "queries", "gallery_emb", "k", "chunk_size"], critic, queries, gal, k, chunk_size=chunk_size)
    if out is not None:
        s, _ = out
        assert (s <= math.log(gal.shape[0]) + 1e-4).all()  # pmi against the gallery <= log G


@FUZZ
@given(
    gallery=tensors(rank=(0, 2), size=(0, 5)),
    scores=st.sampled_from(["ok", "nan", "inf", "int", "shape", "none"]),
    k=st.sampled_from([1, 2, 0]),
)
def test_chunked_topk(gallery, scores, k):
    def score_fn(g):
        s = torch.arange(g.shape[0], dtype=torch.float32)[None].repeat(2, 1)
        if scores == "nan" and g.shape[0]:
            s[0, 0] = math.nan
        elif scores == "inf" and g.shape[0]:
            s[1, -1] = math.inf
        elif scores == "int":
            s = s.long()
        elif scores == "shape":
            s = s[:, :-1]
        elif scores == "none":
            s = None
        return s

    check(chunked_topk, ["score_fn", "gallery", "k", "chunk_size"], score_fn, gallery, k, chunk_size=2)


# ------------------------------------------------------------------ routing
@FUZZ
@given(scores=tensors(rank=(0, 2), size=(0, 5)), threshold=st.sampled_from([0.0, -math.inf, math.inf, math.nan, True, "1"]))
def test_route(scores, threshold):
    out = check(route, ["scores", "threshold"], scores, threshold)
    if out is not None:
        assert out.dtype == torch.bool and torch.equal(out, scores >= threshold)


@FUZZ
@given(full=tensors(rank=(0, 2), size=(0, 6)), size=st.sampled_from([1, 3, 0, 2.0, True]))
def test_plan_batches(full, size):
    out = check(plan_batches, ["full", "max_batch_size"], full, size)
    if out is not None:
        seen = sorted(i for _, rows in out for i in rows.tolist())
        assert seen == list(range(full.shape[0]))


@FUZZ
@given(
    scores=tensors(rank=(0, 2), size=(0, 5)),
    rows=st.integers(0, 5),
    out_kind=st.sampled_from(["same", "double", "half", "wide", "rows", "none"]),
    threshold=st.sampled_from([0.0, math.inf, -math.inf]),
)
def test_router(scores, rows, out_kind, threshold):
    x = torch.arange(float(rows))[:, None]

    def full(b):
        return b["x"] * 2

    def comp(b):
        y = b["x"] - 1
        return {
            "same": y, "double": y.double(), "half": y.half(), "wide": y.repeat(1, 2), "rows": y[:0], "none": None,
        }[out_kind]

    router = MIRouter(full, comp, threshold=threshold, max_batch_size=2)
    out = check(router, ["batch", "scores", "full_path", "compressed_path"], {"x": x}, scores)
    if out is not None:
        assert out.outputs.shape[0] == scores.shape[0] and out.outputs is not None
