"""``fastv``: prune the image tokens inside the LLM after layer K by the last token's attention (FastV).

FastV (Chen et al., ECCV 2024, "An image is worth 1/2 tokens after layer 2") lets the
first K layers of the LLM see every image token; at layer K it ranks the image tokens by
the attention the *last* token of the sequence paid them in layer K - 1, averaged over
heads, keeps the top ones and drops the others from the hidden states (the kept tokens keep
their position ids; the attention mask is rebuilt for the shorter sequence). The released
code (github pkunlp-icler/FastV, ``src/FastV/llava-hf/transformers/.../modeling_llama.py``,
``LlamaModel.forward``, the ``layer_idx == FASTV_k`` branch), transcribed in the tests:

    last_layer_attention_avg = torch.mean(last_layer_attention, dim=1)[0]
    last_layer_attention_avg_last_tok = last_layer_attention_avg[-1]
    ..._image = ..._last_tok[image_start:image_start + image_len]
    top_attention_rank_index = ..._image.topk(round(image_len * (1 - r))).indices + image_start
    keep_indexs = cat(arange(image_start), top_attention_rank_index, arange(image_start + image_len, L)).sort()
    hidden_states = hidden_states[:, keep_indexs, :]; position_ids = keep_indexs.unsqueeze(0)

Here a host that runs the LLM layer by layer (:class:`arr_coc.allocators.host.InLLMHost`,
e.g. :class:`arr_coc.training.base_host.BaseVLMHost`) calls :meth:`FastVAllocator.prune`
after layer ``K - 1`` (``prune_layers``) with that layer's softmax attention; the last token
is the base VLM's readout token, whose hidden state gives the answer. Default ``K = 2``.

What still departs from the paper:

- the budget is a number of kept image tokens (``budget``), not a ratio ``r`` (FastV keeps
  ``round(N (1 - r))``, the same thing for N = 576);
- the kept tokens keep their position ids: the release's are sequence indices, the base
  VLM's visual tokens all sit at position 0 (its design), so nothing is renumbered;
- batched: each row ranks its own (unpadded) image tokens; the release handles batch size 1;
- called as a plain allocator (no LLM host: the LLaVA / Qwen-VL plug-ins today) the LLM's
  attention is not available; the method then ranks by ``fastv_like``'s proxy (our own
  query-to-image attention; [CLS] attention without a query) and reports
  ``extras["in_llm"] = False``.
"""

from __future__ import annotations

import torch

from arr_coc.allocators.base import AllocationContext, Selection, topk_indices
from arr_coc.allocators.fastv_like import FastVLikeAllocator
from arr_coc.allocators.host import LLMLayerState, PruneDecision
from arr_coc.allocators.registry import register_allocator

__all__ = ["FastVAllocator"]


@register_allocator("fastv")
class FastVAllocator(FastVLikeAllocator):
    """FastV: keep the ``budget`` image tokens the last token attends to most in layer K - 1.

    Args:
        k: the layer at which tokens are dropped (layers 0 .. k-1 see every token), >= 1.
        num_heads / query_proj: of the plain-allocator fallback (``fastv_like``'s).
    """

    in_llm = True
    fixed_budget = True

    def __init__(self, *, k: int = 2, num_heads: int = 1, query_proj=None):
        super().__init__(num_heads=num_heads, query_proj=query_proj)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an int >= 1, got {k!r}")
        self.k = k

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        """``(K - 1,)``: the host calls :meth:`prune` after layer K - 1, before layer K."""
        if self.k >= num_layers:
            raise ValueError(f"k: FastV prunes at layer k={self.k}, but the LLM has only {num_layers} layers")
        return (self.k - 1,)

    def scores(self, state: LLMLayerState) -> torch.Tensor:
        """[B, Kc] the last token's head-averaged attention over the visual slots (-inf where padded)."""
        att = state.attention.mean(dim=1)  # [B, L, L]
        row = att[:, -1, state.visual_slice].float()
        return row.masked_fill(~state.visual_mask, float("-inf"))

    def prune(self, state: LLMLayerState) -> PruneDecision:
        scores = self.scores(state)
        budget = torch.minimum(state.budget, state.visual_mask.sum(1))
        keep = topk_indices(scores, budget)
        return PruneDecision(keep=keep, extras={"scores": scores})

    def select(self, ctx: AllocationContext) -> Selection:
        sel = super().select(ctx)
        sel.extras["in_llm"] = False
        return sel
