"""Reference allocators that need no model: ``full`` and ``random``."""

from __future__ import annotations

import torch

from arr_coc.allocators.base import AllocationContext, Allocator, Selection, topk_indices
from arr_coc.allocators.registry import register_allocator

__all__ = ["FullAllocator", "RandomAllocator"]


@register_allocator("full")
class FullAllocator(Allocator):
    """Keeps every fine token whatever the budget (the unpruned reference).

    ``ignores_budget`` tells generic code (the contract tests, sweeps) that its count is
    always N, at every budget including 0.
    """

    ignores_budget = True

    def forward(self, patch_tokens, query=None, query_mask=None, budget=64, grid=None, num_prefix_tokens=0, *, host=None):
        if isinstance(patch_tokens, torch.Tensor) and patch_tokens.dim() == 3:
            # the budget is not used, but a bad one is still bad input (checked on an empty view:
            # the tokens themselves are checked once, by the base class)
            self._validate(patch_tokens[..., :0], query, query_mask, budget, grid, num_prefix_tokens)
        n = patch_tokens.shape[1] - num_prefix_tokens
        return super().forward(patch_tokens, query, query_mask, max(n, 0), grid, num_prefix_tokens, host=host)

    def select(self, ctx: AllocationContext) -> Selection:  # pragma: no cover - budget >= N always
        raise AssertionError("unreachable: full always takes the budget >= N path")


@register_allocator("random")
class RandomAllocator(Allocator):
    """Uniformly random fine tokens (a strong baseline). ``seed`` makes it reproducible."""

    def __init__(self, seed: int | None = None):
        super().__init__()
        self.seed = seed

    def select(self, ctx: AllocationContext) -> Selection:
        gen = None
        if self.seed is not None:
            gen = torch.Generator(device=ctx.fine.device).manual_seed(self.seed)
        scores = torch.rand(ctx.batch_size, ctx.num_fine, generator=gen, device=ctx.fine.device)
        return Selection(indices=topk_indices(scores, ctx.budget))
