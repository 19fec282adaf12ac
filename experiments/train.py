"""Stage 2: train (or evaluate) an allocator on the frozen base VLM, configured by Hydra.

```bash
python experiments/train.py                                   # arr_coc, budget 16, CPU
python experiments/train.py allocator=visionzip budget=64
python experiments/train.py -m allocator=arr_coc,visionzip budget=16,64   # a sweep
python experiments/train.py debug=fast_dev_run                 # one batch each way
python experiments/train.py ckpt_path=<run>/checkpoints/last.ckpt         # resume
python experiments/train.py trainer=ddp_sim                    # 2 CPU processes (gloo)
```

``train(cfg)`` is the testable function (tests compose the config with Hydra's compose
API and call it); ``main`` is the thin ``@hydra.main`` around it that returns the metric
named by ``optimized_metric`` to a sweeper.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "conf")
log = logging.getLogger(__name__)

if not OmegaConf.has_resolver("arr_coc_root"):
    OmegaConf.register_new_resolver("arr_coc_root", lambda: str(ROOT))


def _instantiate_all(node: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a group such as ``callbacks`` or ``logger``."""
    if not node:
        return []
    out = []
    for key, conf in node.items():
        if not isinstance(conf, DictConfig) or "_target_" not in conf:
            raise ValueError(f"{key}: expected a config with a _target_, got {conf!r}")
        out.append(hydra.utils.instantiate(conf))
    return out


def _allocator_spec(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """(name, kwargs) that rebuild the allocator with ``create_allocator`` (for export)."""
    spec = OmegaConf.to_container(cfg.allocator, resolve=True)
    spec.pop("_target_", None)
    name = spec.pop("name")
    return name, spec


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate data, VLM, allocator, module, callbacks, loggers and trainer from ``cfg``."""
    import lightning as L

    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    vlm = hydra.utils.instantiate(cfg.model)
    allocator = hydra.utils.instantiate(cfg.allocator)
    module = hydra.utils.instantiate(
        cfg.module,
        vlm=vlm,
        allocator=allocator,
        # how to rebuild the frozen VLM (its config as YAML: no _target_ left for instantiate)
        backbones={"model": OmegaConf.to_yaml(cfg.model, resolve=True)},
        question_types=list(getattr(datamodule, "question_types", [])),
    )
    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return {"datamodule": datamodule, "vlm": vlm, "allocator": allocator, "module": module, "trainer": trainer}


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and optionally test) the allocator; returns the final metrics as floats.

    An allocator without trainable parameters (the published baselines) is only
    validated, as is any allocator with ``train=false``.
    With ``ckpt_path`` the run resumes from that checkpoint (optimizer, epoch, RNG state)
    and continues as if it had not stopped.
    """
    objs = build(cfg)
    trainer, module, dm = objs["trainer"], objs["module"], objs["datamodule"]
    if cfg.get("train", True) and module.trainable_parameters():
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    else:  # nothing to train (a parameter-free baseline, or train=false): evaluate
        trainer.validate(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test", False):
        ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
        trainer.test(module, datamodule=dm, ckpt_path=ckpt or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if cfg.get("export_allocator", False) and trainer.is_global_zero:
        from arr_coc.training.hub import save_allocator

        name, kwargs = _allocator_spec(cfg)
        folder = save_allocator(module.allocator, Path(cfg.paths.output_dir) / "allocator", name=name, config=kwargs)
        log.info("allocator written to %s", folder)
    return metrics


def optimized_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The metric a sweeper optimises (``cfg.optimized_metric``); a clear error if it is missing."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise ValueError(f"optimized_metric: {name!r} was not logged; logged: {sorted(metrics)}")
    return metrics[name]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    return optimized_value(cfg, train(cfg))


if __name__ == "__main__":
    main()
