"""In-LLM pruning (FastV / SparseVLM style) inside the LLaVA and Qwen-VL plug-ins.

Oracles: the unmodified model (a pruner that keeps every token must leave logits and
generations as they are), the eager attention weights of transformers (what the pruner is
shown), a hand-written layer-by-layer run of the same decoder layers (what pruning must
compute), and, for generation with the KV cache, greedy decoding by full forwards without a
cache (a pruner whose choice ignores the text gives the same tokens either way).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from _pruners import KeepFirst, LastTokenTopK, Recycle  # noqa: E402
from test_llava import hf_positions, make_batch, tiny_llava  # noqa: E402
from test_qwen_vl import _batch as qwen_batch  # noqa: E402
from test_qwen_vl import _model as qwen_model  # noqa: E402

from arr_coc.allocators import create_allocator  # noqa: E402
from arr_coc.integrations import llava, qwen_vl  # noqa: E402
from arr_coc.integrations._llm import attention_probs, decoder_layers  # noqa: E402

IMG = 120


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def _inputs():
    return make_batch([2, 7, 4], [5, 1, 3])


# --------------------------------------------------------------------------- keep everything == plain
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@torch.no_grad()
def test_keeping_every_token_reproduces_the_plain_llava(impl):
    model = tiny_llava()
    model.set_attn_implementation(impl)
    inputs = _inputs()
    real = inputs["attention_mask"].bool()
    ref = model(**inputs, position_ids=hf_positions(inputs["attention_mask"])).logits
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())  # transformers' own
    vlm = llava.wrap(model, KeepFirst(), query="prompt")
    out = vlm(**inputs).logits
    assert len(vlm.allocator.states) == 1  # the pruner was called, and kept everything
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
    kw = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(vlm.generate(**inputs, **kw), model.generate(**inputs, **kw))
    beams = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert torch.equal(vlm.generate(**inputs, **beams), model.generate(**inputs, **beams))
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks  # removed


@torch.no_grad()
def test_keeping_every_token_reproduces_the_plain_qwen2_vl():
    model = qwen_model("qwen2_vl")
    inputs = qwen_batch()
    ref = qwen_vl.wrap(model, "full", query="prompt")(**inputs).logits  # itself equal to the plain model's
    out = qwen_vl.wrap(model, KeepFirst(), query="prompt")(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
    for kw in (dict(max_new_tokens=4), dict(max_new_tokens=3, num_beams=2, num_return_sequences=2)):
        model.model.rope_deltas = None
        ref = model.generate(**inputs, do_sample=False, **kw)
        out = qwen_vl.wrap(model, KeepFirst(), query="prompt").generate(**inputs, do_sample=False, **kw)
        assert torch.equal(out, ref)


# --------------------------------------------------------------------------- what the pruner sees
@torch.no_grad()
def test_the_pruner_sees_the_eager_attention_and_the_question():
    model = tiny_llava()
    model.set_attn_implementation("eager")
    inputs = _inputs()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    first = (mask.cumsum(1) <= 2) & mask.bool()  # the first two tokens of each prompt (text)
    question = first
    pruner = KeepFirst()
    llava.wrap(model, pruner, query="prompt")(**inputs, query_mask=question)
    state = pruner.states[0]
    eager = model(**inputs, position_ids=hf_positions(mask), output_attentions=True).attentions[0]  # [B, H, L, L]
    visual = [torch.nonzero(r == IMG).flatten() for r in ids]
    kc = state.visual_mask.shape[1]
    assert kc == 36 and state.visual_mask.all()
    for b in range(3):
        # visual slots first, then the question's tokens with the readout (the last token) last
        torch.testing.assert_close(state.attention[b, :, -1, :kc], eager[b, :, -1, visual[b]], atol=1e-6, rtol=0)
        rows = torch.cat([torch.nonzero(first[b]).flatten(), torch.tensor([ids.shape[1] - 1])])
        torch.testing.assert_close(state.attention[b, :, -3:, :kc], eager[b, :, rows][:, :, visual[b]], atol=1e-6, rtol=0)
        assert state.text_mask[b].tolist()[-3:] == [True, True, True] and state.text_mask[b].sum() == 3
        torch.testing.assert_close(state.inputs_embeds[b, -3:], model.get_input_embeddings()(ids[b, rows]))
    prepared = llava.wrap(model, "full", query="prompt").prepare(**inputs).inputs_embeds
    for b in range(3):  # the visual slots hold the image features the language model received
        torch.testing.assert_close(state.inputs_embeds[b, :kc], prepared[b, visual[b]])
    assert state.origin[0].tolist() == list(range(36)) and state.budget.tolist() == [64 * 0 + 36] * 3
    # the attention recomputation itself, on the model's own layer-0 inputs
    layer = decoder_layers(model)[0]
    h = layer.input_layernorm(prepared)
    pos = hf_positions(mask)
    cos_sin = model.model.language_model.rotary_emb(h, pos)
    n = ids.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :] | torch.eye(n, dtype=torch.bool)
    probs = attention_probs(layer.self_attn, h, cos_sin, allowed)
    real = mask.bool()
    torch.testing.assert_close(probs.permute(0, 2, 1, 3)[real], eager.permute(0, 2, 1, 3)[real], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- what pruning computes
def _by_hand(model, s, orig, valid, prune_after=0):
    """Layers 0..prune_after on the whole prompt, then the kept slots ``orig`` only (a plain loop)."""
    lm = model.model.language_model
    h, pos, m = s.inputs_embeds, s.position_ids, s.attention_mask.bool()

    def mask4(v):
        n = v.shape[1]
        return ((torch.ones(n, n, dtype=torch.bool).tril()[None] & v[:, None, :]) | torch.eye(n, dtype=torch.bool))[:, None]

    for j, layer in enumerate(lm.layers):
        if j == prune_after + 1:
            h = h.gather(1, orig[..., None].expand(-1, -1, h.shape[-1]))
            pos, m = pos.gather(1, orig), valid
        h = layer(h, attention_mask=mask4(m), position_embeddings=lm.rotary_emb(h, pos), position_ids=pos)
        h = h[0] if isinstance(h, tuple) else h
    return model.lm_head(lm.norm(h))


@torch.no_grad()
def test_pruned_forward_equals_a_layer_by_layer_run(model):
    inputs = _inputs()
    budget = torch.tensor([5, 9, 2])
    vlm = llava.wrap(model, LastTokenTopK(), budget=budget, query="prompt")
    out = vlm(**inputs).logits
    run = vlm.last_in_llm
    final = run.final
    assert run.trace.counts[0].tolist() == budget.tolist() and run.trace.mask.sum(1).tolist() == budget.tolist()
    text = torch.tensor([7, 8, 7])
    assert final.valid.sum(1).tolist() == (text + budget).tolist() and out.shape[1] == int((text + budget).max())
    # the kept visual tokens are the top ones of the readout's head-averaged attention
    score = vlm.allocator.states[0].attention[:, :, -1, :36].mean(1)
    for b in range(3):
        assert set(run.trace.kept[b, : budget[b]].tolist()) == set(score[b].topk(int(budget[b])).indices.tolist())
    s = vlm.prepare(**inputs)
    ref = _by_hand(model, s, final.orig, final.valid)
    torch.testing.assert_close(out[final.valid], ref[final.valid], atol=1e-5, rtol=0)


@torch.no_grad()
def test_recycled_tokens_enter_after_the_kept_ones(model):
    inputs = _inputs()
    vlm = llava.wrap(model, Recycle(keep=4), query="prompt")
    vlm(**inputs)
    final = vlm.last_in_llm.final
    assert (final.valid & (final.origin >= 0)).sum(1).tolist() == [5, 5, 5]  # 4 kept + 1 recycled
    for b in range(3):
        o = final.origin[b][final.valid[b]].tolist()
        first = o.index(0)
        assert o[first : first + 5] == [0, 1, 2, 3, 4]  # the recycled token stands at its origin (4) right after


def _greedy_without_cache(vlm, inputs, steps):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(steps):
        logits = vlm(input_ids=ids, attention_mask=mask, pixel_values=inputs.get("pixel_values"),
                     **{k: v for k, v in inputs.items() if k == "image_grid_thw"}).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@torch.no_grad()
def test_generate_with_the_cache_equals_full_forwards(model):
    inputs = _inputs()
    vlm = llava.wrap(model, KeepFirst(keep=6), query="prompt")
    out = vlm.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, _greedy_without_cache(vlm, inputs, 4))
    short = vlm.prepare(**inputs).input_ids.shape[1]
    cache = out.past_key_values
    assert cache.get_seq_length(0) == short + 3  # layer 0 ran on the whole prompt
    assert cache.get_seq_length(1) == short - 30 + 3  # layer 1 only on 6 of 36 image tokens


@torch.no_grad()
def test_qwen2_vl_pruned_generate_equals_full_forwards():
    model = qwen_model("qwen2_vl")
    inputs = qwen_batch()
    vlm = qwen_vl.wrap(model, KeepFirst(keep=3), query="prompt")
    got = vlm.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, _greedy_without_cache(vlm, inputs, 3))


# --------------------------------------------------------------------------- the registered methods
@pytest.mark.parametrize("name,kw", [("fastv", dict(k=1)), ("sparsevlm", dict())])
@torch.no_grad()
def test_registered_in_llm_methods_run_in_both_plug_ins(model, name, kw):
    inputs = _inputs()
    budget = torch.tensor([4, 6, 3])
    vlm = llava.wrap(model, create_allocator(name, **kw), budget=budget, query="prompt")
    logits = vlm(**inputs).logits
    assert torch.isfinite(logits).all()
    assert vlm.last_in_llm.trace.mask.sum(1).tolist() == budget.tolist()
    ids = vlm.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert ids.shape == (3, inputs["input_ids"].shape[1] + 2)
    if name == "fastv":  # the registered FastV keeps what the readout's attention ranks first, as our test pruner
        ours = llava.wrap(model, LastTokenTopK(), budget=budget, query="prompt")
        ours(**inputs)
        assert vlm.last_in_llm.trace.kept.sort(1).values.tolist() == ours.last_in_llm.trace.kept.sort(1).values.tolist()
    qmodel = qwen_model("qwen2_vl")
    qvlm = qwen_vl.wrap(qmodel, create_allocator(name, **kw), budget=torch.tensor([2, 5]), query="prompt")
    assert torch.isfinite(qvlm(**qwen_batch()).logits).all()
    assert qvlm.last_in_llm.trace.mask.sum(1).tolist() == [2, 5]
    assert qvlm.generate(**qwen_batch(), max_new_tokens=2, do_sample=False).shape[0] == 2


def test_unsupported_cases_raise():
    model = qwen_model("qwen3_vl")  # DeepStack after layers 0 and 1
    vlm = qwen_vl.wrap(model, KeepFirst(layers=(0,)), query="prompt")
    with pytest.raises(ValueError, match="DeepStack"):
        vlm(**qwen_batch())
    with pytest.raises(NotImplementedError, match="Qwen3-VL"):
        qwen_vl.wrap(model, KeepFirst(layers=(1,)), query="prompt").generate(**qwen_batch(), max_new_tokens=1)
    llava_model = tiny_llava()
    inputs = _inputs()
    with pytest.raises(ValueError, match="labels"):
        llava.wrap(llava_model, KeepFirst(), query="prompt")(**inputs, labels=inputs["input_ids"])
    with pytest.raises(ValueError, match="prune_layers"):
        llava.wrap(llava_model, KeepFirst(layers=(1, 0)), query="prompt")(**inputs)


@torch.no_grad()
def test_right_padded_prompts_map_back_through_final_orig(model):
    inputs = make_batch([2, 6], [5, 4], side="right")
    real = inputs["attention_mask"].bool()
    ref = model(**inputs).logits  # right padding: transformers' positions are already contiguous
    vlm = llava.wrap(model, KeepFirst(), query="prompt")
    out = vlm(**inputs).logits  # the pruned layers run left-padded: final.orig says where each slot came from
    final = vlm.last_in_llm.final
    got = torch.zeros_like(ref)
    for b in range(2):
        got[b, final.orig[b][final.valid[b]]] = out[b][final.valid[b]]
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)
