"""``tome``: Token Merging inside the vision tower, or bipartite soft matching after it (ToMe).

Token Merging (Bolya et al., ICLR 2023) reduces the tokens of a ViT by ``r`` in every
block; the released code (github facebookresearch/ToMe, ``tome/merge.py``
``bipartite_soft_matching`` / ``merge_wavg`` and ``tome/patch/timm.py`` ``ToMeBlock`` /
``ToMeAttention``), transcribed in the tests, does in each block, after its attention:

1. split the tokens alternately into sets A and B (A = 1st, 3rd, ... in order; the [CLS]
   is protected);
2. connect every A token to its most similar B token, the similarity being the cosine of
   the block's attention *keys* averaged over heads (``metric = k.mean(1)``);
3. keep the ``r`` most similar edges (``r <= floor(n / 2)``) and merge each such A token
   into its B token by the size-weighted average (a token's size is how many patches it
   stands for), so the size-weighted sum of the tokens is preserved exactly;
4. the new order is [unmerged A, B]; later blocks use proportional attention
   (``+ log(size)`` on the attention logits).

``inside=True`` (default) with a host that can re-run its tower
(:class:`arr_coc.allocators.host.HostSignals`: ``vision_blocks`` / ``vision_merge``, e.g.
:class:`arr_coc.training.base_host.BaseVLMHost`) does exactly this in the tower, with ToMe's
constant schedule ``r = ceil((N - K) / D)`` over the D blocks (:func:`tome_schedule`, each
block capped at half its tokens and at what is left), and returns the tower's merged output
tokens (``extras["signal"] = "tower"``). ``inside=False`` merges after the tower on
``host.vision_keys(layer)`` (``"host"``); without a host the tokens themselves are matched
(``"tokens"``). Outside the tower (and to finish when the budget is below what the tower can
reach, about ``N / 2^D``) rounds of steps 1-3 repeat (``r = min(n - K, floor(n / 2))``) on
the output tokens until each example has ``budget`` tokens, survivors kept in raster order of
the patch they started as (a merged key is the size-weighted average of its members').

A merged token is reported at the index and position of the patch it started as (its chain
of B tokens). ``extras["sizes"]`` holds the sizes in output order. The alternation follows
the token order, so this method is spatial: permuting the patch tokens does not simply
permute the choice.

What still departs from the paper: ToMe is a speed method whose ``r`` is set per block and
whose output count follows from it; here the budget fixes the count and the schedule
follows. The [CLS] is merged never and given to the LLM never (our contract). Inside the
tower the merged tokens are the tower's *output* tokens (what our LLM reads), not layer
-2's. After the tower (``inside=False`` or below the tower's reach) all rounds use one
block's keys (or the tokens), merged keys are averaged instead of recomputed, and no later
block applies proportional attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from arr_coc.allocators.base import AllocationContext, Allocator, Selection
from arr_coc.allocators.host import request_signal
from arr_coc.allocators.registry import register_allocator
from arr_coc.token_scores import working_dtype

__all__ = ["ToMeAllocator", "bipartite_merge_round", "tome_schedule"]


def bipartite_merge_round(
    x: torch.Tensor,
    size: torch.Tensor,
    count: torch.Tensor,
    r: torch.Tensor,
    *,
    match_dims: int | None = None,
    protect: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of bipartite soft matching on left-packed token slots.

    x [B, n, D] tokens, size [B, n] sizes, count [B] live slots per row (slots ``0..count-1``
    are live, in order; the rest is padding), r [B] merges wanted per row (at most |A|)
    -> (x, size, alive [B, n] bool) with merged A slots dead. A = even slots, B = odd slots,
    so only the |A| x |B| similarities are computed. ``match_dims``: match on the last
    ``match_dims`` features of x only (the keys, carried along with the tokens), all merged.
    ``protect``: the first ``protect`` slots (CLS, registers) neither merge nor receive.
    """
    b, n, _ = x.shape
    slot = torch.arange(n, device=x.device)
    live = slot[None, :] < count[:, None]
    in_a = live & (slot[None, :] % 2 == 0) & (slot[None, :] >= protect)
    xn = F.normalize(x if match_dims is None else x[..., -match_dims:], dim=-1, eps=1e-8)
    sim = xn[:, 0::2] @ xn[:, 1::2].transpose(1, 2)  # [B, |A|, |B|]
    sim = sim.masked_fill(~(live & (slot[None, :] >= protect))[:, None, 1::2], float("-inf"))
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


def tome_schedule(n: int, budget: int, depth: int) -> list[int]:
    """Per-block merges reaching ``budget`` of ``n`` patches in ``depth`` blocks, ToMe's way:
    a constant ``r = ceil((n - budget) / depth)``, each block capped at half of its tokens
    (``floor(t / 2)``, the prefix protected) and at what is left to merge."""
    if budget >= n or budget <= 0:
        return [0] * depth
    r = math.ceil((n - budget) / depth)
    out, t = [], n
    for _ in range(depth):
        step = min(r, t // 2, t - budget)
        out.append(step)
        t -= step
    return out


@register_allocator("tome")
class ToMeAllocator(Allocator):
    """ToMe: merging inside the vision tower (``inside=True``, host ``vision_merge``), or
    bipartite soft matching after it on the host's keys (``inside=False``), down to the budget.

    Args:
        inside: with a host, merge inside its vision tower (needs ``vision_merge``).
        layer: the vision block whose keys are matched after the tower (``inside=False``).
    """

    fixed_budget = True
    reads_host = True

    def __init__(self, *, inside: bool = True, layer: int = -1):
        super().__init__()
        self.inside = inside
        self.layer = layer

    def select(self, ctx: AllocationContext) -> Selection:
        fine = ctx.fine
        b, n, d = fine.shape
        x = fine.to(working_dtype(fine))
        size = torch.ones(b, n, dtype=x.dtype, device=x.device)
        ident = torch.arange(n, device=x.device).expand(b, n).clone()  # the patch each slot started as
        alive = torch.ones(b, n, dtype=torch.bool, device=x.device)  # live slots are always a prefix
        target = torch.where(ctx.budget > 0, ctx.budget, torch.full_like(ctx.budget, n))  # 0: nothing to do
        match_dims, signal = None, "tokens"
        p = ctx.prefix.shape[1]
        if ctx.host is not None and self.inside:
            depth = int(request_signal(ctx.host, "vision_blocks", requester="tome"))
            sched = torch.tensor([tome_schedule(n, int(k), depth) for k in ctx.budget.tolist()], dtype=torch.long)
            merged = request_signal(ctx.host, "vision_merge", sched.reshape(b, depth), requester="tome")
            if merged.tokens.shape[0] != b or merged.tokens.shape[-1] != d:
                raise ValueError(f"host: vision_merge tokens must be [B={b}, K, D={d}], got {tuple(merged.tokens.shape)}")
            x, size = merged.tokens.to(x.dtype), merged.sizes.to(x.dtype)
            ident, alive = merged.origin.to(x.device), merged.mask.to(x.device)
            signal = "tower"
        elif ctx.host is not None:
            keys = request_signal(ctx.host, "vision_keys", self.layer, requester="tome")  # [B, P+N, Dk]
            if keys.dim() != 3 or keys.shape[:2] != (b, p + n):
                raise ValueError(f"host: vision_keys({self.layer}) must be [B={b}, {p + n}, Dk], got {tuple(keys.shape)}")
            match_dims, signal = keys.shape[-1], "host"
            x = torch.cat([x, keys[:, p:].to(x.dtype)], dim=-1)  # keys ride along, merged like the tokens
        width_x = x.shape[-1]
        first = True
        while True:
            if not first:
                count = alive.sum(dim=1)
                r = torch.minimum(count - target, count // 2).clamp(min=0)  # ToMe: at most floor(n / 2)
                x, size, alive = bipartite_merge_round(x, size, count, r, match_dims=match_dims)
            first = False
            # compact: live slots first, in order of the patch they started as
            key = torch.where(alive, ident, torch.full_like(ident, n))
            order = key.argsort(dim=1, stable=True)
            width = int(alive.sum(dim=1).max().item())
            order = order[:, :width]
            x = x.gather(1, order[..., None].expand(-1, -1, width_x))
            size, ident, alive = size.gather(1, order), ident.gather(1, order), alive.gather(1, order)
            if not bool((alive.sum(dim=1) > target).any()):
                break
        keep = alive & (ctx.budget[:, None] > 0)
        indices = torch.where(keep, ident, torch.full_like(ident, -1))
        x = x[..., :d]
        return Selection(
            indices=indices,
            tokens=torch.where(keep[..., None], x, torch.zeros_like(x)).to(fine.dtype),
            extras={"sizes": torch.where(keep, size, torch.zeros_like(size)), "signal": signal},
        )
