"""Share trained allocators the way the ecosystem shares weights: safetensors plus a config.

```python
from arr_coc.training.hub import load_allocator, save_allocator
save_allocator(allocator, "my-allocator", name="arr_coc", config={"dim": 64})
allocator = load_allocator("my-allocator")          # a local folder, or a Hub repo id
```

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


def load_allocator(folder_or_repo: str | Path, *, map_location: str = "cpu", **hub_kwargs) -> Allocator:
    """The allocator stored by :func:`save_allocator` (strict: every weight must be there)."""
    bundle = AllocatorBundle.from_pretrained(
        str(folder_or_repo), map_location=map_location, strict=True, **hub_kwargs
    )
    return bundle.allocator
