"""Stage 2 on a transformers host through the Hydra configs and experiments/train.py:
``model=llava_hf`` / ``model=qwen_vl_hf`` on tiny random models saved to a folder with their
processors (offline), ``data=llava`` reading whole conversations with the host's processor,
and the DDP / FSDP trainer configs composed with Hydra's compose API (no GPU needed)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

pytest.importorskip("transformers")

from arr_coc.training.chat_datamodule import LlavaChatDataModule
from arr_coc.training.hosts import LlavaHost, QwenVLHost
from arr_coc.training.hub import load_allocator
from tests.training.test_hosts import (
    LLAVA_PX,
    QWEN_PX,
    tiny_llava,
    tiny_qwen2_vl,
    write_conversations,
)
from tests.training.test_hydra import make_cfg, train_script

HOSTS = {
    "llava_hf": (tiny_llava, LLAVA_PX, LlavaHost),
    "qwen_vl_hf": (tiny_qwen2_vl, QWEN_PX, QwenVLHost),
}


@pytest.mark.parametrize("option", list(HOSTS))
def test_stage2_trains_an_allocator_on_a_saved_host_through_the_configs(option, tmp_path):
    build, px, cls = HOSTS[option]
    model, proc = build()
    model.save_pretrained(tmp_path / "host")
    proc.save_pretrained(tmp_path / "host")
    data = write_conversations(tmp_path / "data", size=px + 8)
    cfg = make_cfg(tmp_path, [
        f"model={option}", f"model.path={tmp_path / 'host'}", "model.dtype=float32", f"model.image_size={px}",
        "data=llava", f"data.train_json={data}", f"data.image_folder={tmp_path / 'data'}", "data.val_fraction=0.5",
        "data.batch_size=2", "budget=5", "allocator=arr_coc", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "logger=none", "callbacks=model_checkpoint",
    ])
    objs = train_script.build(cfg)
    module, dm = objs["module"], objs["datamodule"]
    assert isinstance(module.host, cls) and isinstance(dm, LlavaChatDataModule)
    assert module.grid == ((6, 6) if option == "llava_hf" else (4, 4))
    host = module.vlm
    assert sum(p.numel() for p in host.parameters()) == sum(p.numel() for p in model.parameters())
    before = {k: v.clone() for k, v in module.allocator.state_dict().items()}
    host_before = {k: v.clone() for k, v in host.state_dict().items()}
    objs["trainer"].fit(module, datamodule=dm)
    metrics = {k: float(v) for k, v in objs["trainer"].callback_metrics.items()}
    assert {"train/ce", "val/acc", "val/ce", "val/tokens"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert 0 < metrics["val/tokens"] <= 5 and 0.0 <= metrics["val/acc"] <= 1.0
    assert any(not torch.equal(before[k], v) for k, v in module.allocator.state_dict().items())
    assert all(torch.equal(host_before[k], v) for k, v in host.state_dict().items())
    # the checkpoint holds the allocator alone; it loads in one line from the run
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert saved and all(k.startswith("allocator.") for k in saved)
    with pytest.raises(ValueError, match="name"):
        load_allocator(ckpt)  # nothing says which allocator it is (yet)
    run_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    (tmp_path / "run" / ".hydra").mkdir()
    OmegaConf.save(run_cfg, tmp_path / "run" / ".hydra" / "config.yaml")  # what hydra.main writes
    alloc = load_allocator(ckpt)
    assert type(alloc) is type(module.allocator)
    assert {f"allocator.{k}" for k in alloc.state_dict()} == set(saved)
    assert all(torch.equal(v, saved[f"allocator.{k}"]) for k, v in alloc.state_dict().items())


@pytest.mark.parametrize("option, strategy", [("ddp", "DDPStrategy"), ("fsdp", "FSDPStrategy")])
def test_gpu_trainers_compose_for_a_host(option, strategy, tmp_path):
    cfg = make_cfg(tmp_path, [f"trainer={option}", "model=llava_hf", "model.path=/models/llava-1.5-7b-hf"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == -1 and cfg.trainer.precision == "bf16-mixed"
    assert cfg.model._target_ == "arr_coc.training.hosts.LlavaHost.from_pretrained"
    assert cfg.data.get("processor", None) is None  # data=embedded: no processor; data=llava reads model.path
    strat = instantiate(cfg.trainer.strategy)
    assert type(strat).__name__ == strategy
    if option == "fsdp":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer

        policy = strat.kwargs["auto_wrap_policy"]
        assert {LlamaDecoderLayer, Qwen2VLDecoderLayer} <= set(policy._module_classes)
        assert strat.kwargs["use_orig_params"] is True and strat._state_dict_type == "full"
    llava = make_cfg(tmp_path, ["model=qwen_vl_hf", "model.path=/m", "data=llava", "data.train_json=x", "data.image_folder=y"])
    assert llava.data.processor == "/m" and llava.data.image_size == 448
