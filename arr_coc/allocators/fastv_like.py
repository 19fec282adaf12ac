"""``fastv_like``: keep the image tokens the query attends to most (FastV-style).

FastV (Chen et al., 2024, "An image is worth 1/2 tokens after layer 2") ranks image tokens
by the attention they receive inside the language model at an early layer and drops the
rest. That method, reading the LLM's own attention through a host that runs the LLM layer
by layer, is ``fastv`` (:mod:`arr_coc.allocators.fastv`). This proxy chooses before the LLM
and reads no host signal: it computes its own scaled dot-product attention from the query
tokens to the image tokens,
:func:`arr_coc.token_scores.query_attention_scores`, averaged over heads and the real
(unpadded) query tokens, and keeps the top ``budget``.

The query must live in the tokens' space (D = Dq, e.g. projected vision tokens and LLM
text embeddings); pass ``query_proj`` (any module mapping Dq -> D) otherwise.

Fallback without a query (``query=None`` or a row whose query is all padding): the image's
own global token asks instead, i.e. the [CLS]-attention ranking of
:func:`arr_coc.token_scores.cls_attention_scores` (mean patch token when there is no
prefix). Every row therefore gets a content-based ranking, never an arbitrary one.
"""

from __future__ import annotations

import torch
from torch import nn

from arr_coc.allocators.base import (
    AllocationContext,
    Allocator,
    Selection,
    topk_indices,
)
from arr_coc.allocators.registry import register_allocator
from arr_coc.token_scores import (
    cls_attention_scores,
    query_attention_scores,
    valid_query_rows,
)

__all__ = ["FastVLikeAllocator", "query_in_token_space"]


def query_in_token_space(ctx: AllocationContext, query_proj: nn.Module | None) -> torch.Tensor | None:
    """The query [B, T, D] in the tokens' space (through ``query_proj`` when given), or None."""
    if ctx.query is None:
        return None
    q = ctx.query if query_proj is None else query_proj(ctx.query)
    d = ctx.fine.shape[-1]
    if q.dim() != 3 or q.shape[-1] != d:
        raise ValueError(
            f"query: expected the query in the tokens' space, [B, T, D={d}], got {tuple(q.shape)}; "
            "pass query_proj=<module mapping Dq to D> when the query lives elsewhere"
        )
    return q


@register_allocator("fastv_like")
class FastVLikeAllocator(Allocator):
    """Top-``budget`` image tokens by our own query-to-image attention.

    Args:
        num_heads: heads the feature dimension is split into (must divide D).
        query_proj: optional module mapping query features Dq -> D.
    """

    fixed_budget = True
    permutation_equivariant = True

    def __init__(self, *, num_heads: int = 1, query_proj: nn.Module | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.query_proj = query_proj

    def select(self, ctx: AllocationContext) -> Selection:
        fallback = cls_attention_scores(ctx.prefix, ctx.fine, num_heads=self.num_heads)  # [B, N]
        q = query_in_token_space(ctx, self.query_proj)
        if q is None:
            scores, used_query = fallback, torch.zeros(ctx.batch_size, dtype=torch.bool, device=fallback.device)
        else:
            attn = query_attention_scores(q, ctx.fine, ctx.query_mask, num_heads=self.num_heads)
            used_query = valid_query_rows(q, ctx.query_mask)
            scores = torch.where(used_query[:, None], attn, fallback.to(attn.dtype))
        return Selection(
            indices=topk_indices(scores, ctx.budget), extras={"scores": scores, "used_query": used_query}
        )
