"""``arr_coc_host``: training-free greedy conditional MI in a space built from host signals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from arr_coc.allocators import create_allocator, list_allocators
from arr_coc.allocators.arr_coc_host import ArrCocHostAllocator, LayerAttentionProbe, salience_information
from arr_coc.allocators.host import SignalUnavailable
from arr_coc.attending import gaussian_set_mi


class FakeHost:
    """A host with hand-made joint-space signals on a 4 x 4 grid (one [CLS] prefix token)."""

    def __init__(self, patches, text, text_mask, cls_attention=None):
        self.patches, self.text, self.text_mask, self.cls = patches, text, text_mask, cls_attention

    def patch_features(self):
        return self.patches

    def text_features(self):
        return self.text, self.text_mask

    def text_embedding(self):
        return F.normalize(self.text.sum(1), dim=-1)

    def vision_attention(self, layer):
        b, n = self.cls.shape
        att = torch.full((b, 2, 1 + n, 1 + n), 1.0 / (1 + n))
        att[:, :, 0, 1:] = self.cls[:, None]
        att[:, :, 0, 0] = 0.0
        return att


def joint_setup(target=(9, 2), b=2, n=16, dj=6, seed=0):
    """Patch j = target[b] equals the instruction's word direction; the others are random."""
    g = torch.Generator().manual_seed(seed)
    patches = F.normalize(torch.randn(b, n, dj, generator=g), dim=-1)
    word = F.normalize(torch.randn(b, dj, generator=g), dim=-1)
    for i, j in enumerate(target):
        patches[i, j] = word[i]
    filler = F.normalize(torch.randn(b, 1, dj, generator=g), dim=-1)
    text = torch.cat([word[:, None], filler], 1)  # [B, 2, Dj]: the word, then a padded slot
    mask = torch.tensor([[True, False]] * b)
    tokens = torch.randn(b, 1 + n, 8, generator=g)  # the allocator's own tokens (CLS first)
    return FakeHost(patches, text, mask), tokens


def test_registered():
    assert "arr_coc_host" in list_allocators()
    assert isinstance(create_allocator("arr_coc_host"), ArrCocHostAllocator)


@pytest.mark.parametrize("space", ["joint", "sum"])
def test_patch_matching_the_instruction_is_picked_first(space):
    host, tokens = joint_setup()
    alloc = create_allocator("arr_coc_host", alpha=1.0, space=space, prior=None).eval()
    out = alloc(tokens, budget=3, grid=(4, 4), num_prefix_tokens=1, host=host)
    assert out.extras["signal"] == "host"
    assert out.extras["pick_order"][:, 0].tolist() == [9, 2]
    # the padded text slot (a random direction) is ignored: with it unmasked the pick may change,
    # masked it contributes nothing, so the first gain is the twin's capped information
    g0 = out.extras["query_gains"][:, 0]
    w = 1.0 if space == "joint" else 0.5  # Cov(c_j, q) = sqrt(w) cos(z_j, q) in the direct sum
    rho2 = torch.tensor(w / (1 + 1e-6) ** 2, dtype=torch.float64)
    want = -0.5 * torch.log1p(-rho2).item() if space == "sum" else None
    if want is not None:
        torch.testing.assert_close(g0.double(), torch.full((2,), want, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    else:  # the twin of the query: its information is capped by the variance floor
        assert bool((g0 > 4.0).all())


def test_gain_is_the_closed_form_set_information_in_the_joint_space():
    host, tokens = joint_setup(target=(5, 11))
    # no exact twin of the query, and the query in the span of no 4 patches (Dj = 6): no floor is hit
    noise = F.normalize(torch.randn(2, 6, generator=torch.Generator().manual_seed(7)), dim=-1)
    host.patches[0, 5] = F.normalize(host.patches[0, 5] + 0.6 * noise[0], dim=-1)
    host.patches[1, 11] = F.normalize(host.patches[1, 11] + 0.6 * noise[1], dim=-1)
    alloc = create_allocator("arr_coc_host", alpha=0.7, space="joint", prior=None).eval()
    out = alloc(tokens, budget=4, grid=(4, 4), num_prefix_tokens=1, host=host)
    want = gaussian_set_mi(host.patches.double(), host.text.double(), out.extras["pick_order"], host.text_mask)
    torch.testing.assert_close(out.gain.double(), want, rtol=1e-4, atol=1e-5)
    # and the chain rule: the reported total is the sum of the per-pick query gains
    torch.testing.assert_close(out.gain, out.extras["query_gains"].sum(1))


def test_selection_is_deterministic():
    host, tokens = joint_setup()
    host.cls = torch.softmax(torch.randn(2, 16, generator=torch.Generator().manual_seed(3)), -1)
    alloc = create_allocator("arr_coc_host", prior="cls").eval()
    a = alloc(tokens, budget=6, grid=(4, 4), num_prefix_tokens=1, host=host)
    b = alloc(tokens, budget=6, grid=(4, 4), num_prefix_tokens=1, host=host)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.gain, b.gain)


def test_cls_prior_covers_the_salient_patch_without_query_words():
    host, tokens = joint_setup()
    host.text_mask = torch.zeros(2, 2, dtype=torch.bool)  # no real instruction token: alpha acts as 0
    cls = torch.full((2, 16), 0.2 / 15)
    cls[0, 13], cls[1, 6] = 0.8, 0.8
    host.cls = cls
    alloc = create_allocator("arr_coc_host", space="joint", prior="cls", prior_weight=1.0).eval()
    out = alloc(tokens, budget=2, grid=(4, 4), num_prefix_tokens=1, host=host)
    assert out.extras["pick_order"][:, 0].tolist() == [13, 6]
    # u_j = max(0, log(N p_j)): log(16 * 0.8) for the salient patch, 0 for the others
    u = out.extras["prior_information"]
    torch.testing.assert_close(u[0, 13], torch.tensor(math.log(16 * 0.8)))
    assert float(u[0, :13].abs().max()) == 0.0
    torch.testing.assert_close(out.gain, torch.zeros(2))  # no query: I(c_S ; Q) = 0


def test_salience_information_values():
    n = 16
    torch.testing.assert_close(salience_information(torch.ones(2, n), (4, 4)), torch.zeros(2, n))
    torch.testing.assert_close(salience_information(torch.zeros(1, n), (4, 4)), torch.zeros(1, n))  # all-zero: uniform
    p = torch.zeros(1, n)
    p[0, 0] = 3.0
    u = salience_information(p, (4, 4), (1,))  # 16 fine + 4 pooled 2x2 candidates
    assert u.shape == (1, 20)
    torch.testing.assert_close(u[0, 0], torch.tensor(math.log(16.0)))
    assert float(u[0, 1:16].max()) == 0.0
    torch.testing.assert_close(u[0, 16], torch.tensor(math.log(16.0 / 4)))  # the 2x2 region's mean p = 1/4
    assert float(u[0, 17:].max()) == 0.0
    with pytest.raises(ValueError, match="p:"):
        salience_information(-p, (4, 4))


def test_deviation_prior_is_the_relative_token_variance():
    g = torch.Generator().manual_seed(0)
    tokens = 0.01 * torch.randn(1, 17, 8, generator=g)
    tokens[0, 1 + 7] += 5.0  # one token far from the image mean
    alloc = create_allocator("arr_coc_host", alpha=0.0, prior="deviation", prior_weight=1.0).eval()
    out = alloc(tokens, budget=1, grid=(4, 4), num_prefix_tokens=1)
    assert out.extras["signal"] == "tokens" and out.indices.tolist() == [[7]]
    x = tokens[0, 1:]
    v = (x - x.mean(0)).pow(2).sum(-1)
    torch.testing.assert_close(out.extras["prior_information"][0, 7], (16 * v[7] / v.sum()).log())


def test_no_host_falls_back_to_the_tokens():
    host, tokens = joint_setup()
    q = tokens[:, 1 + 4 : 1 + 5]  # the query is token 4 itself, in the tokens' space
    alloc = create_allocator("arr_coc_host", alpha=1.0, space="joint", prior=None).eval()
    out = alloc(tokens, query=q, budget=1, grid=(4, 4), num_prefix_tokens=1)
    assert out.extras["signal"] == "tokens" and out.indices.tolist() == [[4], [4]]
    # a query of another width carries no usable relevance: coverage only, I = 0
    out = alloc(tokens, query=torch.randn(2, 3, 5), budget=2, grid=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(out.gain, torch.zeros(2))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"space": "pixels"}, "space"),
        ({"joint_weight": 1.5}, "joint_weight"),
        ({"text": "words"}, "text"),
        ({"prior": "edges"}, "prior"),
        ({"prior_weight": -1.0}, "prior_weight"),
        ({"prior_layer": 1.5}, "prior_layer"),
        ({"llm_layer": "0"}, "llm_layer"),
        ({"llm_reader": "all"}, "llm_reader"),
        ({"alpha": None}, "alpha"),
        ({"alpha": 2.0}, "alpha"),
        ({"fill": "random"}, "fill"),
        ({"fill": "background", "prior": None}, "fill"),
        ({"fill": "background", "prior_weight": 0.0}, "fill"),
        ({"evidence_threshold": -0.5}, "evidence_threshold"),
        ({"evidence_threshold": float("nan")}, "evidence_threshold"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        create_allocator("arr_coc_host", **kwargs)


def test_bad_host_signals_raise():
    host, tokens = joint_setup()
    host.patches = host.patches[:, :15]
    alloc = create_allocator("arr_coc_host", space="sum").eval()
    with pytest.raises(ValueError, match="host: patch_features"):
        alloc(tokens, budget=3, grid=(4, 4), num_prefix_tokens=1, host=host)

    class NoText:
        def patch_features(self):
            return joint_setup()[0].patches

    with pytest.raises(SignalUnavailable, match="text_features"):
        alloc(tokens, budget=3, grid=(4, 4), num_prefix_tokens=1, host=NoText())
    # the default (token space, LLM prior) needs the LLM's attention, which this host lacks
    with pytest.raises(SignalUnavailable, match="llm_attention"):
        create_allocator("arr_coc_host").eval()(tokens, budget=3, grid=(4, 4), num_prefix_tokens=1, host=NoText())


def test_background_fill_keeps_the_prior_evidence_then_the_least_salient_cells():
    host, tokens = joint_setup()
    g = torch.Generator().manual_seed(5)
    att = torch.rand(2, 3, 4, 17, generator=g) ** 4  # a peaked reading: a few cells carry the question
    host.llm_attention = lambda layer: (att, torch.tensor([[True, True, True, False], [True, True, False, False]]))
    args = dict(budget=6, grid=(4, 4), num_prefix_tokens=1, host=host)
    ref = create_allocator("arr_coc_host").eval()(tokens, **args)
    picks, info = ref.extras["pick_order"], ref.extras["prior_information"]
    x = tokens[:, 1:]
    sal = (x - x.mean(1, keepdim=True)).norm(dim=-1)
    for threshold in (0.0, 0.5, 1e6):
        out = create_allocator("arr_coc_host", fill="background", evidence_threshold=threshold).eval()(tokens, **args)
        is_ev = info.gather(1, picks) > threshold
        assert out.extras["evidence"].tolist() == is_ev.sum(1).tolist() and out.gain is None
        for b in range(2):  # the evidence picks, then the least salient of the other cells
            ev = picks[b][is_ev[b]].tolist()
            rest = [j for j in sal[b].argsort().tolist() if j not in ev][: 6 - len(ev)]
            assert sorted(out.indices[b].tolist()) == sorted(ev + rest)
        if threshold == 0.0:  # the reading is peaked: some picks are evidence, not all
            assert 0 < int(is_ev.sum()) < is_ev.numel()
    # inside the LLM every slot has already read every token: no fill there
    with pytest.raises(ValueError, match="fill"):
        create_allocator("arr_coc_host_llm", fill="background")


@torch.no_grad()
def test_llm_prior_reads_layer_attention_of_the_question():
    from arr_coc.training.base_host import BaseVLMHost
    from tests.allocators._tiny import tiny_batch, tiny_vlm

    vlm = tiny_vlm(text_tower=True)
    pixels, ids, mask = tiny_batch(vlm)
    tokens = vlm.encode_image(pixels)
    projected = vlm.project(tokens)
    host = BaseVLMHost(vlm, pixels, tokens, ids, mask)
    p = vlm.num_prefix_tokens
    fine = projected[:, p:]
    inputs, attn2d, pos = vlm.llm_inputs(fine, None, None, ids, mask)
    ref = vlm.llm.model(inputs_embeds=inputs, attention_mask=attn2d, position_ids=pos, output_attentions=True,
                        use_cache=False)
    k = fine.shape[1]
    text_mask = attn2d[:, k:].bool()
    for layer in (0, 1):
        att = ref.attentions[layer].float().mean(1)[:, k:, :k]  # [B, Tt, K]
        want_q = (att * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True)
        want_r = att[:, -1]
        for reader, want in (("question", want_q), ("readout", want_r)):
            probe = LayerAttentionProbe(layer, reader)
            host.answer_in_llm(probe, fine, None, None, ids, mask, 1)
            torch.testing.assert_close(probe.attention, want, rtol=1e-5, atol=1e-6)
    alloc = create_allocator("arr_coc_host", prior="llm", prior_weight=2.0, llm_layer=0).eval()
    out = alloc(projected, budget=3, grid=vlm.grid, num_prefix_tokens=p, host=host)
    att0 = ref.attentions[0].float().mean(1)[:, k:, :k]
    want = (att0 * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True)
    torch.testing.assert_close(out.extras["llm_attention"], want, rtol=1e-5, atol=1e-6)
    pn = want / want.sum(1, keepdim=True)
    torch.testing.assert_close(out.extras["prior_information"], 2.0 * (k * pn).log().clamp_min(0), rtol=1e-5, atol=1e-5)
    assert out.indices.shape == (3, 3) and bool((out.indices >= 0).all())
    # the token-space variant needs no text tower and reads the same layer
    out_t = create_allocator("arr_coc_host", space="tokens", prior="llm", prior_weight=2.0).eval()(
        projected, query=vlm.query_embeddings(ids), query_mask=mask, budget=3, grid=vlm.grid, num_prefix_tokens=p,
        host=host)
    torch.testing.assert_close(out_t.extras["llm_attention"], want, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_in_llm_variant_prunes_after_its_layer_by_the_same_gain():
    from arr_coc.attending import greedy_conditional_mi
    from arr_coc.training.base_host import BaseVLMHost
    from tests.allocators._tiny import tiny_batch, tiny_vlm

    vlm = tiny_vlm()
    pixels, ids, mask = tiny_batch(vlm)
    tokens = vlm.encode_image(pixels)
    fine = vlm.project(tokens)[:, vlm.num_prefix_tokens :]
    host = BaseVLMHost(vlm, pixels, tokens, ids, mask)
    alloc = create_allocator("arr_coc_host_llm", alpha=0.5, llm_layer=1).eval()
    assert alloc.in_llm and alloc.prune_layers(4) == (1,)
    _, trace = host.answer_in_llm(alloc, fine, None, None, ids, mask, 5, return_trace=True)
    assert trace.mask.sum(1).tolist() == [5, 5, 5]
    # the same decision recomputed from layer 1's output (recorded by a probe that keeps all)
    inputs, attn2d, pos = vlm.llm_inputs(fine, None, None, ids, mask)
    ref = vlm.llm.model(inputs_embeds=inputs, attention_mask=attn2d, position_ids=pos, output_attentions=True,
                        output_hidden_states=True, use_cache=False)
    k = fine.shape[1]
    h = ref.hidden_states[2]  # the output of layer 1
    tm = attn2d[:, k:].bool()
    att = ref.attentions[1].float().mean(1)[:, k:, :k]
    a = (att * tm[..., None]).sum(1) / tm.sum(1, keepdim=True)
    u = (k * a / a.sum(1, keepdim=True)).log().clamp_min(0)
    res = greedy_conditional_mi(h[:, :k], h[:, k:], tm, 5, 0.5, 0.0, unary=u)
    want = res.indices.sort(1).values
    assert torch.equal(trace.kept.sort(1).values, want)


def test_llm_prior_reads_a_plugin_hosts_llm_attention():
    """A host with ``llm_attention(layer)`` (the LLaVA / Qwen-VL plug-ins) is read directly."""
    host, tokens = joint_setup()
    g = torch.Generator().manual_seed(5)
    att = torch.rand(2, 3, 4, 17, generator=g)  # [B, H, T, P+N]
    qmask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    calls = []

    def llm_attention(layer):
        calls.append(layer)
        return att, qmask

    host.llm_attention = llm_attention
    alloc = create_allocator("arr_coc_host", space="tokens", prior="llm", llm_layer=2).eval()
    out = alloc(tokens, budget=4, grid=(4, 4), num_prefix_tokens=1, host=host)
    a = att.mean(1)[:, :, 1:]
    want = torch.stack([a[0, :3].mean(0), a[1, :2].mean(0)])
    torch.testing.assert_close(out.extras["llm_attention"], want)
    assert calls == [2]
    alloc_r = create_allocator("arr_coc_host", space="tokens", prior="llm", llm_reader="readout").eval()
    out = alloc_r(tokens, budget=4, grid=(4, 4), num_prefix_tokens=1, host=host)
    torch.testing.assert_close(out.extras["llm_attention"], torch.stack([a[0, 2], a[1, 1]]))
    # the most attended patch, with a large prior weight, is the first pick
    big = create_allocator("arr_coc_host", space="tokens", prior="llm", prior_weight=10.0, alpha=0.0).eval()
    out = big(tokens, budget=1, grid=(4, 4), num_prefix_tokens=1, host=host)
    assert out.indices[:, 0].tolist() == want.argmax(1).tolist()
