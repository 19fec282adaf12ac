"""``visionzip``: dominant tokens by [CLS] attention plus contextual tokens merged from the rest.

VisionZip (Yang et al., CVPR 2025) splits the budget K into ``K_d`` dominant and ``K_c``
contextual tokens (54 + 10 of 64, 108 + 20 of 128, 162 + 30 of 192 in the paper; here
``K_c = round(K * contextual_ratio)`` with ``contextual_ratio = 10 / 64``, which reproduces
all three). The released code (github dvlab-research/VisionZip, ``visionzip/clip_encoder.py``
``CLIPVisionTower_VisionZip.forward`` and ``utils.py``), transcribed in the tests:

1. dominant: the ``K_d`` patches with the highest [CLS] attention of the penultimate vision
   block (``attentions[-2][:, :, 0, 1:]`` summed over heads), kept unchanged;
2. contextual: of the remaining ``R = N - K_d`` patches, taken in raster order, every
   ``max(1, R // K_c)``-th one (the first ``K_c`` of them) becomes a target; every other
   remaining patch joins the target whose *attention key* (layer -2's keys averaged over
   heads, ``raw_key_states.mean(1)``, L2-normalised) is most similar, and each target
   becomes one token for its group.

With a host (:class:`arr_coc.allocators.host.HostSignals`) both signals come from it:
``host.vision_attention(layer)`` and ``host.vision_keys(layer)`` (default ``layer=-2``).

``merge`` decides the contextual token: ``"released"`` (default) the target plus the mean
of the patches assigned to it, as the released code computes it (``target_hidden +
aggregated_hidden``); ``"mean"`` the plain average of the group (the target and its
patches), as the paper's text describes.

A contextual token is reported at its target patch's index and position. Step 2 uses the
raster order of the patches, so this method is spatial: permuting the patch tokens does not
simply permute its choice.

What still departs from the paper:

- the released code also keeps the [CLS] token for the LLM; our contract never gives the
  prefix to the LLM, so the whole budget goes to patches;
- the released code merges layer -2's hidden states before the projector; with a host that
  gives the tower's output tokens and its map into the allocator's token space
  (``vision_output()`` / ``to_token_space()``, e.g. ``BaseVLMHost``: ``vlm.project``) we merge
  the tower's *last-layer* tokens before the projector and project the merged ones; other
  hosts (and no host) merge the tokens we are given, i.e. a mean of projected tokens, not the
  projection of a mean (``extras["merge_space"]`` says ``"vision"`` or ``"tokens"``);
- without a host (``host=None``) the [CLS] attention is recomputed from the output tokens
  (:func:`arr_coc.token_scores.cls_attention_scores`, mean patch token when P = 0) and the
  groups are formed by token cosine similarity instead of key similarity;
  ``extras["signal"]`` says ``"recomputed"`` instead of ``"host"``;
- with a host but no [CLS] (P = 0) the attention each patch receives, averaged over all
  queries, ranks the patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arr_coc.allocators.base import (
    AllocationContext,
    Allocator,
    Selection,
    topk_indices,
)
from arr_coc.allocators.cls_attention import host_cls_attention
from arr_coc.allocators.host import SignalUnavailable, request_signal
from arr_coc.allocators.registry import register_allocator
from arr_coc.token_scores import cls_attention_scores, working_dtype

__all__ = ["VisionZipAllocator"]


@register_allocator("visionzip")
class VisionZipAllocator(Allocator):
    """Dominant + contextual tokens (VisionZip).

    Args:
        contextual_ratio: share of the budget spent on contextual (merged) tokens, in [0, 1].
        merge: ``"released"`` or ``"mean"`` (see the module docstring).
        layer: the vision block whose attention and keys are read from the host (-2).
        num_heads: heads of the fallback [CLS] attention without a host (must divide D).
    """

    fixed_budget = True
    reads_host = True

    def __init__(
        self, *, contextual_ratio: float = 10 / 64, merge: str = "released", layer: int = -2, num_heads: int = 1
    ):
        super().__init__()
        if not 0.0 <= contextual_ratio <= 1.0:
            raise ValueError(f"contextual_ratio: expected a value in [0, 1], got {contextual_ratio!r}")
        if merge not in ("mean", "released"):
            raise ValueError(f"merge: expected 'mean' or 'released', got {merge!r}")
        self.contextual_ratio = contextual_ratio
        self.merge = merge
        self.layer = layer
        self.num_heads = num_heads

    def split_budget(self, budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B] budgets -> ([B] dominant counts, [B] contextual counts); they sum to the budget."""
        ctx_n = torch.floor(budget.double() * self.contextual_ratio + 0.5).long().clamp(min=0)
        ctx_n = torch.minimum(ctx_n, budget)
        return budget - ctx_n, ctx_n

    def select(self, ctx: AllocationContext) -> Selection:
        fine = ctx.fine
        b, n, d = fine.shape
        x = fine.to(working_dtype(fine))
        p = ctx.prefix.shape[1]
        if ctx.host is not None:
            scores = host_cls_attention(ctx.host, self.layer, p, n, requester="visionzip", reduce="sum")  # [B, N]
            keys = request_signal(ctx.host, "vision_keys", self.layer, requester="visionzip")  # [B, P+N, Dk]
            if keys.dim() != 3 or keys.shape[:2] != (b, p + n):
                raise ValueError(f"host: vision_keys({self.layer}) must be [B={b}, {p + n}, Dk], got {tuple(keys.shape)}")
            metric = keys[:, p:].to(x.dtype)
            signal = "host"
        else:
            scores = cls_attention_scores(ctx.prefix, fine, num_heads=self.num_heads)  # [B, N]
            metric, signal = x, "recomputed"
        src, to_tokens, merge_space = x, None, "tokens"  # what is merged, and its map to the tokens' space
        if ctx.host is not None:
            try:
                hv = request_signal(ctx.host, "vision_output", requester="visionzip")  # [B, P+N, Dv]
                to_tokens = getattr(ctx.host, "to_token_space")
            except (SignalUnavailable, AttributeError):
                hv = None
            if hv is not None:
                if hv.dim() != 3 or hv.shape[:2] != (b, p + n):
                    raise ValueError(f"host: vision_output() must be [B={b}, {p + n}, Dv], got {tuple(hv.shape)}")
                src, merge_space = hv[:, p:].to(x.dtype), "vision"
        n_dom, n_ctx = self.split_budget(ctx.budget)
        dominant = topk_indices(scores, n_dom)  # [B, Kd], -1 padded
        is_dom = torch.zeros(b, n + 1, dtype=torch.bool, device=fine.device)
        is_dom.scatter_(1, torch.where(dominant >= 0, dominant, torch.full_like(dominant, n)), True)
        rest = ~is_dom[:, :n]  # [B, N] remaining patches
        # targets: every step-th remaining patch in raster order, the first n_ctx of them
        rank = rest.long().cumsum(dim=1) - 1  # position among the remaining patches
        n_rest = rest.sum(dim=1)
        step = (n_rest // n_ctx.clamp(min=1)).clamp(min=1)
        is_target = rest & (rank % step[:, None] == 0) & (rank // step[:, None] < n_ctx[:, None])
        # the targets in raster order, [B, Kc] (-1 padded)
        contextual = topk_indices(is_target.to(x.dtype) - torch.arange(n, device=fine.device) / (2 * n), n_ctx)
        # assign each remaining patch to its most similar target (a target to itself)
        xn = F.normalize(metric, dim=-1, eps=1e-8)
        xt = xn.gather(1, contextual.clamp(min=0)[..., None].expand(-1, -1, xn.shape[-1]))  # [B, Kc, Dk]
        sim = (xn @ xt.transpose(1, 2)).masked_fill((contextual < 0)[:, None, :], float("-inf"))  # [B, N, Kc]
        if contextual.shape[1]:
            owner = contextual.clamp(min=0).gather(1, sim.argmax(dim=2))  # [B, N]
        else:  # no row has contextual tokens
            owner = torch.zeros(b, n, dtype=torch.long, device=fine.device)
        owner = torch.where(is_target, torch.arange(n, device=fine.device).expand(b, n), owner)
        member = (rest & (n_ctx[:, None] > 0)).to(x.dtype)  # [B, N]
        ds = src.shape[-1]
        group_sum = torch.zeros_like(src).scatter_add(1, owner[..., None].expand(-1, -1, ds), src * member[..., None])
        group_n = torch.zeros(b, n, 1, dtype=x.dtype, device=fine.device).scatter_add(1, owner[..., None], member[..., None])
        if self.merge == "mean":
            merged = group_sum / group_n.clamp(min=1)
        else:  # released: target + mean of the others assigned to it
            others_n = (group_n - 1).clamp(min=1)
            merged = src + (group_sum - src) / others_n
        indices = torch.cat([dominant, contextual], dim=1)
        tok_dom = x.gather(1, dominant.clamp(min=0)[..., None].expand(-1, -1, d))
        tok_ctx = merged.gather(1, contextual.clamp(min=0)[..., None].expand(-1, -1, ds))
        if to_tokens is not None and tok_ctx.shape[1]:
            tok_ctx = to_tokens(tok_ctx.to(ctx.fine.dtype)).to(x.dtype)
            if tok_ctx.shape != (b, contextual.shape[1], d):
                raise ValueError(f"host: to_token_space must map [B, K, Dv] to [B, K, D={d}], got {tuple(tok_ctx.shape)}")
        tokens = torch.cat([tok_dom, tok_ctx], dim=1).to(fine.dtype)
        group_sizes = group_n[..., 0].gather(1, contextual.clamp(min=0))
        return Selection(
            indices=indices,
            tokens=tokens,
            extras={"scores": scores, "signal": signal, "merge_space": merge_space, "dominant": dominant,
                    "contextual": contextual,
                    "contextual_sizes": torch.where(contextual >= 0, group_sizes, torch.zeros_like(group_sizes))},
        )
