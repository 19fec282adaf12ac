"""CMIPress: identity at ratio 0, exact cache lengths, redundancy-aware picks, bad input."""

from __future__ import annotations

import pytest
import torch
from kvpress import KnormPress, SnapKVPress
from kvpress.utils import compute_n_kept
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from arr_coc.inference import CMIPress, cmi_keep_indices, compressed_answer_logits


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny_vlm():
    from arr_coc.training.base_vlm import BaseVLM, BaseVLMConfig
    from arr_coc.training.backbones import LLMConfig
    from arr_coc.training.datamodule import EmbeddedVQADataset, VQACollator
    from arr_coc.training.task import VQATask
    from arr_coc.training.tokenizer import build_tokenizer

    torch.manual_seed(0)
    task = VQATask(seed=0, image_size=32, grid=4)
    tok = build_tokenizer(task)
    vlm = BaseVLM(BaseVLMConfig.for_task(task, tok, llm=LLMConfig(hidden_size=32, num_layers=2, num_heads=4))).eval()
    ds = EmbeddedVQADataset(task, start=0, length=12)
    batch = VQACollator(tok)([ds[i] for i in range(len(ds))])
    return vlm, batch


def _prefill(model, ids, press=None):
    cache = DynamicCache()
    if press is None:
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    else:
        with press(model):
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    return out, cache


def _decode(model, cache, ids, pos):
    return model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True).logits[:, -1]


def test_ratio_zero_is_identity(tiny_llama):
    ids = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(1))
    nxt = torch.randint(0, 50, (2, 1), generator=torch.Generator().manual_seed(2))
    _, c0 = _prefill(tiny_llama, ids)
    _, c1 = _prefill(tiny_llama, ids, CMIPress(compression_ratio=0.0))
    for a, b in zip(c0.layers, c1.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    pos = torch.full((2, 1), 20)
    assert torch.equal(_decode(tiny_llama, c0, nxt, pos), _decode(tiny_llama, c1, nxt, pos))


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("per_head", [True, False])
def test_cache_length_matches_ratio(tiny_llama, ratio, per_head):
    ids = torch.randint(0, 50, (2, 37), generator=torch.Generator().manual_seed(3))
    _, cache = _prefill(tiny_llama, ids, CMIPress(compression_ratio=ratio, window_size=4, per_head=per_head))
    expected = compute_n_kept(37, ratio)
    assert expected == max(1, int(37 * (1 - ratio)))
    for layer in cache.layers:
        assert layer.keys.shape == (2, 2, expected, 8) and layer.values.shape == layer.keys.shape
    # the same count as kvpress's own scorer presses
    _, ref = _prefill(tiny_llama, ids, KnormPress(compression_ratio=ratio))
    assert ref.get_seq_length() == cache.get_seq_length() == expected


def test_kept_entries_are_original_keys_and_window_kept(tiny_llama):
    ids = torch.randint(0, 50, (1, 24), generator=torch.Generator().manual_seed(4))
    _, full = _prefill(tiny_llama, ids)
    _, comp = _prefill(tiny_llama, ids, CMIPress(compression_ratio=0.5, window_size=5))
    for f, c in zip(full.layers, comp.layers):
        # every kept key is one of the original positions, in increasing order, window included
        match = (c.keys[0][:, :, None, :] == f.keys[0][:, None, :, :]).all(-1)  # [H, n, L]
        assert match.any(-1).all()
        pos = match.float().argmax(-1)
        assert (pos.diff(dim=-1) > 0).all()
        assert (pos[:, -5:] == torch.arange(19, 24)).all()
        assert torch.equal(c.values[0], f.values[0].gather(1, pos[..., None].expand(-1, -1, 8)))


def test_duplicate_key_not_kept_twice():
    # candidates (w = 1 window query along e0): a relevant key, its exact duplicate, a distinct
    # relevant key, and two irrelevant ones. Budget 2 outside the window.
    e = torch.eye(4)
    keys = torch.stack([e[0] + 0.2 * e[1], e[0] + 0.2 * e[1], e[0] - 0.5 * e[1], e[2], e[3], e[0]])  # L = 6
    keys = keys[None, None]  # [1, 1, 6, 4]
    query = e[0][None, None, None]  # [1, 1, 1, 4]
    for per_head in (True, False):
        idx = cmi_keep_indices(keys, query, 3, window_size=1, per_head=per_head)
        kept = idx[0, 0].tolist()
        assert kept[-1] == 5 and 2 in kept and len({0, 1} & set(kept)) == 1, kept
    # a per-position score (cosine to the query) would keep both duplicates
    cos = torch.nn.functional.cosine_similarity(keys[0, 0, :5], query[0, 0], dim=-1)
    assert set(cos.topk(2).indices.tolist()) == {0, 1}


def test_small_budget_keeps_latest_window_positions():
    keys = torch.randn(1, 2, 10, 4, generator=torch.Generator().manual_seed(0))
    q = torch.randn(1, 4, 3, 4, generator=torch.Generator().manual_seed(1))
    idx = cmi_keep_indices(keys, q, 2, window_size=3)
    assert idx.tolist() == [[[8, 9], [8, 9]]]


def test_vlm_readout_through_cache_matches_answer_logits(tiny_vlm):
    vlm, batch = tiny_vlm
    with torch.no_grad():
        vis = vlm.project(vlm.encode_image(batch["pixels"])[:, vlm.num_prefix_tokens :])
        ref = vlm.answer_logits(vis, None, None, batch["question_ids"], batch["question_mask"])
    assert batch["question_mask"].sum(1).unique().numel() > 1  # several lengths -> several groups
    lg, entries = compressed_answer_logits(vlm, vis, None, batch["question_ids"], batch["question_mask"])
    torch.testing.assert_close(lg, ref, atol=1e-5, rtol=1e-5)
    lg0, entries0 = compressed_answer_logits(
        vlm, vis, None, batch["question_ids"], batch["question_mask"], press=CMIPress(compression_ratio=0.0)
    )
    assert torch.equal(lg0, lg) and torch.equal(entries0, entries)
    layers, hkv = len(vlm.llm.model.layers), vlm.llm.config.num_key_value_heads
    length = vis.shape[1] + batch["question_mask"].sum(1)
    assert torch.equal(entries, layers * hkv * length)
    for press in (CMIPress(compression_ratio=0.75, window_size=3), SnapKVPress(compression_ratio=0.75, window_size=3)):
        lg2, e2 = compressed_answer_logits(vlm, vis, None, batch["question_ids"], batch["question_mask"], press=press)
        kept = torch.tensor([compute_n_kept(int(n), 0.75) for n in length])
        assert torch.equal(e2, layers * hkv * kept) and torch.isfinite(lg2).all()


def test_bad_input(tiny_vlm):
    for kw, name in [
        (dict(compression_ratio=1.0), "compression_ratio"),
        (dict(compression_ratio=-0.1), "compression_ratio"),
        (dict(window_size=0), "window_size"),
        (dict(alpha=1.5), "alpha"),
        (dict(kernel="dot"), "kernel"),
    ]:
        with pytest.raises(ValueError, match=name):
            CMIPress(**kw)
    keys = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match="queries"):
        cmi_keep_indices(keys, torch.randn(1, 3, 2, 4), 4, window_size=2)
    with pytest.raises(ValueError, match="n_kept"):
        cmi_keep_indices(keys, torch.randn(1, 2, 2, 4), 11, window_size=2)
    with pytest.raises(ValueError, match="window_size"):
        cmi_keep_indices(keys, torch.randn(1, 2, 10, 4), 4, window_size=10)
    vlm, batch = tiny_vlm
    vis = torch.zeros(2, vlm.num_patches, vlm.llm_dim)
    with pytest.raises(ValueError, match="press"):
        compressed_answer_logits(vlm, vis, None, batch["question_ids"][:2], press="snapkv")
    with pytest.raises(ValueError, match="question_mask"):
        compressed_answer_logits(vlm, vis, None, batch["question_ids"][:2], torch.tensor([[0, 1] + [1] * (batch["question_ids"].shape[1] - 2)] * 2))


def test_runs_in_kvpress_pipeline():
    import kvpress  # noqa: F401  (registers "kv-press-text-generation")
    from transformers import pipeline

    from arr_coc.training.task import VQATask
    from arr_coc.training.tokenizer import build_tokenizer

    tok = build_tokenizer(VQATask(seed=0, image_size=32, grid=4))
    tok.bos_token = tok.pad_token  # the pipeline prepends a BOS when there is no chat template
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    ctx = " ".join(["what shape is the red object ?"] * 4)
    question = "how many circles are there ?"
    seen = []

    class Recording(CMIPress):
        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            k, v = super().compress(module, hidden_states, keys, values, attentions, kwargs)
            seen.append((keys.shape[2], k.shape[2]))
            return k, v

    plain = pipe(ctx, question=question, max_new_tokens=3)["answer"]
    assert pipe(ctx, question=question, press=Recording(compression_ratio=0.0), max_new_tokens=3)["answer"] == plain
    pipe(ctx, question=question, press=Recording(compression_ratio=0.5, window_size=4), max_new_tokens=3)
    assert len(seen) == 4  # two calls x two layers, prefill only
    length = seen[0][0]
    assert seen[:2] == [(length, length)] * 2 and seen[2:] == [(length, compute_n_kept(length, 0.5))] * 2


@pytest.mark.parametrize("where", ["keys", "queries"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_keep_indices_refuse_non_finite_input(where, bad):
    # a NaN key used to come back as -1 positions, which gather reads as the last entry
    g = torch.Generator().manual_seed(0)
    keys, queries = torch.randn(1, 2, 12, 4, generator=g), torch.randn(1, 4, 3, 4, generator=g)
    (keys if where == "keys" else queries)[0, 1, 2, 0] = bad
    with pytest.raises(ValueError, match=where):
        cmi_keep_indices(keys, queries, 6, window_size=3)


@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
@pytest.mark.parametrize("scale", [2.0**100, 2.0**-100])
def test_keep_indices_are_scale_free_and_valid(kernel, scale):
    # rbf on keys near the float32 limits used to overflow into -1 positions; a power-of-two
    # scale is exact in float32, so the picks must be identical, not only close
    g = torch.Generator().manual_seed(1)
    keys, queries = torch.randn(2, 2, 16, 4, generator=g), torch.randn(2, 4, 3, 4, generator=g)
    ref = cmi_keep_indices(keys, queries, 8, window_size=3, kernel=kernel)
    got = cmi_keep_indices(keys * scale, queries * scale, 8, window_size=3, kernel=kernel)
    assert ((got >= 0) & (got < 16)).all()
    assert torch.equal(got, ref)


def test_keep_indices_bad_options():
    keys, queries = torch.randn(1, 2, 12, 4), torch.randn(1, 4, 3, 4)
    with pytest.raises(ValueError, match="alpha"):
        cmi_keep_indices(keys, queries, 6, window_size=3, alpha=float("nan"))
    with pytest.raises(ValueError, match="kernel"):
        cmi_keep_indices(keys, queries, 6, window_size=3, kernel="dot")
    with pytest.raises(ValueError, match="keys"):
        cmi_keep_indices(keys.long(), queries, 6, window_size=3)
    with pytest.raises(ValueError, match="keys"):
        cmi_keep_indices(keys[:, :, :, :0], queries[..., :0], 6, window_size=3)
