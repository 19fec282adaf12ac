"""End to end with real transformers processors built offline: the plug-ins' default query is the question.

A LlavaProcessor and a Qwen2VLProcessor are built from the tiny tokenizers of ``_templates``
(the families' chat templates) and image processors with small sizes; the tiny random models
share their vocabularies. ``wrap(..., processor=processor)`` must hand the allocator exactly
the input embeddings of the user's question, whatever the system prompt and template around it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from _templates import FAMILIES  # noqa: E402

from arr_coc.allocators import create_allocator  # noqa: E402
from arr_coc.integrations import llava, qwen_vl  # noqa: E402

QUESTIONS = ["How many red cubes are there?", "Is there a dog on the sofa?"]
SYSTEM = {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]}


class Recording(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, tokens, query=None, query_mask=None, **kw):
        self.calls.append((query, query_mask))
        return create_allocator("full")(tokens, query, query_mask, **kw)


def _messages(q: str, system: bool) -> list[dict]:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}
    return [SYSTEM, user] if system else [user]


def _images(n: int, side: int) -> list[np.ndarray]:
    rs = np.random.RandomState(0)
    return [rs.randint(0, 255, (side, side, 3), dtype=np.uint8) for _ in range(n)]


def _check(rec, model, tok, inputs):
    table = model.get_input_embeddings().weight
    queries = [q for call in rec.calls for q in zip(*call)]  # (query [T, D], mask [T]) per image, grid order
    assert len(queries) == len(QUESTIONS)
    for (q, m), text in zip(queries, QUESTIONS):
        ids = torch.cdist(q[m], table).argmin(-1)  # back from embeddings to token ids
        torch.testing.assert_close(q[m], table[ids], atol=0, rtol=0)
        assert tok.decode(ids.tolist()).strip() == text


@torch.no_grad()
def test_llava_processor_question_only():
    template, build, _ = FAMILIES["llava_1_5"]
    tok = build(template)
    tok.padding_side = "left"
    proc = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=template)
    texts = [proc.apply_chat_template(_messages(q, system=i == 1), add_generation_prompt=True)
             for i, q in enumerate(QUESTIONS)]
    inputs = proc(images=_images(2, 48), text=texts, padding=True, return_tensors="pt")
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=48, patch_size=8),
        text_config=transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    rec = Recording()
    out = llava.wrap(model, rec, processor=proc)(**inputs).logits
    assert torch.isfinite(out).all()
    _check(rec, model, tok, inputs)


@torch.no_grad()
def test_qwen2_vl_processor_question_only():
    template, build, _ = FAMILIES["qwen2_vl"]
    tok = build(template)
    tok.padding_side = "left"
    proc = transformers.Qwen2VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(patch_size=2, temporal_patch_size=2, merge_size=2,
                                                           min_pixels=16 * 16, max_pixels=16 * 16),
        tokenizer=tok, video_processor=transformers.Qwen2VLVideoProcessor(), chat_template=template)
    texts = [proc.apply_chat_template(_messages(q, system=i == 1), add_generation_prompt=True)
             for i, q in enumerate(QUESTIONS)]
    inputs = proc(images=_images(2, 16), text=texts, padding=True, return_tensors="pt")
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    torch.manual_seed(0)
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2,
                           temporal_patch_size=2, spatial_merge_size=2),
        **ids, attn_implementation="sdpa")
    model = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    rec = Recording()
    inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    out = qwen_vl.wrap(model, rec, processor=proc)(**inputs).logits
    assert torch.isfinite(out).all()
    _check(rec, model, tok, inputs)
