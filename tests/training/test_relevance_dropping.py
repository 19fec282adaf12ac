"""Stage 1's relevance-preserving, per-question token dropping and its token curriculum."""

import torch

from arr_coc.pyramid import pyramid_positions
from arr_coc.training.base_vlm import candidate_regions
from arr_coc.training.train_base import random_allocation, relevance_preserving_allocation


def test_every_relevant_cell_stays_visible_and_rows_are_raster_ordered():
    grid = (16, 16)
    pos, _ = pyramid_positions(grid, (1, 2))
    g = torch.Generator().manual_seed(0)
    rel = torch.zeros(64, 256, dtype=torch.bool)
    for q in range(64):
        rel[q, torch.randperm(256, generator=g)[: 1 + q % 16]] = True
    idx, mask = relevance_preserving_allocation(rel, pos, 256, grid, g, full_prob=0.0, keep_min=0.03, log_uniform=True)
    covered = (candidate_regions(grid, pos[idx.clamp(min=0)]) & mask[..., None]).any(1)
    assert bool((covered | ~rel).all())  # nothing relevant is ever dropped
    assert bool(((idx >= 0) == mask).all())
    for row, m in zip(idx, mask):
        kept = row[m]
        assert kept.unique().numel() == kept.numel()


def test_token_curriculum_caps_the_kept_fraction():
    grid = (16, 16)
    pos, _ = pyramid_positions(grid, (1, 2))
    g = torch.Generator().manual_seed(1)
    _, small = random_allocation(500, pos, 256, grid, g, full_prob=0.0, keep_min=0.03, log_uniform=True, keep_max=0.03)
    assert int(small.sum(1).max()) == round(0.03 * 256)  # at the start of the ramp: keep_min only
    _, wide = random_allocation(500, pos, 256, grid, g, full_prob=0.0, keep_min=0.03, log_uniform=True, keep_max=1.0)
    assert int(wide.sum(1).max()) > 128 and int(wide.sum(1).min()) >= round(0.03 * 256)
