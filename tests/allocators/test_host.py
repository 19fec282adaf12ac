"""The host-signal interface and the base VLM's host (vision signals, the LLM run layer by layer)."""

from __future__ import annotations

import pytest
import torch

from arr_coc.allocators import create_allocator
from arr_coc.allocators.host import (
    HostSignals,
    InLLMHost,
    PruneDecision,
    SignalUnavailable,
    request_signal,
    resolve_layer,
)
from arr_coc.training.base_host import (
    BaseVLMHost,
    additive_causal_mask,
    llm_layer_attention,
)
from tests.allocators._tiny import tiny_batch, tiny_vlm


@pytest.fixture(scope="module")
def setup():
    vlm = tiny_vlm()
    pixels, ids, mask = tiny_batch(vlm)
    with torch.no_grad():
        tokens = vlm.encode_image(pixels)
    return vlm, pixels, tokens, ids, mask


def manual_block(blk, x, attn_probs):
    """A timm ViT block's forward written out, with the given attention probabilities [B, H, L, L]."""
    y = blk.norm1(x)
    b, n, _ = y.shape
    qkv = blk.attn.qkv(y).reshape(b, n, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    v = qkv[2]
    o = (attn_probs @ v).transpose(1, 2).reshape(b, n, -1)
    x = x + blk.ls1(blk.attn.proj(blk.attn.norm(o)))
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


@torch.no_grad()
def test_vision_attention_is_the_attention_each_block_applies(setup):
    vlm, pixels, tokens, ids, mask = setup
    host = BaseVLMHost(vlm, pixels, tokens, ids, mask)
    assert isinstance(host, HostSignals) and isinstance(host, InLLMHost)
    vit = vlm.vision
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed((pixels - vlm.pixel_mean) / vlm.pixel_std))))
    for i, blk in enumerate(vit.blocks):
        att = host.vision_attention(i)
        assert att.shape == (3, 2, 17, 17)
        torch.testing.assert_close(att.sum(-1), torch.ones(3, 2, 17))
        # the block's real output is reproduced from our attention probabilities
        want = blk(x)
        torch.testing.assert_close(manual_block(blk, x, att), want, rtol=1e-5, atol=1e-5)
        # keys: head-averaged k of the same block
        y = blk.norm1(x)
        k = blk.attn.qkv(y).reshape(3, 17, 3, 2, 16)[:, :, 1]  # [B, L, H, Dh]
        torch.testing.assert_close(host.vision_keys(i), k.mean(2))
        x = want
    torch.testing.assert_close(vit.norm(x), tokens)
    assert torch.equal(host.vision_attention(-2), host.vision_attention(0))  # negative = from the end
    assert all(len(b.attn._forward_pre_hooks) == 0 for b in vit.blocks)  # hooks removed
    with pytest.raises(ValueError, match="layer"):
        host.vision_attention(2)


def test_missing_signals_name_themselves(setup):
    vlm, pixels, tokens, ids, mask = setup
    host = BaseVLMHost(vlm, pixels, tokens, ids, mask)
    if not getattr(vlm, "has_text_tower", False):
        with pytest.raises(SignalUnavailable, match="text_features"):
            host.text_features()
        with pytest.raises(SignalUnavailable, match="patch_features"):
            host.patch_features()
    with pytest.raises(SignalUnavailable, match="vision_attention"):
        request_signal(None, "vision_attention", -2, requester="cls_attention")
    with pytest.raises(SignalUnavailable, match="'text_features'.*object"):
        request_signal(object(), "text_features")
    with pytest.raises(ValueError, match="vision_tokens"):
        BaseVLMHost(vlm, pixels, tokens + 1.0, ids, mask).vision_attention(-1)
    assert resolve_layer(-1, 4) == 3 and resolve_layer(2, 4) == 2


def test_allocators_still_run_without_a_host_and_accept_one(setup):
    vlm, pixels, tokens, ids, mask = setup
    host = BaseVLMHost(vlm, pixels, tokens, ids, mask)
    out = create_allocator("random")(tokens, budget=4, grid=(4, 4), num_prefix_tokens=1)
    assert out.counts.tolist() == [4, 4, 4]
    # host= is optional for every allocator built on the base class, and ignored by those that read no signal
    with_host = create_allocator("divprune")(tokens, budget=4, grid=(4, 4), num_prefix_tokens=1, host=host)
    assert torch.equal(with_host.indices, create_allocator("divprune")(tokens, budget=4, grid=(4, 4), num_prefix_tokens=1).indices)


# ---------------------------------------------------------------------------- the LLM, layer by layer
class KeepAll:
    """An in-LLM pruner that keeps every visual token after every layer."""

    in_llm = True

    def __init__(self):
        self.states = []

    def prune_layers(self, num_layers):
        return tuple(range(num_layers))

    def prune(self, state):
        self.states.append(state)
        kc = state.num_visual_slots
        keep = torch.arange(kc).expand(state.hidden.shape[0], kc)
        return PruneDecision(keep=torch.where(state.visual_mask, keep, torch.full_like(keep, -1)))


def visual_inputs(vlm, tokens, drop_row0=3):
    """Projected fine tokens [B, N, Dl]; row 0 has its last ``drop_row0`` tokens padded."""
    visual = vlm.project(tokens[:, 1:])
    vmask = torch.ones(visual.shape[:2], dtype=torch.bool)
    vmask[0, -drop_row0:] = False
    return visual, vmask, vlm.fine_positions(visual.shape[0])


@torch.no_grad()
def test_keeping_every_token_reproduces_answer_logits(setup):
    vlm, pixels, tokens, ids, mask = setup
    host = BaseVLMHost(vlm, pixels, tokens, ids, mask)
    visual, vmask, pos = visual_inputs(vlm, tokens)
    want = vlm.answer_logits(visual, vmask, pos, ids, mask)
    pruner = KeepAll()
    got, trace = host.answer_in_llm(pruner, visual, vmask, pos, ids, mask, budget=16, return_trace=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(pruner.states) == 4 and trace.mask.sum(1).tolist() == [13, 16, 16]
    assert torch.equal(trace.kept[1], torch.arange(16))


@torch.no_grad()
def test_recomputed_llm_attention_matches_eager_output_attentions(setup):
    vlm, _, tokens, ids, mask = setup
    assert vlm.llm.config._attn_implementation == "eager"
    visual, vmask, pos = visual_inputs(vlm, tokens)
    inputs, attn2d, pos_ids = vlm.llm_inputs(visual, vmask, pos, ids, mask)
    ref = vlm.llm.model(inputs_embeds=inputs, attention_mask=attn2d, position_ids=pos_ids,
                        output_attentions=True, output_hidden_states=True, use_cache=False)
    model = vlm.llm.model
    mask4 = additive_causal_mask(attn2d.bool(), inputs.dtype)
    real = attn2d.bool()
    for li, layer in enumerate(model.layers):
        h = ref.hidden_states[li]
        att = llm_layer_attention(layer, h, mask4, model.rotary_emb(h, position_ids=pos_ids))
        # rows of real query tokens (padded query rows are masked out of everything that matters)
        torch.testing.assert_close(att[real[:, None, :, None].expand_as(att)],
                                   ref.attentions[li][real[:, None, :, None].expand_as(att)], rtol=1e-5, atol=1e-6)
