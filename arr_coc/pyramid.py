"""The candidate pyramid: fine patch tokens plus pooled tokens of 2x2 and 4x4 regions.

Every allocator chooses among *candidates*. The candidate list is always laid out as the
N = H x W fine tokens in raster order, followed by each pooled level in raster order of its
own (coarser) grid. Each candidate has a position ``(row, col, level)``: ``row`` and ``col``
are the fine-grid coordinates of the region's top-left patch, ``level`` is log2 of the
pooling factor (0 = fine, 1 = 2x2, 2 = 4x4). Grids that do not divide by the pooling
factor get a smaller last region (average over the patches that exist).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = ["Pyramid", "build_pyramid", "coverage_mask", "pyramid_positions", "raster_key"]


@dataclass
class Pyramid:
    """Candidates of one batch.

    candidates: [B, M, D] fine tokens first, then pooled levels.
    positions:  [M, 3] long (row, col, level), shared by the batch.
    level_sizes: number of candidates per level, fine first (sums to M).
    grid: the fine grid (H, W).
    """

    candidates: torch.Tensor
    positions: torch.Tensor
    level_sizes: tuple[int, ...]
    grid: tuple[int, int]

    @property
    def num_fine(self) -> int:
        return self.level_sizes[0]


def _coarse_shape(grid: tuple[int, int], factor: int) -> tuple[int, int]:
    h, w = grid
    return -(-h // factor), -(-w // factor)


def pyramid_positions(
    grid: tuple[int, int], levels: tuple[int, ...] = (1, 2), device: torch.device | None = None
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Positions [M, 3] (row, col, level) of the fine grid plus the given pooled levels."""
    h, w = grid
    blocks, sizes = [], []
    for level in (0, *levels):
        factor = 2**level
        hc, wc = _coarse_shape(grid, factor)
        rows = torch.arange(hc, device=device) * factor
        cols = torch.arange(wc, device=device) * factor
        rr, cc = torch.meshgrid(rows, cols, indexing="ij")
        lv = torch.full_like(rr, level)
        blocks.append(torch.stack([rr, cc, lv], dim=-1).reshape(-1, 3))
        sizes.append(hc * wc)
    return torch.cat(blocks).long(), tuple(sizes)


def build_pyramid(
    fine: torch.Tensor, grid: tuple[int, int], levels: tuple[int, ...] = (1, 2)
) -> Pyramid:
    """Fine tokens [B, N, D] on an H x W grid -> candidates [B, M, D] with positions.

    ``levels=()`` gives the fine tokens alone. Pooled tokens are area averages.
    """
    h, w = grid
    if fine.shape[1] != h * w:
        raise ValueError(f"fine: expected {h * w} tokens for grid {grid}, got {fine.shape[1]}")
    maps = rearrange(fine, "b (h w) d -> b d h w", h=h, w=w)
    parts = [fine]
    for level in levels:
        factor = 2**level
        pooled = F.avg_pool2d(
            maps.float() if maps.dtype in (torch.float16, torch.bfloat16) and maps.device.type == "cpu" else maps,
            kernel_size=factor,
            stride=factor,
            ceil_mode=True,
            count_include_pad=False,
        ).to(fine.dtype)
        parts.append(rearrange(pooled, "b d h w -> b (h w) d"))
    positions, sizes = pyramid_positions(grid, levels, device=fine.device)
    return Pyramid(torch.cat(parts, dim=1), positions, sizes, (h, w))


def raster_key(positions: torch.Tensor, grid: tuple[int, int], max_level: int = 8) -> torch.Tensor:
    """Sort key for raster order: by top-left (row, col), coarse before fine at one corner.

    positions: [..., 3] (row, col, level) -> [...] long.
    """
    h, w = grid
    row, col, level = positions.unbind(-1)
    return (row * w + col) * (max_level + 1) + (max_level - level)


def coverage_mask(positions: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Fine patches covered by the kept tokens.

    positions: [B, K, 3] long (row, col, level); a token at level l covers the
    2^l x 2^l block whose top-left patch is (row, col), clipped to the grid.
    mask: [B, K] bool (real tokens).  Returns [B, H, W] bool.
    """
    if positions.dim() != 3 or positions.shape[-1] != 3 or mask.shape != positions.shape[:2]:
        raise ValueError(
            f"positions/mask: expected [B, K, 3] and [B, K], got {tuple(positions.shape)} and {tuple(mask.shape)}"
        )
    h, w = grid
    rows = torch.arange(h, device=positions.device)
    cols = torch.arange(w, device=positions.device)
    r0, c0, lv = positions.unbind(-1)  # [B, K]
    size = torch.where(mask, 2 ** lv.clamp(min=0), torch.zeros_like(lv))
    in_r = (rows[None, None, :] >= r0[..., None]) & (rows[None, None, :] < (r0 + size)[..., None])  # [B, K, H]
    in_c = (cols[None, None, :] >= c0[..., None]) & (cols[None, None, :] < (c0 + size)[..., None])  # [B, K, W]
    return (in_r[..., :, None] & in_c[..., None, :]).any(dim=1)
