"""Tiny in-LLM pruners for the tests (the host protocol of arr_coc.allocators.host)."""

from __future__ import annotations

import torch
from torch import nn

from arr_coc.allocators.host import LLMLayerState, PruneDecision


class KeepFirst(nn.Module):
    """Keeps the first ``keep`` visual slots of each row (all when None) after ``layers``."""

    in_llm = True

    def __init__(self, layers: tuple[int, ...] = (0,), keep: int | None = None):
        super().__init__()
        self.layers, self.keep, self.states = layers, keep, []

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.layers

    def prune(self, state: LLMLayerState) -> PruneDecision:
        self.states.append(state)
        kc = state.visual_mask.shape[1]
        k = kc if self.keep is None else min(self.keep, kc)
        keep = torch.arange(k).expand(state.visual_mask.shape[0], k).clone()
        keep[~state.visual_mask[:, :k]] = -1
        return PruneDecision(keep=keep)


class LastTokenTopK(KeepFirst):
    """FastV's rule: the ``budget`` visual slots the readout token attends to most (mean over heads)."""

    def prune(self, state: LLMLayerState) -> PruneDecision:
        self.states.append(state)
        kc = state.visual_mask.shape[1]
        score = state.attention[:, :, -1, :kc].mean(1).masked_fill(~state.visual_mask, -1.0)
        k = int(state.budget.max())
        idx = score.topk(k, dim=1).indices
        idx[torch.arange(k)[None] >= state.budget[:, None]] = -1
        return PruneDecision(keep=idx, extras={"score": score})


class Recycle(KeepFirst):
    """Keeps the first ``keep`` visual slots and appends one token: the mean of the dropped ones."""

    def prune(self, state: LLMLayerState) -> PruneDecision:
        dec = super().prune(state)
        kc = state.visual_mask.shape[1]
        dropped = state.visual_mask.clone()
        dropped[:, : self.keep] = False
        w = dropped.float() / dropped.float().sum(1, keepdim=True).clamp(min=1)
        new = torch.einsum("bk,bkd->bd", w, state.hidden[:, :kc])[:, None]
        origin = torch.where(dropped, state.origin, torch.full_like(state.origin, 10**9)).amin(1, keepdim=True)
        return PruneDecision(keep=dec.keep, new_tokens=new, new_mask=dropped.any(1, keepdim=True),
                             new_origin=origin.clamp(max=int(state.origin.max())))
