"""Relevance sources and host signals of the plug-ins, against transformers' own outputs.

Oracles: eager attention weights and ``output_hidden_states`` of the unmodified models
(the signals must be exactly those), a direct computation of the CLIP joint-space features,
and the allocator run by hand on the scoring-space tensors (the plug-in must select the
same candidates and hand the language model the projected tokens of those candidates).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_llava import IMG, N, hf_positions, make_batch, tiny_llava  # noqa: E402
from test_qwen_vl import _batch as qwen_batch  # noqa: E402
from test_qwen_vl import _model as qwen_model  # noqa: E402

from arr_coc.allocators import create_allocator  # noqa: E402
from arr_coc.integrations import llava, qwen_vl  # noqa: E402
from arr_coc.integrations._common import text_query  # noqa: E402
from arr_coc.integrations.signals import LLMLayer, TextTower  # noqa: E402
from arr_coc.pyramid import build_pyramid  # noqa: E402


class Recorder(torch.nn.Module):
    """Wraps an allocator, reads what its host offers, and records the call."""

    reads_host = True

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, tokens, query=None, query_mask=None, host=None, **kw):
        self.calls.append({"tokens": tokens, "query": query, "query_mask": query_mask, "host": host, **kw})
        return self.inner(tokens, query=query, query_mask=query_mask, **kw)


def _llava_batch(prefix: int):
    return make_batch([2, 7, 4], [5, 1, 3], n=N + prefix)


@pytest.mark.parametrize("strategy", ["default", "full"])
@torch.no_grad()
def test_llava_vision_attention_and_keys_are_the_towers(strategy):
    model = tiny_llava(strategy=strategy)
    prefix = int(strategy == "full")
    inputs = _llava_batch(prefix)
    rec = Recorder(create_allocator("full"))
    llava.wrap(model, rec, query="prompt")(**inputs)
    host = rec.calls[0]["host"]
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    ref = tower(pixel_values=inputs["pixel_values"], output_attentions=True).attentions  # per block [I, H, 37, 37]
    drop = 1 - prefix  # the "default" strategy drops the CLS: the allocator sees 36 tokens
    for layer in (0, -1):
        att = host.vision_attention(layer)
        want = ref[layer][:, :, drop:, drop:]
        assert att.shape == (3, 2, N + prefix, N + prefix)
        if prefix:
            torch.testing.assert_close(att, want, atol=1e-6, rtol=0)
        else:  # softmax over the 37 tower tokens, restricted to the 36 patches: the same up to the CLS column
            torch.testing.assert_close(att / att.sum(-1, keepdim=True), want / want.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    assert host.vision_keys(-2).shape == (3, N + prefix, 16)


@torch.no_grad()
def test_llava_llm_layer_relevance_is_the_models_hidden_state():
    model = tiny_llava()
    inputs = _llava_batch(0)
    rec = Recorder(create_allocator("arr_coc"))
    vlm = llava.wrap(model, rec, budget=5, query="prompt", relevance=LLMLayer(0))
    s = vlm.prepare(**inputs)
    mask = inputs["attention_mask"]
    ref = model(**inputs, position_ids=hf_positions(mask), output_hidden_states=True)
    hidden = ref.hidden_states[1]  # after decoder layer 0
    img = torch.stack([hidden[b][inputs["input_ids"][b] == IMG] for b in range(3)])
    call = rec.calls[0]
    torch.testing.assert_close(call["tokens"], img, atol=1e-5, rtol=0)
    text = mask.bool() & (inputs["input_ids"] != IMG)
    q, qm = text_query(hidden, text)
    torch.testing.assert_close(call["query"], q, atol=1e-5, rtol=0)
    assert torch.equal(call["query_mask"], qm)
    # the same choice as the allocator on those tensors, and the LLM gets the projected features of it
    direct = create_allocator("arr_coc")(img, query=q, query_mask=qm, budget=5, grid=(6, 6))
    assert torch.equal(s.allocation.indices, direct.indices)
    feats = torch.stack(list(model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output))
    cand = build_pyramid(feats, (6, 6), create_allocator("arr_coc").pyramid_levels).candidates
    assert (direct.indices >= 36).any()  # pooled candidates too: pooled in the LLM space
    want = cand.gather(1, direct.indices.clamp(min=0)[..., None].expand(-1, -1, 64))
    torch.testing.assert_close(s.allocation.tokens[s.allocation.mask], want[direct.mask], atol=1e-6, rtol=0)
    # the attention signal: the eager weights of the question rows on the image's columns
    eager = tiny_llava()
    eager.set_attn_implementation("eager")
    att = eager(**inputs, position_ids=hf_positions(mask), output_attentions=True).attentions[1]
    rec2 = Recorder(create_allocator("full"))
    llava.wrap(eager, rec2, query="prompt")(**inputs)
    got, gmask = rec2.calls[0]["host"].llm_attention(1)
    for b in range(3):
        rows = torch.nonzero(text[b]).flatten()
        cols = torch.nonzero(inputs["input_ids"][b] == IMG).flatten()
        torch.testing.assert_close(got[b][:, : len(rows)], att[b][:, rows][:, :, cols], atol=1e-6, rtol=0)
        assert gmask[b].sum() == len(rows)


def _tiny_clip(vision_cfg):
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77, eos_token_id=98),
        vision_config=vision_cfg.to_dict(), projection_dim=16)
    torch.manual_seed(3)
    return transformers.CLIPModel(cfg).eval()


class WordTokenizer:
    """Whitespace words -> ids by a fixed hash; the last id is the end token (CLIP pools there)."""

    def __call__(self, texts, padding=True, truncation=True, max_length=77, return_tensors="pt"):
        rows = [[sum(map(ord, w)) % 97 + 1 for w in t.split()][: max_length - 1] + [98] for t in texts]
        n = max(map(len, rows))
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (torch.arange(n)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()}


class HostTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


@torch.no_grad()
def test_llava_text_tower_relevance_is_the_clip_joint_space():
    model = tiny_llava()
    clip = _tiny_clip(model.config.vision_config)
    tower = TextTower(clip, WordTokenizer(), HostTokenizer())
    inputs = _llava_batch(0)
    rec = Recorder(create_allocator("arr_coc"))
    vlm = llava.wrap(model, rec, budget=4, query="prompt", relevance="text_tower", text_tower=tower)
    s = vlm.prepare(**inputs)
    call = rec.calls[0]
    vm = clip.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
    patches = torch.nn.functional.normalize(clip.visual_projection(clip.vision_model.post_layernorm(vm))[:, 1:], dim=-1)
    torch.testing.assert_close(call["tokens"], patches, atol=1e-6, rtol=0)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    texts = [" ".join(f"w{i}" for i in ids[b][mask[b] & (ids[b] != IMG)].tolist()) for b in range(3)]
    enc = WordTokenizer()(texts)
    t = clip.text_model(**enc).last_hidden_state
    want = torch.nn.functional.normalize(clip.text_projection(t), dim=-1)
    torch.testing.assert_close(call["query"], want, atol=1e-6, rtol=0)
    assert torch.equal(call["query_mask"], enc["attention_mask"].bool())
    direct = create_allocator("arr_coc")(patches, query=want, query_mask=enc["attention_mask"].bool(), budget=4, grid=(6, 6))
    assert torch.equal(s.allocation.indices, direct.indices)
    # CDPruner reads the pooled text embedding and the patches from the host
    cd = llava.wrap(model, "cdpruner", budget=4, query="prompt", text_tower=tower).prepare(**inputs)
    assert cd.allocation.extras["signal"] == "host"
    pooled = torch.nn.functional.normalize(clip.text_projection(clip.text_model(**enc).pooler_output), dim=-1)
    torch.testing.assert_close(call["host"].text_embedding(), pooled, atol=1e-6, rtol=0)


@torch.no_grad()
def test_qwen_llm_layer_relevance_and_what_is_unavailable():
    model = qwen_model("qwen2_vl")
    inputs = qwen_batch()
    rec = Recorder(create_allocator("arr_coc"))
    qwen_vl.wrap(model, rec, budget=3, query="prompt", relevance=LLMLayer(0))(**inputs)
    model.model.rope_deltas = None
    hidden = model(**inputs, output_hidden_states=True).hidden_states[1]
    for call, (b, n) in zip(rec.calls, [(0, 6), (1, 8)]):  # one call per image size, in grid order
        cols = torch.nonzero(inputs["input_ids"][b] == 120).flatten()
        assert cols.numel() == n
        torch.testing.assert_close(call["tokens"][0], hidden[b, cols], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="text tower"):
        qwen_vl.wrap(model, "arr_coc", relevance="text_tower")
    with pytest.warns(UserWarning, match="host-free"):
        out = qwen_vl.wrap(model, "cls_attention", budget=2, query="prompt")(**inputs)
    assert out.prepared.kept.tolist() == [2, 2]
    with pytest.raises(ValueError, match="merged tokens"):
        llava.wrap(tiny_llava(), "tome", budget=4, query="prompt", relevance=LLMLayer(0)).prepare(**_llava_batch(0))


@pytest.mark.parametrize("strategy", ["default", "full"])
@torch.no_grad()
def test_llava_vision_output_through_the_projector_is_the_image_features(strategy):
    model = tiny_llava(strategy=strategy)
    prefix = int(strategy == "full")
    inputs = _llava_batch(prefix)
    rec = Recorder(create_allocator("full"))
    llava.wrap(model, rec, query="prompt")(**inputs)
    host = rec.calls[0]["host"]
    feats = torch.stack(list(model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output))
    vo = host.vision_output()
    assert vo.shape == (3, N + prefix, 32)
    torch.testing.assert_close(host.to_token_space(vo), feats, atol=1e-6, rtol=0)
    # VisionZip merges there, as its release does
    s = llava.wrap(model, "visionzip", budget=8, query="prompt").prepare(**inputs)
    assert s.allocation.extras.get("merge_space") == "vision" and s.allocation.counts.tolist() == [8] * 3
