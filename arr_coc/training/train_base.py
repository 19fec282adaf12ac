"""Stage 1: train the base VLM on the embedded task (full tokens plus random token dropping).

```
python -m arr_coc.training.train_base --out checkpoints/base_vlm --run-dir experiments/runs/base_vlm \
    --max-minutes 90
```

The shipped checkpoint's exact phases (``--resume`` with ``--max-steps`` / ``--stop-at-step``)
are in experiments/results/base_vlm.md.

Writes, whenever validation accuracy improves, ``--out``: ``model.safetensors``,
``config.json`` (BaseVLM), the tokenizer, ``train_args.json`` and ``training_log.csv`` (the
learning curve: one row per evaluation). ``--run-dir`` gets the same log and a resumable
``last.pt`` (model + optimiser + step + RNG), which ``--resume`` continues from.

The recipe (why each part is there: experiments/results/base_vlm.md):

- examples generated on the fly (never the same image twice), several questions per image;
- auxiliary per-patch colour / shape heads on the ViT tokens (the task's exact cell labels);
- attention supervision: the readout token's attention in head 0 of the first LLM layer
  is pushed onto the candidates covering the object the question names (the anchor), in
  head 0 of the last layer onto the object the answer is read from (the target); this
  gives the routing a gradient before the answer does;
- counts (``--count-attn-weight``): softmax attention alone cannot count, so head 1 of the
  first layer is pushed to put n / 8 of its mass on the n matching objects (the rest on the
  question tokens), a mixture from which the count can be read; full-token rows only;
- a curriculum: single-object questions first, everything once their validation accuracy
  reaches ``--curriculum-threshold`` (0 disables);
- random allocations half of the time: a random 5-100 % of the candidates (fine tokens plus
  pooled 2x2 and 4x4 tokens, levels mixed with random per-image preferences), in raster
  order, so that any allocator's output is in distribution; the other half full tokens;
- AdamW with linear warmup and cosine decay; Llama initializer range 0.1.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from arr_coc.pyramid import build_pyramid, raster_key
from arr_coc.training.backbones import LLMConfig, VisionConfig
from arr_coc.training.base_vlm import BaseVLM, BaseVLMConfig, candidate_regions
from arr_coc.training.task import VQABatch
from arr_coc.training.tasks import build_task
from arr_coc.training.tokenizer import build_tokenizer, load_tokenizer

__all__ = ["evaluate", "main", "parse_args", "random_allocation", "relevance_preserving_allocation", "train"]

SINGLE_OBJECT = ("shape", "colour", "side")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m arr_coc.training.train_base", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="checkpoints/base_vlm", help="where the best checkpoint goes")
    p.add_argument("--run-dir", default="experiments/runs/base_vlm", help="log + resumable state")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--init-from", default=None,
                   help="start from the model weights of another run's last.pt (fresh optimiser, step 0, stage 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=("sort_of_clevr", "clutter"), default="sort_of_clevr",
                   help="sort_of_clevr: the v1 task; clutter: benchmark v2 (arr_coc.training.clutter_task)")
    p.add_argument("--clip", default=None,
                   help="a stage-0 CLIP folder (arr_coc.training.train_clip): its vision tower is loaded and frozen, "
                   "its text tower carried along (frozen) for text-conditioned baselines")
    p.add_argument("--drop", choices=("image", "question", "shared"), default="image",
                   help="image: one random allocation per image (v1); question: one per question that then adds the "
                   "fine token of every relevant cell it left uncovered (answers always stay visible); shared: one per "
                   "image that keeps every cell any of its questions needs, the LLM reading each image's visual tokens "
                   "once for all its questions (several times faster per question)")
    p.add_argument("--bucket-images", type=int, default=4,
                   help="--drop shared: images per LLM call, grouped by kept count (less padding)")
    p.add_argument("--ramp-steps", type=int, default=0,
                   help="token curriculum: over the first RAMP_STEPS steps the largest kept fraction of a dropped row "
                   "and the full-token probability grow linearly from keep_min and 0 to 1 and --full-prob, so routing "
                   "is first learned among few tokens (0: off)")
    p.add_argument("--keep-dist", choices=("uniform", "loguniform"), default="uniform",
                   help="the kept fraction f of a dropped row: U(keep_min, 1) or exp U(log keep_min, 0)")
    p.add_argument("--train-objects", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="clutter task: objects per TRAINING scene (validation and the shipped task spec keep the "
                   "task's own range); a wider range with simple scenes gives counting and nearest easy examples")
    p.add_argument("--train-mix", default=None,
                   help="clutter task: question-type weights of TRAINING batches, e.g. 'nearest=2,count=2' "
                   "(types not named keep their default weight)")
    p.add_argument("--position-quadratic", action="store_true",
                   help="the visual position embedding also reads the centre (y, x) and y^2 + x^2 (squared "
                   "distances become linear in attention); with --init-from a model without them, their weights "
                   "start at zero, so the loaded model's function is unchanged")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--object-cells", type=int, default=1)
    p.add_argument("--vit-dim", type=int, default=96)
    p.add_argument("--vit-depth", type=int, default=4)
    p.add_argument("--vit-heads", type=int, default=4)
    p.add_argument("--llm-dim", type=int, default=96)
    p.add_argument("--llm-layers", type=int, default=2)
    p.add_argument("--llm-heads", type=int, default=4)
    p.add_argument("--llm-init", type=float, default=0.1, help="Llama initializer_range")
    p.add_argument("--attn", choices=("eager", "sdpa"), default="eager",
                   help="the LLM's attention kernel (eager: attention weights available, which the v1 recipe supervises)")
    p.add_argument("--images-per-step", type=int, default=32)
    p.add_argument("--questions-per-image", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--max-steps", type=int, default=4000)
    p.add_argument("--max-minutes", type=float, default=90.0)
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="stop after this step without changing the schedule (which --max-steps sets)")
    p.add_argument("--full-prob", type=float, default=0.5, help="fraction of images at full tokens")
    p.add_argument("--keep-min", type=float, default=0.05, help="smallest kept fraction when dropping")
    p.add_argument("--aux-weight", type=float, default=0.5)
    p.add_argument("--attn-weight", type=float, default=0.5)
    p.add_argument("--count-attn-weight", type=float, default=0.0,
                   help="count questions at full tokens: push head 1 of the first layer's readout attention "
                   "mass on the matching objects towards n / 8 (a count-encoding sink mixture)")
    p.add_argument("--curriculum-threshold", type=float, default=0.9)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--val-images", type=int, default=250)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine 2 threads ran 9x slower)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--plot-only", action="store_true", help="only draw OUT/learning_curve.png from OUT/training_log.csv")
    p.add_argument("--eval-only", action="store_true", help="only evaluate the checkpoint in OUT on a held-out test set")
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--acceptance", choices=("val", "test"), default=None,
                   help="only measure benchmark v2's acceptance criteria for the model in OUT on this split "
                   "(TEST_IMAGES questions) and write OUT/acceptance_<split>.json")
    p.add_argument("--snapshot", action="store_true",
                   help="only write RUN_DIR/last.pt's model (the run's own arguments) to OUT as a BaseVLM folder")
    args = p.parse_args(argv)
    for name in ("images_per_step", "questions_per_image", "max_steps", "eval_every", "val_images", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.drop == "shared" and (args.attn_weight > 0 or args.count_attn_weight > 0):
        raise ValueError("--drop shared: the LLM's attention is not returned; use --attn-weight 0 --count-attn-weight 0")
    if args.bucket_images < 1:
        raise ValueError(f"--bucket-images: expected >= 1, got {args.bucket_images}")
    if not 0.0 < args.keep_min <= 1.0:
        raise ValueError(f"--keep-min: expected in (0, 1], got {args.keep_min}")
    if not 0.0 <= args.full_prob <= 1.0:
        raise ValueError(f"--full-prob: expected in [0, 1], got {args.full_prob}")
    return args


def random_allocation(
    num_images: int,
    positions: torch.Tensor,
    num_fine: int,
    grid: tuple[int, int],
    generator: torch.Generator,
    *,
    full_prob: float = 0.5,
    keep_min: float = 0.05,
    log_uniform: bool = False,
    keep_max: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random allocations: (indices [I, K] long with -1 padding, mask [I, K] bool), raster order.

    positions: [M, 3] candidate positions (fine first). A row is the N fine tokens with
    probability ``full_prob``; otherwise ``round(f N)`` candidates, f ~ U(keep_min, 1) (or
    ``exp U(log keep_min, 0)`` with ``log_uniform``), drawn without replacement with per-image
    random preferences for each level (Gumbel top-k).
    """
    m = positions.shape[0]
    levels = positions[:, 2]
    n_levels = int(levels.max()) + 1
    full = torch.rand(num_images, generator=generator) < full_prob
    u = torch.rand(num_images, generator=generator)
    hi = max(keep_min, min(1.0, keep_max))
    frac = torch.exp(math.log(keep_min) + (math.log(hi) - math.log(keep_min)) * u) if log_uniform else keep_min + (hi - keep_min) * u
    k = torch.where(full, torch.full_like(frac, num_fine), (frac * num_fine).round().clamp(min=1)).long()
    bias = 1.5 * torch.randn(num_images, n_levels, generator=generator)
    gumbel = -torch.log(-torch.log(torch.rand(num_images, m, generator=generator).clamp(1e-9, 1 - 1e-9)))
    scores = bias[:, levels] + gumbel
    scores[full] = torch.where(torch.arange(m) < num_fine, 1.0, -1.0).float().expand(int(full.sum()), m)
    kmax = int(k.max())
    top = scores.topk(kmax, dim=1).indices  # [I, kmax]
    mask = torch.arange(kmax)[None, :] < k[:, None]
    key = raster_key(positions[top], grid)
    key = key.masked_fill(~mask, torch.iinfo(torch.long).max)
    order = key.argsort(dim=1)
    idx = top.gather(1, order)
    mask = mask.gather(1, order)
    return idx.masked_fill(~mask, -1), mask


def relevance_preserving_allocation(
    relevance: torch.Tensor,
    positions: torch.Tensor,
    num_fine: int,
    grid: tuple[int, int],
    generator: torch.Generator,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-question random allocations that keep every relevant cell visible.

    relevance: [Q, N] bool (the question's relevant fine cells). A :func:`random_allocation`
    per question, then the fine token of every relevant cell that no kept candidate covers is
    added (a pooled token covering it counts), and the row is put back in raster order. The
    label never changes: what the answer depends on is always there, what is dropped is any
    subset of the rest, so the LLM learns to answer from the evidence whatever else is missing
    (counting included). Returns (indices [Q, K] long with -1 padding, mask [Q, K] bool).
    """
    idx, mask = random_allocation(relevance.shape[0], positions, num_fine, grid, generator, **kwargs)
    covered = (candidate_regions(grid, positions[idx.clamp(min=0)]) & mask[..., None]).any(1)  # [Q, N]
    missing = relevance & ~covered
    n_miss = int(missing.sum(1).max()) if missing.numel() else 0
    if n_miss == 0:
        return idx, mask
    extra = missing.long().topk(n_miss, dim=1)  # the missing cells first (fine index = cell index)
    extra_mask = extra.values.bool()
    idx = torch.cat([idx, extra.indices.masked_fill(~extra_mask, -1)], 1)
    mask = torch.cat([mask, extra_mask], 1)
    key = raster_key(positions[idx.clamp(min=0)], grid).masked_fill(~mask, torch.iinfo(torch.long).max)
    order = key.argsort(dim=1)
    return idx.gather(1, order), mask.gather(1, order)


def _answer_ids(tok, answers: list[str]) -> torch.Tensor:
    ids = tok.convert_tokens_to_ids(answers)
    return torch.tensor(ids, dtype=torch.long)


def _gather(candidates: torch.Tensor, positions: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor):
    safe = idx.clamp(min=0)
    tokens = candidates.gather(1, safe[..., None].expand(-1, -1, candidates.shape[-1]))
    tokens = tokens * mask[..., None]
    pos = positions[safe].masked_fill(~mask[..., None], -1)
    return tokens, pos


def step_losses(
    vlm: BaseVLM, tok, batch: VQABatch, args, generator: torch.Generator, *, step: int | None = None
) -> dict[str, torch.Tensor]:
    """All training losses of one batch (answer CE + aux patch CE + attention supervision)."""
    frozen_vision = not any(q.requires_grad for q in vlm.vision.parameters())
    with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_vision):
        tokens = vlm.encode_image(batch.images)
    p = vlm.num_prefix_tokens
    fine = tokens[:, p:]
    losses: dict[str, torch.Tensor] = {}
    colour, shape = vlm.patch_logits(tokens)
    aux = torch.zeros(())
    if colour is not None:
        aux = aux + F.cross_entropy(colour.flatten(0, 1), batch.colour_map.flatten())
    if shape is not None:
        aux = aux + F.cross_entropy(shape.flatten(0, 1), batch.shape_map.flatten())
    losses["aux"] = aux
    pyr = build_pyramid(fine, vlm.grid)
    qi = batch.image_index
    ramp_steps = getattr(args, "ramp_steps", 0)
    ramp = 1.0 if step is None or ramp_steps <= 0 else min(1.0, step / ramp_steps)  # the token curriculum
    drop = dict(
        full_prob=args.full_prob * ramp, keep_min=args.keep_min, keep_max=args.keep_min + (1.0 - args.keep_min) * ramp,
        log_uniform=getattr(args, "keep_dist", "uniform") == "loguniform",
    )
    if getattr(args, "drop", "image") == "shared":
        return _shared_step_losses(vlm, tok, batch, args, generator, pyr, drop, losses)
    if getattr(args, "drop", "image") == "question":
        idx, mask = relevance_preserving_allocation(batch.relevance.flatten(1), pyr.positions, pyr.num_fine, vlm.grid, generator, **drop)
        sel, pos = _gather(pyr.candidates[qi], pyr.positions, idx, mask)
        visual = vlm.project(sel)
    else:
        idx, mask = random_allocation(fine.shape[0], pyr.positions, pyr.num_fine, vlm.grid, generator, **drop)
        sel, pos = _gather(pyr.candidates, pyr.positions, idx, mask)
        visual, mask, pos = vlm.project(sel)[qi], mask[qi], pos[qi]
    enc = tok(batch.questions, padding=True, return_tensors="pt")
    want_attn = args.attn_weight > 0 or getattr(args, "count_attn_weight", 0.0) > 0
    out = vlm.answer_logits(visual, mask, pos, enc["input_ids"], enc["attention_mask"], return_attention=want_attn)
    logits, att = out if want_attn else (out, None)
    target_ids = _answer_ids(tok, batch.answers)
    losses["answer"] = F.cross_entropy(logits, target_ids)
    losses["acc"] = (logits.argmax(-1) == target_ids).float().mean().detach()
    losses["attn"] = torch.zeros(())
    if att is None:  # benchmark v2: nothing points the LLM's attention anywhere
        losses["total"] = losses["answer"] + args.aux_weight * losses["aux"]
        return losses
    # attention supervision on the readout token (the v1 recipe)
    regions = candidate_regions(vlm.grid, pos)  # [Q, K, N]
    anchor = (regions & batch.anchor.flatten(1)[:, None, :]).any(-1) & mask
    target = (regions & batch.target.flatten(1)[:, None, :]).any(-1) & mask
    supervised = torch.tensor([t != "count" for t in batch.qtypes])
    attn_loss = torch.zeros(())
    for layer, rel in ((0, anchor), (len(att) - 1, target)):
        ok = supervised & rel.any(-1)
        if ok.any():
            mass = (att[layer][:, 0] * rel).sum(-1)
            attn_loss = attn_loss + (-torch.log(mass[ok] + 1e-6)).mean()
    if getattr(args, "count_attn_weight", 0.0) > 0 and len(att[0].shape) == 3 and att[0].shape[1] > 1:
        full_rows = (mask.sum(1) == pyr.num_fine) & (pos[..., 2].clamp(min=0).sum(1) == 0)
        is_count = torch.tensor([t == "count" for t in batch.qtypes]) & full_rows
        if is_count.any():
            n = batch.target.flatten(1).sum(1).float() / float(getattr(args, "object_cells", 1) ** 2)
            want = (n / 8.0).clamp(max=0.95)
            mass = (att[0][:, 1] * target).sum(-1).clamp(1e-5, 1 - 1e-5)
            bce = -(want * mass.log() + (1 - want) * (1 - mass).log())
            attn_loss = attn_loss + args.count_attn_weight * bce[is_count].mean()
    losses["attn"] = attn_loss
    losses["total"] = losses["answer"] + args.aux_weight * losses["aux"] + args.attn_weight * attn_loss
    return losses


def _shared_step_losses(vlm, tok, batch, args, generator, pyr, drop, losses) -> dict[str, torch.Tensor]:
    """``--drop shared``: one relevance-preserving allocation per image that keeps every cell any
    of its questions needs; the LLM reads each image's visual prefix once for all its questions
    (:meth:`BaseVLM.answer_logits_shared`), images grouped by kept count so padding stays small."""
    qi = batch.image_index
    n_img = batch.images.shape[0]
    rel = batch.relevance.flatten(1)
    union = torch.zeros(n_img, rel.shape[1], dtype=torch.long).index_add_(0, qi, rel.long()) > 0  # [I, N]
    idx, mask = relevance_preserving_allocation(union, pyr.positions, pyr.num_fine, vlm.grid, generator, **drop)
    sel, pos = _gather(pyr.candidates, pyr.positions, idx, mask)
    visual = vlm.project(sel)  # [I, K, Dl]
    enc = tok(batch.questions, padding=True, return_tensors="pt")
    kept = mask.sum(1)
    rows_seen, parts = [], []
    for group in kept.argsort().split(max(1, getattr(args, "bucket_images", 4))):
        k = int(kept[group].max())  # padding is last in every row (raster order, pads at the end)
        local = torch.full((n_img,), -1, dtype=torch.long)
        local[group] = torch.arange(len(group))
        rows = (local[qi] >= 0).nonzero().squeeze(1)
        rows_seen.append(rows)
        parts.append(vlm.answer_logits_shared(
            visual[group, :k], mask[group, :k], pos[group, :k],
            enc["input_ids"][rows], enc["attention_mask"][rows], local[qi[rows]],
        ))
    logits = torch.cat(parts)[torch.cat(rows_seen).argsort()]  # back to question order
    target_ids = _answer_ids(tok, batch.answers)
    losses["answer"] = F.cross_entropy(logits, target_ids)
    losses["acc"] = (logits.argmax(-1) == target_ids).float().mean().detach()
    losses["attn"] = torch.zeros(())
    losses["total"] = losses["answer"] + args.aux_weight * losses["aux"]
    return losses


@torch.no_grad()
def evaluate(vlm: BaseVLM, tok, batch: VQABatch, *, question_types=None, chunk: int = 256) -> dict[str, float]:
    """Accuracy at full tokens, overall and per question type (plus patch-head accuracy)."""
    vlm.eval()
    tokens = torch.cat([vlm.encode_image(batch.images[i : i + chunk]) for i in range(0, len(batch.images), chunk)])
    visual = vlm.project(tokens[:, vlm.num_prefix_tokens :])
    target = _answer_ids(tok, batch.answers)
    preds = []
    for i in range(0, len(batch.questions), chunk):
        qi = batch.image_index[i : i + chunk]
        enc = tok(batch.questions[i : i + chunk], padding=True, return_tensors="pt")
        images, local = qi.unique(return_inverse=True)  # each image's visual tokens read once
        positions = vlm.fine_positions(len(images))
        logits = vlm.answer_logits_shared(visual[images], None, positions, enc["input_ids"], enc["attention_mask"], local)
        preds.append(logits.argmax(-1))
    correct = (torch.cat(preds) == target).float()
    out = {"val_acc": float(correct.mean())}
    types = np.array(batch.qtypes)
    for t in question_types or sorted(set(batch.qtypes)):
        sel = torch.from_numpy(types == t)
        out[f"val_{t}"] = float(correct[sel].mean()) if sel.any() else float("nan")
    colour, shape = vlm.patch_logits(tokens)
    if colour is not None:
        out["patch_colour_acc"] = float((colour.argmax(-1) == batch.colour_map.flatten(1)).float().mean())
    if shape is not None:
        out["patch_shape_acc"] = float((shape.argmax(-1) == batch.shape_map.flatten(1)).float().mean())
    vlm.train()
    return out


@torch.no_grad()
def evaluate_budgets(
    vlm: BaseVLM, tok, batch: VQABatch, *, seed: int = 0, question_types=None, chunk: int = 256
) -> dict[str, dict[str, float]]:
    """Accuracy per question type under simple allocations (sanity checks of the base model).

    full: the N fine tokens; random_K: K fine tokens drawn uniformly per image (K = N/2,
    N/4, N/8); pooled_2x2 / pooled_4x4: only the pooled tokens of one level.
    """
    vlm.eval()
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.cat([vlm.encode_image(batch.images[i : i + chunk]) for i in range(0, len(batch.images), chunk)])
    pyr = build_pyramid(tokens[:, vlm.num_prefix_tokens :], vlm.grid)
    n, m, i_count = pyr.num_fine, pyr.candidates.shape[1], tokens.shape[0]
    levels = pyr.positions[:, 2]
    settings: dict[str, torch.Tensor] = {"full": torch.arange(n).expand(i_count, -1)}
    for k in (n // 2, n // 4, n // 8):
        settings[f"random_{k}"] = torch.rand(i_count, n, generator=gen).argsort(1)[:, :k].sort(1).values
    for lvl, name in ((1, "pooled_2x2"), (2, "pooled_4x4")):
        settings[name] = torch.arange(m)[levels == lvl].expand(i_count, -1)
    target = _answer_ids(tok, batch.answers)
    types = np.array(batch.qtypes)
    out: dict[str, dict[str, float]] = {}
    for name, idx in settings.items():
        mask = torch.ones_like(idx, dtype=torch.bool)
        sel, pos = _gather(pyr.candidates, pyr.positions, idx, mask)
        visual = vlm.project(sel)
        preds = []
        for i in range(0, len(batch.questions), chunk):
            qi = batch.image_index[i : i + chunk]
            enc = tok(batch.questions[i : i + chunk], padding=True, return_tensors="pt")
            logits = vlm.answer_logits(visual[qi], mask[qi], pos[qi], enc["input_ids"], enc["attention_mask"])
            preds.append(logits.argmax(-1))
        correct = (torch.cat(preds) == target).float()
        row = {"all": float(correct.mean()), "tokens": int(idx.shape[1])}
        for t in question_types or sorted(set(batch.qtypes)):
            sel_t = torch.from_numpy(types == t)
            row[t] = float(correct[sel_t].mean()) if sel_t.any() else float("nan")
        out[name] = row
    vlm.train()
    return out


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``floor`` x at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _task_spec(args) -> dict:
    if args.task == "clutter":
        return {"name": "clutter", "image_size": args.image_size, "grid": args.grid}
    return {"name": "sort_of_clevr", "image_size": args.image_size, "grid": args.grid, "object_cells": args.object_cells}


def split_task(args, split: str):
    """The task of a split: train (seed), validation (seed + 1,000,003), test (seed + 2,000,003)."""
    offset = {"train": 0, "val": 1_000_003, "test": 2_000_003}[split]
    return build_task(_task_spec(args), args.seed + offset)


def training_task(args, task):
    """The task training batches are drawn from: ``task`` itself, or (clutter) the same task with
    ``--train-objects`` / ``--train-mix``. Evaluation and the model's task spec never change."""
    if args.train_objects is None and args.train_mix is None:
        return task
    if args.task != "clutter":
        raise ValueError("--train-objects / --train-mix: only with --task clutter")
    from arr_coc.training.clutter_task import DEFAULT_MIX_V2, ClutterVQATask

    mix = dict(DEFAULT_MIX_V2)
    for item in (args.train_mix or "").split(","):
        if not item.strip():
            continue
        name, _, weight = item.partition("=")
        if name.strip() not in mix or not weight:
            raise ValueError(f"--train-mix: expected 'type=weight,...' over {tuple(mix)}, got {args.train_mix!r}")
        mix[name.strip()] = float(weight) * DEFAULT_MIX_V2[name.strip()]
    objects = tuple(args.train_objects) if args.train_objects is not None else task.num_objects
    return ClutterVQATask(task.seed, image_size=task.image_size, grid=task.grid, num_objects=objects, mix=mix)


def load_widening(vlm: BaseVLM, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``vlm``; a position embedding that gained input features
    (``--position-quadratic``) gets the old weights in its first columns and zeros after them, and
    an LLM that gained layers (``--llm-layers`` above the loaded model's) gets the old layers spread
    evenly with the new ones between them (4 -> 6: old 0, new, old 1, old 2, new, old 3; the first
    and last layers stay the old ones). A new layer's
    output projections (attention ``o_proj``, MLP ``down_proj``) start at zero, so it adds nothing to
    the residual stream and the loaded model's function is unchanged."""
    import re

    own = vlm.state_dict()
    state = dict(state)
    key = "position.coord.weight"
    if key in state and key in own and state[key].shape != own[key].shape:
        old, new = state[key], own[key]
        if old.shape[0] != new.shape[0] or old.shape[1] > new.shape[1]:
            raise ValueError(f"--init-from: {key} {tuple(old.shape)} cannot widen to {tuple(new.shape)}")
        state[key] = torch.cat([old, old.new_zeros(old.shape[0], new.shape[1] - old.shape[1])], dim=1)
    layer = re.compile(r"^(llm\.model\.layers\.)(\d+)(\..*)$")

    def count(keys) -> int:
        found = [int(m.group(2)) for k in keys if (m := layer.match(k))]
        return max(found) + 1 if found else 0

    n_old, n_new = count(state), count(own)
    if n_old and n_new > n_old:
        extra = n_new - n_old
        where = {i: i + -(-i * extra // n_old) for i in range(n_old)}  # old layer -> its new index
        grown = {k: v for k, v in state.items() if not layer.match(k)}
        for k, v in state.items():
            if m := layer.match(k):
                grown[f"{m.group(1)}{where[int(m.group(2))]}{m.group(3)}"] = v
        for i in sorted(set(range(n_new)) - set(where.values())):
            for k, v in own.items():
                if (m := layer.match(k)) and int(m.group(2)) == i:
                    zero = k.endswith("o_proj.weight") or k.endswith("down_proj.weight")
                    grown[k] = torch.zeros_like(v) if zero else v.clone()
        state = grown
    elif n_old and n_new < n_old:
        raise ValueError(f"--init-from: the loaded LLM has {n_old} layers, more than --llm-layers {n_new}")
    vlm.load_state_dict(state)


def build(args) -> tuple[object, object, BaseVLM]:
    """The training task, its tokenizer and a fresh base VLM. With ``--clip`` the vision tower
    and the text tower come from the stage-0 CLIP (sizes from its config) and are frozen."""
    task = split_task(args, "train")
    tok = build_tokenizer(task)
    llm = LLMConfig(
        hidden_size=args.llm_dim, num_layers=args.llm_layers, num_heads=args.llm_heads,
        intermediate_size=2 * args.llm_dim, initializer_range=args.llm_init, attn_implementation=args.attn,
    )
    quadratic = dict(position_quadratic=True) if getattr(args, "position_quadratic", False) else {}
    if args.clip is None:
        vision = VisionConfig(
            img_size=args.image_size, patch_size=args.image_size // args.grid,
            embed_dim=args.vit_dim, depth=args.vit_depth, num_heads=args.vit_heads,
        )
        vlm = BaseVLM(BaseVLMConfig.for_task(task, tok, vision=vision, llm=llm, task_spec=_task_spec(args), **quadratic))
        return task, tok, vlm
    from dataclasses import asdict

    from arr_coc.training.clip import ClipModel

    clip = ClipModel.from_pretrained(args.clip)
    if len(load_tokenizer(args.clip)) != len(tok):
        raise ValueError(f"--clip: its tokenizer does not match the task's ({args.clip})")
    cfg = BaseVLMConfig.for_task(
        task, tok, vision=clip.config.vision, llm=llm, task_spec=_task_spec(args),
        text_tower=asdict(clip.config.text), clip_embed_dim=clip.config.embed_dim, **quadratic,
    )
    cfg.colour_classes = cfg.shape_classes = 0  # the tower is frozen: its auxiliary heads stayed in stage 0
    vlm = BaseVLM(cfg)
    vlm.load_clip(clip)
    for module in (vlm.vision, vlm.text_tower, vlm.visual_projection, vlm.text_projection):
        module.requires_grad_(False)
    return task, tok, vlm


def train(args) -> dict[str, float]:
    """Run stage 1; returns the best validation metrics."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task, tok, vlm = build(args)
    train_task = training_task(args, task)
    qtypes_all = list(task.question_types)
    val = split_task(args, "val").fixed_batch(args.val_images, 4)
    trainable = [q for q in vlm.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    run_dir, out_dir = Path(args.run_dir), Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "training_log.csv"
    rng = np.random.default_rng([args.seed, 11])
    gen = torch.Generator().manual_seed(args.seed)
    step, stage, best, seen, elapsed0 = 0, 0 if args.curriculum_threshold > 0 else 1, {"val_acc": -1.0}, 0, 0.0
    if args.resume and (run_dir / "last.pt").is_file():
        state = torch.load(run_dir / "last.pt", weights_only=False)
        vlm.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, stage, best, seen, elapsed0 = state["step"], state["stage"], state["best"], state["seen"], state["elapsed"]
        rng = state["rng"]
        gen.set_state(state["gen"])
    else:
        if args.init_from is not None:
            load_widening(vlm, torch.load(args.init_from, weights_only=False, map_location="cpu")["model"])
            stage = 1  # a trained model: every question type from the start
        if log_path.exists():
            log_path.unlink()
    fields = ["step", "minutes", "questions_seen", "stage", "lr", "loss", "answer_loss", "aux_loss", "attn_loss",
              "train_acc", "val_acc", *[f"val_{t}" for t in qtypes_all], "patch_colour_acc", "patch_shape_acc"]
    if not log_path.exists():
        with log_path.open("w", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writeheader()
    (run_dir / "train_args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    start = time.time() - elapsed0 * 60.0
    running: dict[str, float] = {}
    vlm.train()
    last = args.max_steps if args.stop_at_step is None else min(args.max_steps, args.stop_at_step)
    while step < last and (time.time() - start) / 60.0 < args.max_minutes:
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step, args.warmup, args.max_steps)
        qtypes = SINGLE_OBJECT if stage == 0 else None
        batch = train_task.batch(rng, args.images_per_step, args.questions_per_image, qtypes=qtypes)
        losses = step_losses(vlm, tok, batch, args, gen, step=step)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        seen += len(batch.questions)
        for key in ("total", "answer", "aux", "attn", "acc"):
            value = float(losses[key].detach())
            running[key] = 0.9 * running.get(key, value) + 0.1 * value
        if step % args.log_every == 0:
            print(
                f"step {step} {(time.time() - start) / 60:.1f} min stage {stage} loss {running['total']:.3f} "
                f"ans {running['answer']:.3f} aux {running['aux']:.3f} attn {running['attn']:.3f} "
                f"acc {running['acc']:.3f}",
                flush=True,
            )
        if step % args.eval_every == 0 or step == last:
            metrics = evaluate(vlm, tok, val, question_types=qtypes_all)
            minutes = (time.time() - start) / 60.0
            row = {
                "step": step, "minutes": round(minutes, 2), "questions_seen": seen, "stage": stage,
                "lr": opt.param_groups[0]["lr"], "loss": running["total"], "answer_loss": running["answer"],
                "aux_loss": running["aux"], "attn_loss": running["attn"], "train_acc": running["acc"], **metrics,
            }
            with log_path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writerow({k: row.get(k) for k in fields})
            print("eval", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            if stage == 0:
                single = np.nanmean([metrics[f"val_{t}"] for t in SINGLE_OBJECT])
                if single >= args.curriculum_threshold:
                    stage = 1
                    print(f"curriculum: single-object accuracy {single:.3f}, switching to all question types", flush=True)
            if stage == 1 and metrics["val_acc"] > best["val_acc"]:
                best = {**metrics, "step": step, "minutes": minutes, "questions_seen": seen}
                vlm.save_pretrained(out_dir)
                tok.save_pretrained(str(out_dir))
                (out_dir / "train_args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
                (out_dir / "best.json").write_text(json.dumps(best, indent=2) + "\n")
            tmp = run_dir / "last.pt.tmp"
            torch.save(
                {"model": vlm.state_dict(), "opt": opt.state_dict(), "step": step, "stage": stage, "best": best,
                 "seen": seen, "elapsed": minutes, "rng": rng, "gen": gen.get_state()},
                tmp,
            )
            os.replace(tmp, run_dir / "last.pt")
            if out_dir.exists():
                (out_dir / "training_log.csv").write_text(log_path.read_text())
    return best


def plot_learning_curve(log_csv: str | Path, png: str | Path) -> Path:
    """Validation accuracy per question type against questions seen (from a training log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(Path(log_csv).open()))
    if not rows:
        raise ValueError(f"log_csv: no rows in {log_csv}")
    seen = [int(r["questions_seen"]) / 1000 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(seen, [float(r["val_acc"]) for r in rows], "k-", lw=2, label="all")
    for t in [k[len("val_"):] for k in rows[0] if k.startswith("val_") and k != "val_acc"]:
        ax.plot(seen, [float(r[f"val_{t}"]) for r in rows], lw=1, label=t)
    switch = [s for s, r0, r1 in zip(seen[1:], rows, rows[1:]) if r0["stage"] != r1["stage"]]
    for s in switch:
        ax.axvline(s, color="grey", ls=":", lw=1)
    ax.set_xlabel("training questions seen (thousands)")
    ax.set_ylabel("validation accuracy, full tokens")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)


def snapshot(run_dir: str | Path, out: str | Path) -> dict:
    """Write the model of ``run_dir/last.pt`` (built from ``run_dir/train_args.json``) to ``out``
    as a loadable BaseVLM folder with its tokenizer; returns the run's state summary."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "last.pt").is_file() or not (run_dir / "train_args.json").is_file():
        raise ValueError(f"run_dir: expected last.pt and train_args.json in {run_dir}")
    saved = json.loads((run_dir / "train_args.json").read_text())
    args = parse_args([])
    for key, value in saved.items():
        setattr(args, key, value)
    _, tok, vlm = build(args)
    state = torch.load(run_dir / "last.pt", weights_only=False)
    vlm.load_state_dict(state["model"])
    vlm.save_pretrained(out)
    tok.save_pretrained(str(out))
    meta = {"step": state["step"], "curriculum_stage": state["stage"], "questions_seen": state["seen"],
            "minutes": state["elapsed"], "best_val": state["best"], "run_dir": str(run_dir)}
    (out / "snapshot.json").write_text(json.dumps(meta, indent=2) + "\n")
    if (run_dir / "training_log.csv").is_file():
        (out / "training_log.csv").write_text((run_dir / "training_log.csv").read_text())
    return meta


def acceptance_check(folder: str | Path, split: str = "val", *, size: int = 1024, write: bool = True) -> dict:
    """Benchmark v2's acceptance criteria (tests/training/test_base_vlm_v2_acceptance.py) measured
    on ``split`` for the BaseVLM in ``folder``: accuracy per question type of full tokens, the
    ground-truth reference (``oracle``) and ``random`` at 1/4, 1/9, 1/16 of the fine tokens, and
    whether each criterion holds. Writes ``folder/acceptance_<split>.json`` (``write``). Read on validation
    while training; the test split is for the shipped checkpoint."""
    from arr_coc.allocators import create_allocator
    from arr_coc.evaluation import ORACLE, build_eval_batches, evaluate_allocators
    from arr_coc.training.clutter_task import SPLIT_SEEDS

    if split not in ("val", "test"):
        raise ValueError(f"split: expected 'val' or 'test', got {split!r}")
    folder = Path(folder)
    vlm = BaseVLM.from_pretrained(folder).eval()
    seed = SPLIT_SEEDS[split]
    task = build_task(vlm.config.task_spec, seed)
    n = vlm.num_patches
    budgets = [round(n / 4), round(n / 9), round(n / 16)]
    batches = build_eval_batches(task, load_tokenizer(folder), start=0, size=size, batch_size=128)
    allocators = {"full": create_allocator("full"), "random": create_allocator("random", seed=0), ORACLE: ORACLE}
    types = list(task.question_types)
    rows = evaluate_allocators(vlm, allocators, batches, budgets, question_types=types, progress=False)
    table = {f"{r['allocator']}@{r['budget']}": {"all": r["accuracy"], **{t: r[f"acc_{t}"] for t in types}} for r in rows}
    full = table[f"full@{budgets[0]}"]
    checks = {
        "full >= 0.95": full["all"] >= 0.95,
        "full >= 0.90 on every type": all(full[t] >= 0.90 for t in types),
        **{f"oracle@{b} >= 95% of full on every type": all(table[f"{ORACLE}@{b}"][t] >= 0.95 * full[t] for t in types)
           for b in budgets},
        f"random@{budgets[1]} <= 70% of full": table[f"random@{budgets[1]}"]["all"] <= 0.70 * full["all"],
    }
    result = {"split": split, "task_seed": seed, "questions": size, "budgets": budgets, "accuracy": table,
              "checks": checks, "passed": all(checks.values())}
    if write:
        (folder / f"acceptance_{split}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.snapshot:
        meta = snapshot(args.run_dir, args.out)
        print(json.dumps(meta), flush=True)
        return meta
    if args.plot_only:
        png = plot_learning_curve(Path(args.out) / "training_log.csv", Path(args.out) / "learning_curve.png")
        print(f"wrote {png}")
        return {}
    if args.acceptance is not None:
        torch.set_num_threads(args.threads)
        result = acceptance_check(args.out, args.acceptance, size=args.test_images)
        print(json.dumps(result, indent=2))
        return result
    if args.eval_only:
        torch.set_num_threads(args.threads)
        vlm = BaseVLM.from_pretrained(args.out)
        tok = load_tokenizer(args.out)
        test_task = split_task(args, "test")
        test = test_task.fixed_batch(args.test_images, 4)
        result = evaluate_budgets(vlm, tok, test, seed=args.seed, question_types=list(test_task.question_types))
        result["_meta"] = {"test_questions": len(test.questions), "task_seed": test_task.seed, "stream": 7}
        (Path(args.out) / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return result["full"]
    best = train(args)
    print("best", json.dumps(best), flush=True)
    return best


if __name__ == "__main__":
    main()
