"""``divprune``: keep a maximally diverse subset (max-min diversity, DivPrune).

DivPrune (Alvar et al., CVPR 2025) casts pruning as the Max-Min Diversity Problem: choose
the ``budget`` tokens whose smallest pairwise distance is largest, with the cosine
distance ``1 - cos(x_i, x_j)``. It solves it greedily (farthest-point selection):

1. the first token is the one farthest from its nearest neighbour,
   ``argmax_i min_{j != i} d(i, j)``;
2. then, repeatedly, the token farthest from the chosen set,
   ``argmax_i min_{s in S} d(i, s)``, among the tokens not yet chosen.

It uses neither the query nor positions. Exact ties (the two ends of a mutual
nearest-neighbour pair tie for the first pick) are broken by content
(:func:`arr_coc.token_scores.content_tiebreak`) rather than by index, so permuting the
tokens permutes the choice. Batched over B: the K = max(budget) greedy steps
run for every row at once and row b keeps its first budget[b] picks (greedy choices do not
depend on how many more follow). O(B N^2 D) for the distances plus O(B N K) for the greedy.
"""

from __future__ import annotations

import torch

from arr_coc.allocators.base import AllocationContext, Allocator, Selection
from arr_coc.allocators.registry import register_allocator
from arr_coc.token_scores import argmax_with_tiebreak, content_tiebreak, cosine_similarity_matrix

__all__ = ["DivPruneAllocator", "max_min_diversity_greedy"]


def max_min_diversity_greedy(
    dist: torch.Tensor, k: int, tiebreak: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy max-min selection on a distance matrix.

    dist: [B, N, N] symmetric distances; k <= N picks; tiebreak [B, N] (optional) decides
    exact ties (default: the lower index) ->
    (indices [B, k] in pick order, min_dist [B, k]: each pick's distance to the earlier picks,
    the first one's to its nearest neighbour).
    """
    b, n, _ = dist.shape
    if not 0 <= k <= n:
        raise ValueError(f"k: expected 0 <= k <= N={n}, got {k}")
    rows = torch.arange(b, device=dist.device)
    eye = torch.eye(n, dtype=torch.bool, device=dist.device)
    nn_dist = dist.masked_fill(eye, float("inf")).amin(dim=2)  # [B, N]
    if n == 1:
        nn_dist = torch.zeros_like(nn_dist)
    picks = torch.empty(b, k, dtype=torch.long, device=dist.device)
    values = torch.empty(b, k, dtype=dist.dtype, device=dist.device)
    chosen = torch.zeros(b, n, dtype=torch.bool, device=dist.device)
    mind = nn_dist
    if tiebreak is None:
        tiebreak = -torch.arange(n, device=dist.device, dtype=dist.dtype).expand(b, n)
    for step in range(k):
        score = mind.masked_fill(chosen, float("-inf"))
        j = argmax_with_tiebreak(score, tiebreak)
        picks[:, step] = j
        values[:, step] = mind[rows, j]
        chosen[rows, j] = True
        new = dist[rows, j]  # [B, N]
        mind = new if step == 0 else torch.minimum(mind, new)
    return picks, values


@register_allocator("divprune")
class DivPruneAllocator(Allocator):
    """Greedy max-min cosine diversity (DivPrune)."""

    fixed_budget = True
    permutation_equivariant = True

    def select(self, ctx: AllocationContext) -> Selection:
        k = ctx.max_budget
        dist = 1.0 - cosine_similarity_matrix(ctx.fine)  # [B, N, N]
        picks, min_dist = max_min_diversity_greedy(dist, k, content_tiebreak(ctx.fine).to(dist.dtype))
        keep = ctx.budget_mask(k)
        return Selection(
            indices=torch.where(keep, picks, torch.full_like(picks, -1)),
            extras={"pick_order": picks, "min_dist": min_dist},
        )
