"""Test doubles for the training tests: a small trainable allocator and a micro VLM."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from arr_coc.allocators import AllocationContext, Allocator, Selection, register_allocator, topk_indices
from arr_coc.allocators.registry import _REGISTRY

__all__ = ["FixedChoice", "TrainableTopK", "micro_vlm", "registered"]


class TrainableTopK(Allocator):
    """Top-k by a learned bilinear score with the query; straight-through gates carry the
    answer loss's gradient to the score; reports a rate (mean keep probability) and an
    InfoNCE critic loss (kept-token summary vs. query summary), as the module expects."""

    def __init__(self, dim: int = 32, query_dim: int | None = None):
        super().__init__()
        self.key = nn.Linear(dim, query_dim or dim)

    def select(self, ctx: AllocationContext) -> Selection:
        q = ctx.query
        if q is None:
            q = ctx.fine.new_zeros(ctx.batch_size, 1, self.key.out_features)
        m = ctx.query_mask if ctx.query_mask is not None and ctx.query is not None else torch.ones(
            q.shape[:2], dtype=torch.bool, device=q.device
        )
        qs = (q * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)  # [B, Dq]
        keys = self.key(ctx.fine)  # [B, N, Dq]
        scores = (keys * qs[:, None]).sum(-1) / math.sqrt(keys.shape[-1])  # [B, N]
        idx = topk_indices(scores, ctx.budget)
        safe = idx.clamp(min=0)
        gate = torch.sigmoid(scores).gather(1, safe)
        tokens = ctx.fine.gather(1, safe[..., None].expand(-1, -1, ctx.fine.shape[-1]))
        tokens = tokens * (1 + gate - gate.detach())[..., None] * (idx >= 0)[..., None]
        critic = keys.mean(1) @ qs.T  # [B, B], positives on the diagonal
        critic_loss = F.cross_entropy(critic, torch.arange(critic.shape[0], device=critic.device))
        rate = torch.sigmoid(scores).mean()
        gain = torch.full((ctx.batch_size,), math.log(ctx.batch_size), device=q.device) - critic_loss.detach()
        return Selection(indices=idx, tokens=tokens, gain=gain, extras={"losses": {"rate": rate, "critic": critic_loss}})


class FixedChoice(Allocator):
    """Keeps the given candidate indices (fine and pooled levels 1, 2) for every example."""

    pyramid_levels = (1, 2)

    def __init__(self, indices: list[int]):
        super().__init__()
        self.choice = list(indices)

    def select(self, ctx: AllocationContext) -> Selection:
        idx = torch.tensor(self.choice, device=ctx.fine.device)[None].expand(ctx.batch_size, -1)
        return Selection(indices=idx)


@contextlib.contextmanager
def registered(name: str, factory):
    """Register ``factory`` under ``name`` for the duration of a test (the registry is global)."""
    if name in _REGISTRY:
        raise RuntimeError(f"{name!r} is already registered")
    register_allocator(name)(factory)
    try:
        yield name
    finally:
        _REGISTRY.pop(name, None)


def micro_vlm(seed: int = 0):
    """A BaseVLM of width 32 (one ViT block, one Llama layer), random weights, 8 x 8 grid."""
    from arr_coc.training.backbones import LLMConfig, VisionConfig
    from arr_coc.training.module import build_vlm

    torch.manual_seed(seed)
    return build_vlm(
        vision=VisionConfig(img_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=2),
        llm=LLMConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
    )


def micro_vlm_v2(seed: int = 0):
    """A benchmark-v2-shaped BaseVLM: 128 x 128 clutter scenes on a 16 x 16 grid, width 32 (one
    ViT block, one Llama layer), with a one-layer CLIP text tower; random weights."""
    from dataclasses import asdict

    from arr_coc.training.backbones import LLMConfig, VisionConfig
    from arr_coc.training.base_vlm import BaseVLM, BaseVLMConfig
    from arr_coc.training.clip import TextTowerConfig
    from arr_coc.training.clutter_task import ClutterVQATask
    from arr_coc.training.tasks import task_spec
    from arr_coc.training.tokenizer import build_tokenizer, readout_id

    torch.manual_seed(seed)
    task = ClutterVQATask(0)
    tok = build_tokenizer(task)
    text = TextTowerConfig(vocab_size=len(tok), pad_token_id=int(tok.pad_token_id), eos_token_id=readout_id(tok), dim=32, depth=1, heads=2)
    cfg = BaseVLMConfig.for_task(
        task, tok,
        vision=VisionConfig(img_size=128, patch_size=8, embed_dim=32, depth=1, num_heads=2),
        llm=LLMConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        text_tower=asdict(text), clip_embed_dim=16, task_spec=task_spec(task),
    )
    return BaseVLM(cfg)
