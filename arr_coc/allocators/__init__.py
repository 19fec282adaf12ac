"""Allocators behind one contract, and the registry that builds them by name.

``from arr_coc.allocators import create_allocator, list_allocators``
"""

from arr_coc.allocators.base import AllocationContext, AllocationOutput, Allocator, Selection, topk_indices
from arr_coc.allocators.registry import create_allocator, list_allocators, register_allocator
from arr_coc.allocators import simple  # noqa: F401  (registers full, random)

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
