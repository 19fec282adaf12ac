"""``pool``: uniform grid pooling to about ``budget`` tokens.

The pooling baseline of the token-reduction literature (e.g. 24 x 24 LLaVA patches
average-pooled 3 x 3 to 8 x 8 = 64 tokens). It ignores content and the query entirely;
only the grid and the budget decide what it returns. Two modes:

- ``"adaptive"`` (default): pool the H x W grid to the h' x w' grid with h' w' <= budget
  closest to the grid's aspect ratio: ``h' = clamp(floor(sqrt(budget H / W)), 1, H)``,
  ``w' = min(W, floor(budget / h'))``, then ``h' = min(H, floor(budget / w'))``. Region
  (i, j) covers fine rows ``[floor(i H / h'), floor((i + 1) H / h'))`` and the like for
  columns (a partition, sizes differ by at most one), and its token is the area average.
  At 24 x 24 this gives 8 x 8 for 64, 12 x 12 for 144. The pooled token is reported at the
  index and position of the region's top-left fine patch (the pyramid's convention for a
  region's corner); the contract's ``level`` only names power-of-two pyramid levels, so it
  reads 0 here and ``extras["regions"]`` holds each region's [row0, col0, row1, col1) box.
- ``"pyramid"``: the finest power-of-two pyramid level (2 x 2, 4 x 4, ... pooled
  candidates of :mod:`arr_coc.pyramid`) with at most ``budget`` regions; exact level
  positions, but only 1/4, 1/16, ... of N are reachable (576 -> 144, 36, 9, ...).

Either way fewer than ``budget`` tokens may come back (``fixed_budget = False``). Being
spatial, permuting the patch tokens leaves the chosen indices unchanged (the tokens follow
their patches); the contract tests check exactly that for this method.
"""

from __future__ import annotations

import math

import torch

from arr_coc.allocators.base import AllocationContext, AllocationOutput, Allocator, Selection
from arr_coc.allocators.registry import register_allocator
from arr_coc.token_scores import working_dtype

__all__ = ["PoolAllocator", "pooled_grid", "region_bounds"]


def pooled_grid(budget: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The pooled grid (h', w') with h' w' <= budget chosen for an H x W grid (budget >= 1)."""
    h, w = grid
    if budget < 1:
        raise ValueError(f"budget: expected >= 1, got {budget}")
    hp = min(max(int(math.floor(math.sqrt(budget * h / w))), 1), h)
    wp = min(max(budget // hp, 1), w)
    hp = min(max(budget // wp, 1), h)
    return hp, wp


def region_bounds(size: int, parts: int, device: torch.device | None = None) -> torch.Tensor:
    """[parts + 1] long boundaries ``floor(i * size / parts)`` of an even partition of range(size)."""
    return torch.div(torch.arange(parts + 1, device=device) * size, parts, rounding_mode="floor")


def _membership(size: int, parts: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[parts, size] 0/1 matrix: which fine rows (or columns) each region covers."""
    b = region_bounds(size, parts, device)
    idx = torch.arange(size, device=device)
    return ((idx[None, :] >= b[:-1, None]) & (idx[None, :] < b[1:, None])).to(dtype)


@register_allocator("pool")
class PoolAllocator(Allocator):
    """Uniform grid pooling (content- and query-agnostic).

    Args:
        mode: ``"adaptive"`` (default) or ``"pyramid"`` (see the module docstring).
    """

    fixed_budget = False

    def __init__(self, *, mode: str = "adaptive"):
        super().__init__()
        if mode not in ("adaptive", "pyramid"):
            raise ValueError(f"mode: expected 'adaptive' or 'pyramid', got {mode!r}")
        self.mode = mode

    def forward(
        self, patch_tokens, query=None, query_mask=None, budget=64, grid=None, num_prefix_tokens=0, *, host=None
    ) -> AllocationOutput:
        if self.mode == "pyramid":
            g, _ = self._validate(patch_tokens, query, query_mask, budget, grid, num_prefix_tokens)
            top = max(1, math.ceil(math.log2(max(g)))) if max(g) > 1 else 1
            self.pyramid_levels = tuple(range(1, top + 1))  # up to a single region
        return super().forward(patch_tokens, query, query_mask, budget, grid, num_prefix_tokens, host=host)

    def select(self, ctx: AllocationContext) -> Selection:
        if self.mode == "pyramid":
            return self._select_pyramid(ctx)
        return self._select_adaptive(ctx)

    def _select_pyramid(self, ctx: AllocationContext) -> Selection:
        sizes = torch.tensor(ctx.pyramid.level_sizes, device=ctx.fine.device)  # [L + 1], fine first
        offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        fits = sizes[None, :] <= ctx.budget[:, None]  # [B, L + 1]
        fits[:, 0] = False  # budget < N here: the fine level never fits
        # finest fitting level = the first True; rows with budget 0 get none
        level = torch.where(fits.any(1), fits.long().argmax(1), torch.full_like(ctx.budget, -1))
        count = torch.where(level >= 0, sizes[level.clamp(min=0)], torch.zeros_like(level))
        width = int(count.max().item()) if count.numel() else 0
        slot = torch.arange(width, device=ctx.fine.device)[None, :]
        idx = offsets[level.clamp(min=0)][:, None] + slot
        return Selection(indices=torch.where(slot < count[:, None], idx, torch.full_like(idx, -1)),
                         extras={"level": level})

    def _select_adaptive(self, ctx: AllocationContext) -> Selection:
        fine = ctx.fine
        b, n, d = fine.shape
        h, w = ctx.grid
        x = fine.to(working_dtype(fine)).reshape(b, h, w, d)
        budgets = ctx.budget.tolist()
        shapes = {k: pooled_grid(k, (h, w)) for k in set(budgets) if k > 0}
        width = max((hp * wp for hp, wp in shapes.values()), default=0)
        indices = torch.full((b, width), -1, dtype=torch.long, device=fine.device)
        tokens = x.new_zeros(b, width, d)
        regions = torch.full((b, width, 4), -1, dtype=torch.long, device=fine.device)
        for k, (hp, wp) in shapes.items():  # one pass per distinct budget, not per example
            rows = (ctx.budget == k).nonzero(as_tuple=True)[0]
            ar, ac = _membership(h, hp, fine.device, x.dtype), _membership(w, wp, fine.device, x.dtype)
            area = ar.sum(1)[:, None] * ac.sum(1)[None, :]  # [h', w']
            pooled = torch.einsum("ih,rhwd,jw->rijd", ar, x[rows], ac) / area[..., None]
            br, bc = region_bounds(h, hp, fine.device), region_bounds(w, wp, fine.device)
            anchor = (br[:-1, None] * w + bc[None, :-1]).reshape(-1)
            box = torch.stack(torch.broadcast_tensors(br[:-1, None], bc[None, :-1], br[1:, None], bc[None, 1:]), -1)
            m = hp * wp
            indices[rows, :m] = anchor
            tokens[rows, :m] = pooled.reshape(len(rows), m, d)
            regions[rows, :m] = box.reshape(m, 4)
        return Selection(indices=indices, tokens=tokens.to(fine.dtype), extras={"regions": regions})
