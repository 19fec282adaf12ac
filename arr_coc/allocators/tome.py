"""``tome``: bipartite soft matching, repeated until the budget is reached (ToMe).

Token Merging (Bolya et al., ICLR 2023) reduces a token set by ``r`` per round:

1. split the tokens alternately into sets A and B (A = 1st, 3rd, ... in order);
2. connect every A token to its most similar B token (cosine similarity; ToMe uses the
   attention keys, which we do not have, so the tokens themselves);
3. keep the ``r`` most similar edges and merge each such A token into its B token by the
   size-weighted average (a token's size is how many patches it stands for), so the
   size-weighted sum of the tokens is preserved exactly;
4. unmerged A tokens and all B tokens survive.

One round removes at most |A| = ceil(n / 2) tokens, so rounds repeat (``r = min(n - K,
|A|)``) until each example has ``budget`` tokens. Surviving tokens are kept in raster
order of the patch they started as, so the alternation in each round follows the image
layout (spatial, like ToMe's alternation over the sequence): permuting the patch tokens
does not simply permute the choice. A merged token is reported at the index and position
of its B token (the patch it started as). ``extras["sizes"]`` holds the sizes in output
order. Batched: rows with different budgets run the same rounds, each with its own r.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arr_coc.allocators.base import AllocationContext, Allocator, Selection
from arr_coc.allocators.registry import register_allocator
from arr_coc.token_scores import working_dtype

__all__ = ["ToMeAllocator", "bipartite_merge_round"]


def bipartite_merge_round(
    x: torch.Tensor, size: torch.Tensor, count: torch.Tensor, r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of bipartite soft matching on left-packed token slots.

    x [B, n, D] tokens, size [B, n] sizes, count [B] live slots per row (slots ``0..count-1``
    are live, in order; the rest is padding), r [B] merges wanted per row (at most |A|)
    -> (x, size, alive [B, n] bool) with merged A slots dead. A = even slots, B = odd slots,
    so only the |A| x |B| similarities are computed.
    """
    b, n, _ = x.shape
    slot = torch.arange(n, device=x.device)
    live = slot[None, :] < count[:, None]
    in_a = live & (slot[None, :] % 2 == 0)
    xn = F.normalize(x, dim=-1, eps=1e-8)
    sim = xn[:, 0::2] @ xn[:, 1::2].transpose(1, 2)  # [B, |A|, |B|]
    sim = sim.masked_fill(~live[:, None, 1::2], float("-inf"))
    best_a, dst_b = sim.max(dim=2)  # [B, |A|]
    best = torch.full((b, n), float("-inf"), dtype=sim.dtype, device=x.device)
    best[:, 0::2] = best_a
    dst = torch.zeros(b, n, dtype=torch.long, device=x.device)
    dst[:, 0::2] = 2 * dst_b + 1
    best = best.masked_fill(~in_a, float("-inf"))
    order = best.argsort(dim=1, descending=True, stable=True)
    pos = torch.empty_like(order)
    pos.scatter_(1, order, slot.expand(b, n))
    merged = in_a & (pos < r[:, None]) & torch.isfinite(best)
    w = size * merged.to(size.dtype)  # [B, n]
    dst = torch.where(merged, dst, torch.zeros_like(dst))
    moved = x * w[..., None]
    new_mass = (x * size[..., None]).scatter_add(1, dst[..., None].expand_as(x), moved) - moved
    new_size = size.scatter_add(1, dst, w) - w
    alive = live & ~merged
    x = torch.where(alive[..., None], new_mass / new_size.clamp(min=1e-12)[..., None], x)
    return x, new_size, alive


@register_allocator("tome")
class ToMeAllocator(Allocator):
    """Repeated bipartite soft matching down to the budget (ToMe)."""

    fixed_budget = True

    def select(self, ctx: AllocationContext) -> Selection:
        fine = ctx.fine
        b, n, d = fine.shape
        x = fine.to(working_dtype(fine))
        size = torch.ones(b, n, dtype=x.dtype, device=x.device)
        ident = torch.arange(n, device=x.device).expand(b, n).clone()  # the patch each slot started as
        alive = torch.ones(b, n, dtype=torch.bool, device=x.device)  # live slots are always a prefix
        target = torch.where(ctx.budget > 0, ctx.budget, torch.full_like(ctx.budget, n))  # 0: nothing to do
        while True:
            count = alive.sum(dim=1)
            if not bool((count > target).any()):
                break
            n_a = (count + 1) // 2
            r = torch.minimum(count - target, n_a).clamp(min=0)
            r = torch.where(count > 1, r, torch.zeros_like(r))
            x, size, alive = bipartite_merge_round(x, size, count, r)
            # compact: live slots first, in order of the patch they started as
            key = torch.where(alive, ident, torch.full_like(ident, n))
            order = key.argsort(dim=1, stable=True)
            width = int(alive.sum(dim=1).max().item())
            order = order[:, :width]
            x = x.gather(1, order[..., None].expand(-1, -1, d))
            size, ident, alive = size.gather(1, order), ident.gather(1, order), alive.gather(1, order)
        keep = alive & (ctx.budget[:, None] > 0)
        indices = torch.where(keep, ident, torch.full_like(ident, -1))
        return Selection(
            indices=indices,
            tokens=torch.where(keep[..., None], x, torch.zeros_like(x)).to(fine.dtype),
            extras={"sizes": torch.where(keep, size, torch.zeros_like(size))},
        )
