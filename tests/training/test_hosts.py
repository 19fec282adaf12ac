"""Stage 2 on transformers hosts: tiny random LLaVA and Qwen2-VL models with real processors,
built offline; the host frozen, only the allocator trains.

Oracles: the unmodified model's own loss on the same batch (``full`` keeps every token, so the
host's teacher-forced loss must equal it), the closed form of the M-RoPE positions of kept
tokens (cell (r, c) of an image after text ending at s - 1 -> (s, s + r, s + c)), and what the
language model is called with (captured by a removable hook).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from arr_coc.allocators import create_allocator
from arr_coc.training.hosts import (
    LlavaHost,
    QwenVLHost,
    as_host,
    teacher_forced_accuracy,
)
from arr_coc.training.llava_data import ChatCollator, LlavaConversationDataset
from arr_coc.training.module import ARRCOCModule

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
           "<|vision_end|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["USER:", "ASSISTANT:", "system", "user", "assistant", "you", "are", "helpful", "?", "what", "shape", "colour", "is", "the", "red", "blue", "green", "object", "circle", "square", "triangle", "how", "many", "two", "three", "one", "left", "right", "of"]
LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% else %}ASSISTANT: {{ m['content'][0]['text'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)
QWEN_TEMPLATE = (
    "<|im_start|>system you are helpful <|im_end|> "
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }} {% endif %}"
    "{% endfor %}<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
LLAVA_PX = 48  # CLIP patch 8: a 6 x 6 grid
QWEN_PX = 16  # patch 2, merge 2: an 8 x 8 patch grid, 4 x 4 merged


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:],
    )


def tiny_llava(seed: int = 0, strategy: str = "default") -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=LLAVA_PX, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=len(tok), pad_token_id=0, bos_token_id=1,
                                eos_token_id=2, max_position_embeddings=512),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy=strategy, vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": LLAVA_PX}, crop_size={"height": LLAVA_PX, "width": LLAVA_PX}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy=strategy, chat_template=LLAVA_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, proc


def tiny_qwen2_vl(seed: int = 0, version: str = "2") -> tuple[torch.nn.Module, Qwen2VLProcessor]:
    """A tiny random Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``: windowed vision
    attention over 2 x 2 merged cells, so the tower reorders its tokens internally)."""
    tok = tiny_tokenizer()
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}}
    pix = {"patch_size": 2, "temporal_patch_size": 2, "spatial_merge_size": 2}
    torch.manual_seed(seed)
    if version == "2":
        cfg = transformers.Qwen2VLConfig(
            text_config=text, vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, **pix),
            attn_implementation="sdpa", **ids)
        model = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    else:
        cfg = transformers.Qwen2_5_VLConfig(
            text_config=text, vision_config=dict(depth=2, hidden_size=16, out_hidden_size=32, intermediate_size=32,
                                                 num_heads=2, window_size=8, fullatt_block_indexes=[1], **pix),
            attn_implementation="sdpa", **ids)
        model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    pix = {"patch_size": 2, "merge_size": 2, "temporal_patch_size": 2}
    proc = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=QWEN_PX**2, max_pixels=QWEN_PX**2, **pix),
        tokenizer=tok, video_processor=Qwen2VLVideoProcessor(**pix), chat_template=QWEN_TEMPLATE,
    )
    return model, proc


RECORDS = [
    {"id": "a", "image": "img/a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat shape is the red object ?"}, {"from": "gpt", "value": "circle"},
        {"from": "human", "value": "how many blue object ?"}, {"from": "gpt", "value": "two"}]},
    {"id": "b", "image": "img/b.png", "conversations": [
        {"from": "human", "value": "what colour is the square ?\n<image>"}, {"from": "gpt", "value": "green square"}]},
    {"id": "c", "image": "img/c.png", "conversations": [
        {"from": "human", "value": "<image> how many circle ?"}, {"from": "gpt", "value": "three"},
        {"from": "human", "value": "what is left of the triangle ?"}, {"from": "gpt", "value": "one blue circle"}]},
    {"id": "d", "image": "img/d.png", "conversations": [
        {"from": "human", "value": "what shape is left ?\n<image>"}, {"from": "gpt", "value": "triangle"}]},
]


def write_conversations(folder: Path, size: int = 40, records: list | None = None) -> Path:
    """A tiny LLaVA conversation file and its PNG images under ``folder``."""
    records = RECORDS if records is None else records
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for rec in records:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / rec["image"])
    path = folder / "conv.json"
    path.write_text(json.dumps(records))
    return path


def _batch(build, px: int, folder: Path, **model_kw):
    model, proc = build(**model_kw)
    path = write_conversations(folder)
    ds = LlavaConversationDataset(path, folder, image_size=px)
    return model, proc, ChatCollator(proc)([ds[i] for i in range(len(ds))])


def _host(model):
    return QwenVLHost(model, image_size=QWEN_PX) if "Qwen" in type(model).__name__ else LlavaHost(model)


def _model_inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("question_ids", "question_mask", "relevance")}


def _allocate(host, batch, name, budget, **kw):
    enc = host.encode_image(batch)
    tokens = host.project(enc.tokens)
    query, query_mask = host.query(batch)
    alloc = create_allocator(name, **kw) if isinstance(name, str) else name
    out = alloc(tokens, query=query, query_mask=query_mask, budget=budget, grid=enc.grid,
                num_prefix_tokens=enc.num_prefix_tokens)
    return enc, tokens, out


BUILDS = {
    "llava": (tiny_llava, LLAVA_PX, {}),
    "llava_full_strategy": (tiny_llava, LLAVA_PX, {"strategy": "full"}),
    "qwen2_vl": (tiny_qwen2_vl, QWEN_PX, {}),
    "qwen2_5_vl": (tiny_qwen2_vl, QWEN_PX, {"version": "2.5"}),
}


# ---------------------------------------------------------------------------- full == the model
@pytest.mark.parametrize("family", list(BUILDS))
@torch.no_grad()
def test_full_allocation_gives_the_models_own_loss(family, tmp_path):
    build, px, kw = BUILDS[family]
    model, _, batch = _batch(build, px, tmp_path, **kw)
    host = _host(model)
    enc, tokens, out = _allocate(host, batch, "full", 10**6)
    p = enc.num_prefix_tokens
    assert p == (1 if family == "llava_full_strategy" else 0)
    assert enc.grid == ((6, 6) if family.startswith("llava") else (4, 4)) == host.grid
    assert tokens.shape == (4, p + enc.grid[0] * enc.grid[1], host.llm_dim) and tokens.dtype == torch.float32
    ans = host.answer(out.tokens, out.mask, out.positions, batch, prefix=tokens[:, :p])
    ref = model(**_model_inputs(batch))
    torch.testing.assert_close(ans.loss, ref.loss, atol=1e-6, rtol=1e-6)
    # the labels are the answers only: the model's loss over them equals the host's
    torch.testing.assert_close(ans.correct, teacher_forced_accuracy(ref.logits, batch["labels"]))


def test_teacher_forced_accuracy_by_hand():
    labels = torch.tensor([[-100, 3, 1], [-100, 2, -100], [-100, -100, -100]])
    logits = torch.zeros(3, 3, 5)
    logits[0, 0, 3] = logits[0, 1, 1] = 1.0  # row 0: both targets right
    logits[1, 0, 4] = 1.0  # row 1: its one target (2) wrong
    logits[2, :, 0] = 1.0  # row 2: no target: not correct
    assert teacher_forced_accuracy(logits, labels).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="logits/labels"):
        teacher_forced_accuracy(logits, labels[:, :2])


# ---------------------------------------------------------------------------- what the LLM reads
class _Capture:
    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(
            lambda m, a, kw: self.calls.append({k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}),
            with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@torch.no_grad()
def test_llava_language_model_reads_the_kept_tokens_in_place_of_the_image(tmp_path):
    model, _, batch = _batch(tiny_llava, LLAVA_PX, tmp_path)
    host = _host(model)
    budget = torch.tensor([3, 5, 1, 7])
    _, _, out = _allocate(host, batch, "random", budget)
    with _Capture(model.model.language_model) as cap:
        host.answer(out.tokens, out.mask, out.positions, batch)
    (call,) = cap.calls
    real = batch["attention_mask"].sum(1)
    n = 36
    assert call["attention_mask"].sum(1).tolist() == (real - n + budget).tolist()
    emb = model.get_input_embeddings()
    for b in range(4):
        k = int(budget[b])
        img = batch["input_ids"][b].tolist().index(host.image_token_id)  # the image after the text or before it
        got = call["inputs_embeds"][b]
        torch.testing.assert_close(got[img : img + k], out.tokens[b][out.mask[b]])
        # the text after the image follows right after the kept tokens
        torch.testing.assert_close(got[img + k], emb(batch["input_ids"][b, img + n]))
        assert call["position_ids"][b, : int(real[b]) - n + k].tolist() == list(range(int(real[b]) - n + k))


@torch.no_grad()
def test_qwen_kept_tokens_keep_the_mrope_position_of_their_cell(tmp_path):
    from tests.training._helpers import FixedChoice

    model, _, batch = _batch(tiny_qwen2_vl, QWEN_PX, tmp_path)
    host = _host(model)
    # fine cells 0 = (0, 0) and 5 = (1, 1); pooled 2x2 region 3 = (2, 2); the whole 4x4 grid
    _, _, out = _allocate(host, batch, FixedChoice([0, 5, 16 + 3, 20]), 4)
    with _Capture(model.get_decoder()) as cap:
        host.answer(out.tokens, out.mask, out.positions, batch)
    (call,) = cap.calls
    pos = call["position_ids"]  # [3, B, L']
    for b in range(4):
        # the image starts at column s, after s text tokens (positions 0 .. s - 1)
        s = batch["input_ids"][b].tolist().index(host.image_token_id)
        assert pos[:, b, :s].tolist() == [list(range(s))] * 3
        for j, (r, c, _) in enumerate(out.positions[b].tolist()):
            assert pos[:, b, s + j].tolist() == [s, s + r, s + c]
        torch.testing.assert_close(call["inputs_embeds"][b, s : s + 4], out.tokens[b])
        # <|vision_end|> continues at s + max(h, w) of the merged 4 x 4 grid
        assert pos[:, b, s + 4].tolist() == [s + 4] * 3
    n_real = batch["attention_mask"].sum(1)
    assert call["attention_mask"].sum(1).tolist() == (n_real - 16 + 4).tolist()


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_a_few_steps_train_the_allocator_and_leave_the_host_alone(family, tmp_path):
    from arr_coc.training.hub import load_allocator, save_allocator

    build, px, kw = BUILDS[family]
    model, _, batch = _batch(build, px, tmp_path, **kw)
    host_before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    module = ARRCOCModule(_host(model), create_allocator("arr_coc"), budget=6,
                          optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
                          loss_weights={"rate": 0.01})
    assert module.vlm is model and all(not p.requires_grad for p in model.parameters())
    assert {id(p) for p in module.trainable_parameters()} == {id(p) for p in module.allocator.parameters()}
    opt = module.configure_optimizers()
    module.train()
    assert not model.training and module.allocator.training
    alloc_before = {k: v.clone() for k, v in module.allocator.state_dict().items()}
    for _ in range(3):
        total, terms, res = module._loss(batch, module.budget)
        assert torch.isfinite(total) and set(terms) >= {"ce", "rate"}
        assert res["out"].mask.sum(1).le(6).all()
        opt.zero_grad()
        total.backward()
        assert all(p.grad is None for p in model.parameters())
        opt.step()
    changed = [k for k, v in module.allocator.state_dict().items() if not torch.equal(alloc_before[k], v)]
    assert changed
    assert all(torch.equal(v, host_before[k]) for k, v in model.state_dict().items())
    # checkpoints hold the allocator, never the host
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all(k.startswith("allocator.") for k in ckpt["state_dict"])
    # allocator-only export: one line to load, the same allocation
    save_allocator(module.allocator, tmp_path / "alloc", name="arr_coc")
    alloc = load_allocator(tmp_path / "alloc")
    module.eval()
    with torch.no_grad():
        a = module(batch)["out"]
        _, _, b = _allocate(module.host, batch, alloc, 6)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.tokens, b.tokens)


def test_bad_hosts_and_batches_are_named(tmp_path):
    model, _, batch = _batch(tiny_qwen2_vl, QWEN_PX, tmp_path)
    host = _host(model)
    with pytest.raises(ValueError, match="vlm"):
        as_host(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model"):
        LlavaHost(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="image_size"):
        QwenVLHost(model, image_size=18)
    assert isinstance(as_host(model), QwenVLHost)
    with pytest.raises(ValueError, match="batch"):
        host.answer(torch.zeros(4, 2, 32), None, None, {k: v for k, v in batch.items() if k != "labels"})
    mixed = dict(batch, image_grid_thw=batch["image_grid_thw"].clone())
    mixed["image_grid_thw"][0] = torch.tensor([1, 4, 16])
    with pytest.raises(ValueError, match="image_grid_thw"):
        host.encode_image(mixed)
    with pytest.raises(ValueError, match="visual"):
        host.answer(torch.zeros(4, 2, 31), None, None, batch)


def test_a_checkpoint_with_the_allocator_spec_loads_in_one_line(tmp_path):
    import lightning as L

    from arr_coc.training.hub import load_allocator

    model, _, batch = _batch(tiny_llava, LLAVA_PX, tmp_path)
    torch.manual_seed(0)
    spec = {"name": "arr_coc", "config": {"num_heads": 4, "relevance_dim": 24}}  # not the defaults: shapes differ
    alloc = create_allocator(spec["name"], **spec["config"])
    module = ARRCOCModule(_host(model), alloc, budget=6, allocator_spec=spec,
                          optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    loaded = load_allocator(tmp_path / "a.ckpt")
    assert type(loaded) is type(alloc) and set(loaded.state_dict()) == set(alloc.state_dict())
    assert all(torch.equal(v, alloc.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match="allocator_spec"):
        ARRCOCModule(_host(model), alloc, allocator_spec={"config": {}}, optimizer=torch.optim.AdamW)
