"""Share trained allocators the way the ecosystem shares weights: safetensors plus a config.

```python
from arr_coc.training.hub import load_allocator, save_allocator
save_allocator(allocator, "my-allocator", name="arr_coc", config={"dim": 64})
allocator = load_allocator("my-allocator")          # a local folder, or a Hub repo id
allocator = load_allocator("run/checkpoints/last.ckpt")   # a stage-2 Lightning checkpoint
```

A stage-2 checkpoint (``ARRCOCModule``, whatever the host: the embedded base VLM, LLaVA or
Qwen-VL) holds the allocator's weights only; the arguments that rebuild it come from the
checkpoint (``ARRCOCModule(allocator_spec=...)``), else from the Hydra config of the run that
wrote it (``<run>/.hydra/config.yaml`` beside ``<run>/checkpoints/``, as
``experiments/train.py`` lays runs out), else from ``name=`` / ``config=``.

The folder holds ``model.safetensors`` (the allocator's state dict, prefixed
``allocator.``) and ``config.json`` (``{"name": ..., "allocator_config": {...}}``, the arguments of
``create_allocator``), written by huggingface_hub's ``PyTorchModelHubMixin``; a local
folder loads offline. Only the allocator is stored, never the frozen backbones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from arr_coc.allocators import Allocator, create_allocator

__all__ = ["AllocatorBundle", "load_allocator", "save_allocator"]


class AllocatorBundle(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="arr_coc",
    tags=["arr_coc", "visual-token-allocation"],
):
    """A registered allocator plus the arguments that rebuild it (what the Hub stores).

    Args:
        name: registry name (``arr_coc.allocators.list_allocators()``).
        allocator_config: keyword arguments of ``create_allocator(name, **allocator_config)``;
            JSON-serialisable.
    """

    def __init__(self, name: str, allocator_config: dict[str, Any] | None = None):
        # (not "config": the Hub mixin treats a parameter of that name specially)
        super().__init__()
        self.name = name
        self.allocator_config = dict(allocator_config or {})
        self.allocator = create_allocator(name, **self.allocator_config)

    def forward(self, *args, **kwargs):
        return self.allocator(*args, **kwargs)

    @classmethod
    def _load_as_safetensor(cls, model, model_file: str, map_location: str, strict: bool):
        # through load_state_dict, so that lazy (shape-inferred) parameters are materialised
        # with the stored shapes (safetensors' load_model reads every parameter's storage first)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(model_file, device=map_location), strict=strict)
        model.eval()
        return model


def save_allocator(
    allocator: Allocator, folder: str | Path, *, name: str, config: dict[str, Any] | None = None
) -> Path:
    """Write ``allocator`` (built as ``create_allocator(name, **config)``) to ``folder``.

    Raises ``ValueError`` when ``name``/``config`` do not rebuild a module with the same
    parameter names and shapes (the saved folder would not load). Lazy (shape-inferred)
    parameters are fine: loading materialises them with the stored shapes.
    """
    bundle = AllocatorBundle(name, config)  # positional: allocator_config
    try:  # strict: same names and shapes (lazy parameters take the trained shapes)
        bundle.allocator.load_state_dict(allocator.state_dict(), strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"config: create_allocator({name!r}, **config) does not rebuild this allocator's parameters: {err}"
        ) from err
    folder = Path(folder)
    bundle.save_pretrained(folder)
    return folder


def load_allocator(
    folder_or_repo: str | Path,
    *,
    map_location: str = "cpu",
    name: str | None = None,
    config: dict[str, Any] | None = None,
    **hub_kwargs,
) -> Allocator:
    """The allocator stored by :func:`save_allocator`, or the one in a stage-2 Lightning
    checkpoint (a ``.ckpt`` file; see the module docstring for where its arguments come from;
    ``name`` / ``config`` override them). Strict: every weight must be there."""
    path = Path(folder_or_repo)
    if path.suffix == ".ckpt":
        return _from_lightning_checkpoint(path, map_location, name, config)
    if name is not None or config is not None:
        raise ValueError("name/config: a saved allocator folder names its own; they only apply to a .ckpt file")
    bundle = AllocatorBundle.from_pretrained(
        str(folder_or_repo), map_location=map_location, strict=True, **hub_kwargs
    )
    return bundle.allocator


def _run_allocator_spec(ckpt: Path) -> dict[str, Any] | None:
    """The allocator node of the Hydra config of the run that wrote ``ckpt``, if there is one."""
    cfg_file = ckpt.resolve().parent.parent / ".hydra" / "config.yaml"
    if not cfg_file.is_file():
        return None
    from omegaconf import OmegaConf

    node = OmegaConf.load(cfg_file).get("allocator")
    if node is None:
        return None
    spec = OmegaConf.to_container(node, resolve=True)
    spec.pop("_target_", None)
    return {"name": spec.pop("name"), "config": spec}


def _from_lightning_checkpoint(path: Path, map_location: str, name: str | None, config: dict | None) -> Allocator:
    import torch

    if not path.is_file():
        raise ValueError(f"folder_or_repo: no such checkpoint {str(path)!r}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    state = {k[len("allocator."):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("allocator.")}
    if not state:
        raise ValueError(f"folder_or_repo: {str(path)!r} holds no allocator weights (not a stage-2 checkpoint)")
    spec = (ckpt.get("arr_coc") or {}).get("allocator") or _run_allocator_spec(path) or {}
    name = name if name is not None else spec.get("name")
    if name is None:
        raise ValueError(
            f"name: {str(path)!r} does not say which allocator it holds (no spec in the checkpoint, no "
            ".hydra/config.yaml beside its folder); pass name= and config="
        )
    config = dict(spec.get("config") or {}) if config is None else dict(config)
    bundle = AllocatorBundle(name, config)
    bundle.allocator.load_state_dict(state, strict=True)
    return bundle.allocator.eval()
