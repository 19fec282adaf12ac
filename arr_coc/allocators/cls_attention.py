"""``cls_attention``: keep the patches the global token attends to most (FasterVLM).

FasterVLM (Zhang et al., 2024, "[CLS] attention is all you need for training-free visual
token pruning") ranks the patch tokens by the attention the vision tower's [CLS] token pays
them and keeps the top ``budget``. We never read attention maps from a host model (fused
attention kernels do not produce them), so the attention is recomputed from the tokens we
are given: ``softmax_j(<cls, x_j> / sqrt(d_head))`` averaged over heads and prefix tokens
(:func:`arr_coc.token_scores.cls_attention_scores`). With several prefix tokens (CLS plus
registers) the attention of each is averaged; with none (SigLIP, Qwen-VL) the mean patch
token stands in for the CLS.
"""

from __future__ import annotations

from arr_coc.allocators.base import AllocationContext, Allocator, Selection, topk_indices
from arr_coc.allocators.registry import register_allocator
from arr_coc.token_scores import cls_attention_scores

__all__ = ["ClsAttentionAllocator"]


@register_allocator("cls_attention")
class ClsAttentionAllocator(Allocator):
    """Top-``budget`` patches by our own [CLS]-to-patch attention.

    Args:
        num_heads: heads the feature dimension is split into for the attention (must divide D).
    """

    fixed_budget = True
    permutation_equivariant = True

    def __init__(self, *, num_heads: int = 1):
        super().__init__()
        self.num_heads = num_heads

    def select(self, ctx: AllocationContext) -> Selection:
        scores = cls_attention_scores(ctx.prefix, ctx.fine, num_heads=self.num_heads)  # [B, N]
        return Selection(indices=topk_indices(scores, ctx.budget), extras={"scores": scores})
