"""Allocators behind one contract, and the registry that builds them by name.

``from arr_coc.allocators import create_allocator, list_allocators``

Every module of this package registers its allocators on import; importing the package
imports them all, so ``list_allocators()`` is complete.
"""

import importlib
import pkgutil

from arr_coc.allocators.base import AllocationContext, AllocationOutput, Allocator, Selection, topk_indices
from arr_coc.allocators.registry import create_allocator, list_allocators, register_allocator

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "registry") and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "AllocationContext",
    "AllocationOutput",
    "Allocator",
    "Selection",
    "create_allocator",
    "list_allocators",
    "register_allocator",
    "topk_indices",
]
