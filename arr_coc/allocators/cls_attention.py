"""``cls_attention``: keep the patches the vision tower's [CLS] attends to most (FasterVLM).

FasterVLM (Zhang et al., 2024, "[CLS] attention is all you need for training-free visual
token pruning") ranks the patch tokens by the attention the vision tower's [CLS] token pays
them in the layer LLaVA reads its features from (``select_layer = -2``, the penultimate
block), averaged over heads, and keeps the top ``budget``. The released code
(github Theia-4869/FasterVLM, ``clip_encoder.feature_select`` / ``llava_arch.encode_images``):

    image_attentions = image_forward_outs.attentions[select_layer][:, :, 0, 1:]   # (B, H, N)
    image_attentions = image_attentions.mean(dim=1)                              # (B, N)
    token_indices = torch.topk(image_attentions, k=visual_token_num, dim=1)[1]

With a host (:class:`arr_coc.allocators.host.HostSignals`), this is what we compute, from
``host.vision_attention(layer)`` (default ``layer=-2``): row 0 (the [CLS]), the patch
columns, mean over heads, top ``budget``. With registers (P > 1 prefix tokens) the
[CLS] is still token 0 and registers are not candidates.

What still departs from the paper:

- the LLM reads the vision tower's last-layer tokens (our base VLM's features), while
  LLaVA reads layer -2's; the attention is taken at layer -2 as in the paper;
- a tower without a [CLS] (P = 0: SigLIP, Qwen-VL) has no [CLS] attention; then the
  attention each patch receives, averaged over all query tokens, ranks the patches (the
  paper does not cover this case);
- without a host (``host=None``: the LLaVA / Qwen-VL plug-ins today) the attention is not
  the tower's: we recompute ``softmax_j(<cls, x_j> / sqrt(d_head))`` from the output tokens
  (:func:`arr_coc.token_scores.cls_attention_scores`, mean patch token as the query when
  P = 0), and ``extras["signal"]`` says ``"recomputed"`` instead of ``"host"``.
"""

from __future__ import annotations

import torch

from arr_coc.allocators.base import (
    AllocationContext,
    Allocator,
    Selection,
    topk_indices,
)
from arr_coc.allocators.host import request_signal
from arr_coc.allocators.registry import register_allocator
from arr_coc.token_scores import cls_attention_scores

__all__ = ["ClsAttentionAllocator", "host_cls_attention"]


def host_cls_attention(host, layer: int, num_prefix: int, num_fine: int, *, requester: str, reduce: str = "mean") -> torch.Tensor:
    """[B, N] the [CLS]-to-patch attention of the host's vision block ``layer``.

    ``reduce`` over heads: ``"mean"`` (FasterVLM) or ``"sum"`` (VisionZip; the same ranking).
    With no prefix token (P = 0) the attention each patch receives, averaged over queries.
    """
    att = request_signal(host, "vision_attention", layer, requester=requester)  # [B, H, P+N, P+N]
    want = num_prefix + num_fine
    if att.dim() != 4 or att.shape[-1] != want or att.shape[-2] != want:
        raise ValueError(
            f"host: vision_attention({layer}) must be [B, heads, {want}, {want}] for P={num_prefix} prefix and "
            f"N={num_fine} patch tokens, got {tuple(att.shape)}"
        )
    rows = att[:, :, 0, num_prefix:] if num_prefix > 0 else att[:, :, :, :].mean(dim=2)  # [B, H, N]
    return rows.sum(dim=1) if reduce == "sum" else rows.mean(dim=1)


@register_allocator("cls_attention")
class ClsAttentionAllocator(Allocator):
    """Top-``budget`` patches by the vision tower's [CLS]-to-patch attention (FasterVLM).

    Args:
        layer: the vision block whose attention is read from the host (-2: penultimate).
        num_heads: heads of the fallback recomputation without a host (must divide D).
    """

    fixed_budget = True
    permutation_equivariant = True
    reads_host = True

    def __init__(self, *, layer: int = -2, num_heads: int = 1):
        super().__init__()
        self.layer = layer
        self.num_heads = num_heads

    def select(self, ctx: AllocationContext) -> Selection:
        if ctx.host is not None:
            scores = host_cls_attention(ctx.host, self.layer, ctx.prefix.shape[1], ctx.num_fine, requester="cls_attention")
            signal = "host"
        else:
            scores = cls_attention_scores(ctx.prefix, ctx.fine, num_heads=self.num_heads)  # [B, N]
            signal = "recomputed"
        return Selection(indices=topk_indices(scores, ctx.budget), extras={"scores": scores, "signal": signal})
