"""timm-style registry of allocators: ``create_allocator(name, **cfg)``, ``list_allocators()``."""

from __future__ import annotations

import warnings
from typing import Callable, TypeVar

from arr_coc.allocators.base import Allocator

__all__ = ["create_allocator", "list_allocators", "register_allocator"]

_REGISTRY: dict[str, Callable[..., Allocator]] = {}
T = TypeVar("T", bound=Callable[..., Allocator])


def register_allocator(name: str) -> Callable[[T], T]:
    """Register a class or factory under ``name`` (warns when a name is overwritten)."""

    def deco(fn: T) -> T:
        if name in _REGISTRY:
            warnings.warn(f"allocator {name!r} is registered again; the new one replaces it", stacklevel=2)
        _REGISTRY[name] = fn
        return fn

    return deco


def create_allocator(name: str, **cfg) -> Allocator:
    """Build a registered allocator by name with keyword configuration."""
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown allocator {name!r}; known: {', '.join(list_allocators())}")
    return _REGISTRY[name](**cfg)


def list_allocators() -> list[str]:
    """Names of the registered allocators, sorted."""
    return sorted(_REGISTRY)
