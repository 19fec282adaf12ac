"""``tome``: bipartite soft matching on the attention keys, repeated until the budget is reached (ToMe).

Token Merging (Bolya et al., ICLR 2023) reduces a token set by ``r`` per round; the released
code (github facebookresearch/ToMe, ``tome/merge.py``: ``bipartite_soft_matching`` and
``merge_wavg``), transcribed in the tests:

1. split the tokens alternately into sets A and B (A = 1st, 3rd, ... in order);
2. connect every A token to its most similar B token, the similarity being the cosine of
   the block's attention *keys* averaged over heads (``metric = k.mean(1)``);
3. keep the ``r`` most similar edges (``r <= floor(n / 2)``) and merge each such A token
   into its B token by the size-weighted average (a token's size is how many patches it
   stands for), so the size-weighted sum of the tokens is preserved exactly;
4. unmerged A tokens and all B tokens survive.

With a host (:class:`arr_coc.allocators.host.HostSignals`) the keys are
``host.vision_keys(layer)`` (default ``layer=-1``: the block that produced the tokens we
merge); a merged token's key is the size-weighted average of its members' keys. Without a
host the tokens themselves are matched (``extras["signal"] = "tokens"``).

Rounds repeat (``r = min(n - K, floor(n / 2))``) until each example has ``budget`` tokens.
Surviving tokens are kept in raster order of the patch they started as, so the alternation
in each round follows the image layout: permuting the patch tokens does not simply permute
the choice. A merged token is reported at the index and position of its B token (the patch
it started as). ``extras["sizes"]`` holds the sizes in output order. Batched: rows with
different budgets run the same rounds, each with its own r.

What still departs from the paper: ToMe merges inside the vision tower, ``r`` tokens in
every block after its attention, the merged tokens flowing through the later blocks with
proportional attention (``+ log(size)`` on the attention logits) and each block computing
fresh keys. Here the merging happens after the tower, on its output tokens (projected for
the LLM), all rounds on the keys of one block, merged keys averaged instead of recomputed,
and without proportional attention (no later block runs); after a round the survivors are
re-ordered by raster position, where ToMe's order is [unmerged A, B].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arr_coc.allocators.base import AllocationContext, Allocator, Selection
from arr_coc.allocators.host import request_signal
from arr_coc.allocators.registry import register_allocator
from arr_coc.token_scores import working_dtype

__all__ = ["ToMeAllocator", "bipartite_merge_round"]


def bipartite_merge_round(
    x: torch.Tensor, size: torch.Tensor, count: torch.Tensor, r: torch.Tensor, *, match_dims: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of bipartite soft matching on left-packed token slots.

    x [B, n, D] tokens, size [B, n] sizes, count [B] live slots per row (slots ``0..count-1``
    are live, in order; the rest is padding), r [B] merges wanted per row (at most |A|)
    -> (x, size, alive [B, n] bool) with merged A slots dead. A = even slots, B = odd slots,
    so only the |A| x |B| similarities are computed. ``match_dims``: match on the last
    ``match_dims`` features of x only (the keys, carried along with the tokens), all merged.
    """
    b, n, _ = x.shape
    slot = torch.arange(n, device=x.device)
    live = slot[None, :] < count[:, None]
    in_a = live & (slot[None, :] % 2 == 0)
    xn = F.normalize(x if match_dims is None else x[..., -match_dims:], dim=-1, eps=1e-8)
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
    """Repeated bipartite soft matching down to the budget (ToMe), on the host's keys.

    Args:
        layer: the vision block whose keys the host gives (-1: the last).
    """

    fixed_budget = True
    reads_host = True

    def __init__(self, *, layer: int = -1):
        super().__init__()
        self.layer = layer

    def select(self, ctx: AllocationContext) -> Selection:
        fine = ctx.fine
        b, n, d = fine.shape
        x = fine.to(working_dtype(fine))
        match_dims, signal = None, "tokens"
        if ctx.host is not None:
            p = ctx.prefix.shape[1]
            keys = request_signal(ctx.host, "vision_keys", self.layer, requester="tome")  # [B, P+N, Dk]
            if keys.dim() != 3 or keys.shape[:2] != (b, p + n):
                raise ValueError(f"host: vision_keys({self.layer}) must be [B={b}, {p + n}, Dk], got {tuple(keys.shape)}")
            match_dims, signal = keys.shape[-1], "host"
            x = torch.cat([x, keys[:, p:].to(x.dtype)], dim=-1)  # keys ride along, merged like the tokens
        width_x = x.shape[-1]
        size = torch.ones(b, n, dtype=x.dtype, device=x.device)
        ident = torch.arange(n, device=x.device).expand(b, n).clone()  # the patch each slot started as
        alive = torch.ones(b, n, dtype=torch.bool, device=x.device)  # live slots are always a prefix
        target = torch.where(ctx.budget > 0, ctx.budget, torch.full_like(ctx.budget, n))  # 0: nothing to do
        while True:
            count = alive.sum(dim=1)
            if not bool((count > target).any()):
                break
            r = torch.minimum(count - target, count // 2).clamp(min=0)  # ToMe: at most floor(n / 2)
            x, size, alive = bipartite_merge_round(x, size, count, r, match_dims=match_dims)
            # compact: live slots first, in order of the patch they started as
            key = torch.where(alive, ident, torch.full_like(ident, n))
            order = key.argsort(dim=1, stable=True)
            width = int(alive.sum(dim=1).max().item())
            order = order[:, :width]
            x = x.gather(1, order[..., None].expand(-1, -1, width_x))
            size, ident, alive = size.gather(1, order), ident.gather(1, order), alive.gather(1, order)
        keep = alive & (ctx.budget[:, None] > 0)
        indices = torch.where(keep, ident, torch.full_like(ident, -1))
        x = x[..., :d]
        return Selection(
            indices=indices,
            tokens=torch.where(keep[..., None], x, torch.zeros_like(x)).to(fine.dtype),
            extras={"sizes": torch.where(keep, size, torch.zeros_like(size)), "signal": signal},
        )
