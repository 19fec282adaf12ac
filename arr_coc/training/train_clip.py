"""Stage 0 of benchmark v2: train the CLIP vision + text towers on (scene, caption) pairs.

```
python -m arr_coc.training.train_clip --out checkpoints/clip_v2 --run-dir experiments/runs/clip_v2
```

Each step draws fresh scenes of :class:`~arr_coc.training.clutter_task.ClutterVQATask` (train
seed) and one caption per scene generated from its scene graph; the loss is this package's
:class:`arr_coc.losses.ClipLoss` (symmetric InfoNCE, learnable temperature) plus the auxiliary
per-patch colour / shape cross-entropies (weight ``--aux-weight``). Validation (scenes of the
validation seed, fixed captions) reports zero-shot retrieval among ``--val-images`` pairs:
image -> caption and caption -> image top-1 and top-5 accuracy (chance: 1 / val-images), the
InfoNCE bound on I(image; caption) of that set, and the patch heads' accuracy.

Writes ``--out`` (model, config, tokenizer, ``best.json``, ``training_log.csv``) whenever the
validation top-1 (mean of both directions) improves, and a resumable ``--run-dir/last.pt``.

``--init-from FOLDER --lock-vision`` continues from a saved CLIP with the vision tower frozen
(locked-image tuning, Zhai et al. 2022, "LiT"): the text tower and both projections keep
learning while every patch token stays exactly what a base VLM built on that tower reads.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from arr_coc.losses import ClipLoss
from arr_coc.training.backbones import VisionConfig
from arr_coc.training.clip import ClipConfig, ClipModel, TextTowerConfig
from arr_coc.training.clutter_task import COLOURS_V2, SHAPES_V2, SPLIT_SEEDS, ClutterVQATask
from arr_coc.training.task import CELL_DISTRACTOR
from arr_coc.training.tokenizer import build_tokenizer, load_tokenizer, readout_id
from arr_coc.training.train_base import lr_factor

OBJECT_CLASS_START = CELL_DISTRACTOR + 1  # cell label ids: 0 background, 1 distractor, then the classes

__all__ = ["build", "evaluate_retrieval", "main", "parse_args", "train"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m arr_coc.training.train_clip", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="checkpoints/clip_v2")
    p.add_argument("--run-dir", default="experiments/runs/clip_v2")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-from", default=None, help="start from this saved CLIP folder")
    p.add_argument("--lock-vision", action="store_true", help="freeze the vision tower (and its patch heads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--vit-dim", type=int, default=96)
    p.add_argument("--vit-depth", type=int, default=4)
    p.add_argument("--vit-heads", type=int, default=4)
    p.add_argument("--text-dim", type=int, default=96)
    p.add_argument("--text-depth", type=int, default=2)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=1500)
    p.add_argument("--max-minutes", type=float, default=60.0)
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="stop after this step without changing the schedule (which --max-steps sets)")
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument("--aux-object-weight", type=float, default=0.0,
                   help="weight of the patch colour / shape cross-entropies averaged over object cells only "
                        "(the all-cell average is mostly background, which a head can get right without "
                        "reading shapes)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-images", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--probe-only", action="store_true",
                   help="only measure the CLIP in OUT on validation scenes (retrieval, object-cell head accuracy, "
                   "an MLP shape probe) and write OUT/probe.json")
    args = p.parse_args(argv)
    for name in ("batch", "max_steps", "eval_every", "val_images", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    return args


def build(args) -> tuple[ClutterVQATask, object, ClipModel]:
    task = ClutterVQATask(SPLIT_SEEDS["train"] + args.seed, image_size=args.image_size, grid=args.grid)
    tok = build_tokenizer(task)
    cfg = ClipConfig(
        vision=VisionConfig(
            img_size=args.image_size, patch_size=args.image_size // args.grid,
            embed_dim=args.vit_dim, depth=args.vit_depth, num_heads=args.vit_heads,
        ),
        text=TextTowerConfig(
            vocab_size=len(tok), pad_token_id=int(tok.pad_token_id), eos_token_id=readout_id(tok),
            dim=args.text_dim, depth=args.text_depth,
        ),
        embed_dim=args.embed_dim,
        colour_classes=2 + len(COLOURS_V2),
        shape_classes=2 + len(SHAPES_V2),
    )
    return task, tok, ClipModel(cfg)


def _pairs(task: ClutterVQATask, rng: np.random.Generator, n: int):
    scenes = [task._make_scene(rng) for _ in range(n)]
    images = torch.from_numpy(np.ascontiguousarray(np.stack([s.image.transpose(2, 0, 1) for s in scenes])))
    captions = [task.caption(s, rng) for s in scenes]
    cmap = torch.from_numpy(np.stack([s.colour_map for s in scenes]))
    smap = torch.from_numpy(np.stack([s.shape_map for s in scenes]))
    return images, captions, cmap, smap


def losses_of(
    clip: ClipModel, loss_fn: ClipLoss, tok, images, captions, cmap, smap, aux_weight: float,
    aux_object_weight: float = 0.0,
):
    """The CLIP loss plus ``aux_weight`` x the per-patch colour / shape cross-entropies over all cells
    plus ``aux_object_weight`` x the same over object cells only (``smap >= OBJECT_CLASS_START``)."""
    locked = not any(q.requires_grad for q in clip.vision.parameters())
    with torch.set_grad_enabled(torch.is_grad_enabled() and not locked):
        tokens = clip.encode_image(images)
    enc = tok(captions, padding=True, return_tensors="pt")
    out = loss_fn(clip.image_embedding(tokens), clip.text_embedding(enc["input_ids"], enc["attention_mask"]))
    if locked:
        aux = torch.zeros(())
        return {"total": out["loss"], "clip": out["loss"], "aux": aux, "scale": out["logit_scale"]}
    colour, shape = clip.patch_logits(tokens)
    colour, shape, cmap, smap = colour.flatten(0, 1), shape.flatten(0, 1), cmap.flatten(), smap.flatten()
    aux = F.cross_entropy(colour, cmap) + F.cross_entropy(shape, smap)
    total = out["loss"] + aux_weight * aux
    objects = smap >= OBJECT_CLASS_START
    if aux_object_weight > 0 and bool(objects.any()):
        total = total + aux_object_weight * (
            F.cross_entropy(colour[objects], cmap[objects]) + F.cross_entropy(shape[objects], smap[objects])
        )
    return {"total": total, "clip": out["loss"], "aux": aux, "scale": out["logit_scale"]}


@torch.no_grad()
def evaluate_retrieval(
    clip: ClipModel, tok, images, captions, cmap=None, smap=None, *, scale: float = 1 / 0.07, chunk: int = 128
) -> dict[str, float]:
    """Zero-shot retrieval among the given pairs (row i of each is a pair); ``scale``: the
    trained logit scale, for the InfoNCE bound log N - CE."""
    was = clip.training
    clip.eval()
    img, txt, col_ok, sh_ok, obj = [], [], [], [], []
    for i in range(0, len(captions), chunk):
        tokens = clip.encode_image(images[i : i + chunk])
        img.append(clip.image_embedding(tokens))
        enc = tok(captions[i : i + chunk], padding=True, return_tensors="pt")
        txt.append(clip.text_embedding(enc["input_ids"], enc["attention_mask"]))
        if cmap is not None:
            colour, shape = clip.patch_logits(tokens)
            col_ok.append((colour.argmax(-1) == cmap[i : i + chunk].flatten(1)).float())
            sh_ok.append((shape.argmax(-1) == smap[i : i + chunk].flatten(1)).float())
            obj.append(smap[i : i + chunk].flatten(1) >= OBJECT_CLASS_START)
    sim = torch.cat(img) @ torch.cat(txt).T  # [N, N]
    n = sim.shape[0]
    target = torch.arange(n)
    out: dict[str, float] = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        top = s.topk(min(5, n), dim=1).indices
        out[f"{name}_top1"] = float((top[:, 0] == target).float().mean())
        out[f"{name}_top5"] = float((top == target[:, None]).any(1).float().mean())
    logits = scale * sim
    ce = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    out["infonce_bound_nats"] = float(math.log(n) - ce)
    out["n"] = n
    if col_ok:
        out["patch_colour_acc"] = float(torch.cat(col_ok).mean())
        out["patch_shape_acc"] = float(torch.cat(sh_ok).mean())
        on = torch.cat(obj)  # object cells only: background and distractor cells dominate the two above
        out["object_colour_acc"] = float(torch.cat(col_ok)[on].mean())
        out["object_shape_acc"] = float(torch.cat(sh_ok)[on].mean())
    clip.train(was)
    return out


def train(args) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task, tok, clip = build(args)
    if args.init_from is not None:
        clip = ClipModel.from_pretrained(args.init_from)
    if args.lock_vision:
        for module in (clip.vision, clip.colour_head, clip.shape_head):
            if module is not None:
                module.requires_grad_(False)
    loss_fn = ClipLoss()
    val_task = ClutterVQATask(SPLIT_SEEDS["val"] + args.seed, image_size=args.image_size, grid=args.grid)
    val = _pairs(val_task, np.random.default_rng([val_task.seed, 5]), args.val_images)
    params = [q for q in list(clip.parameters()) + list(loss_fn.parameters()) if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    run_dir, out_dir = Path(args.run_dir), Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "training_log.csv"
    rng = np.random.default_rng([task.seed, 13])
    step, best, elapsed0 = 0, {"top1": -1.0}, 0.0
    if args.resume and (run_dir / "last.pt").is_file():
        state = torch.load(run_dir / "last.pt", weights_only=False)
        clip.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        opt.load_state_dict(state["opt"])
        step, best, elapsed0, rng = state["step"], state["best"], state["elapsed"], state["rng"]
    elif log_path.exists():
        log_path.unlink()
    fields = ["step", "minutes", "lr", "loss", "clip_loss", "aux_loss", "logit_scale", "i2t_top1", "i2t_top5",
              "t2i_top1", "t2i_top5", "infonce_bound_nats", "n", "patch_colour_acc", "patch_shape_acc"]
    if not log_path.exists():
        with log_path.open("w", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writeheader()
    (run_dir / "train_args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    start = time.time() - elapsed0 * 60.0
    running: dict[str, float] = {}
    clip.train()
    last = args.max_steps if args.stop_at_step is None else min(args.max_steps, args.stop_at_step)
    while step < last and (time.time() - start) / 60.0 < args.max_minutes:
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step, args.warmup, args.max_steps, floor=0.05)
        losses = losses_of(clip, loss_fn, tok, *_pairs(task, rng, args.batch), args.aux_weight,
                           args.aux_object_weight)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        for key in ("total", "clip", "aux", "scale"):
            v = float(losses[key].detach())
            running[key] = 0.9 * running.get(key, v) + 0.1 * v
        if step % args.log_every == 0:
            print(f"step {step} {(time.time() - start) / 60:.1f} min loss {running['total']:.3f} "
                  f"clip {running['clip']:.3f} aux {running['aux']:.3f} scale {running['scale']:.1f}", flush=True)
        if step % args.eval_every == 0 or step == last:
            metrics = evaluate_retrieval(clip, tok, *val, scale=float(losses["scale"]))
            minutes = (time.time() - start) / 60.0
            row = {"step": step, "minutes": round(minutes, 2), "lr": opt.param_groups[0]["lr"], "loss": running["total"],
                   "clip_loss": running["clip"], "aux_loss": running["aux"], "logit_scale": running["scale"], **metrics}
            with log_path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writerow({k: row.get(k) for k in fields})
            print("eval", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            top1 = 0.5 * (metrics["i2t_top1"] + metrics["t2i_top1"])
            if top1 > best["top1"]:
                best = {**metrics, "top1": top1, "step": step, "minutes": minutes}
                clip.save_pretrained(out_dir)
                tok.save_pretrained(str(out_dir))
                (out_dir / "best.json").write_text(json.dumps(best, indent=2) + "\n")
                (out_dir / "train_args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
            tmp = run_dir / "last.pt.tmp"
            torch.save({"model": clip.state_dict(), "loss": loss_fn.state_dict(), "opt": opt.state_dict(), "step": step,
                        "best": best, "elapsed": minutes, "rng": rng}, tmp)
            os.replace(tmp, run_dir / "last.pt")
            if out_dir.exists():
                (out_dir / "training_log.csv").write_text(log_path.read_text())
    return best


def shape_probe(
    clip: ClipModel, train_task: ClutterVQATask, val_task: ClutterVQATask, *,
    train_images: int = 1500, val_images: int = 300, steps: int = 1500, seed: int = 0,
) -> dict[str, float]:
    """How well the frozen vision tower's tokens tell an object's shape: an MLP probe (one
    hidden layer of 256, Adam 1e-3, batch 256) from an object cell's output token to its shape,
    fitted on ``train_task`` scenes, accuracy on ``val_task`` scenes. What a stage-1 LLM can
    read about shapes is bounded by what this probe (and the linear head) find."""
    gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def cells(task: ClutterVQATask, n: int, stream: int):
        images, _, _, smap = _pairs(task, np.random.default_rng([task.seed, stream]), n)
        tokens = torch.cat([clip.encode_image(images[i : i + 128])[:, clip.num_prefix_tokens :] for i in range(0, n, 128)])
        labels = smap.flatten(1)
        on = labels >= OBJECT_CLASS_START
        return tokens[on], labels[on] - OBJECT_CLASS_START

    clip.eval()
    x_tr, y_tr = cells(train_task, train_images, 21)
    x_va, y_va = cells(val_task, val_images, 22)
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    n_cls = int(max(y_tr.max(), y_va.max())) + 1
    probe = torch.nn.Sequential(torch.nn.Linear(x_tr.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, n_cls))
    opt = torch.optim.Adam(probe.parameters(), lr=1e-3)
    for _ in range(steps):
        i = torch.randint(0, len(x_tr), (256,), generator=gen)
        loss = F.cross_entropy(probe((x_tr[i] - mu) / sd), y_tr[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = lambda x, y: float((probe((x - mu) / sd).argmax(-1) == y).float().mean())  # noqa: E731
        return {"probe_train_acc": acc(x_tr, y_tr), "probe_val_acc": acc(x_va, y_va),
                "train_cells": len(y_tr), "val_cells": len(y_va)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.probe_only:  # measure the saved tower in --out (object-cell heads and the MLP probe)
        torch.set_num_threads(args.threads)
        clip = ClipModel.from_pretrained(args.out)
        tok = load_tokenizer(args.out)
        task = build(args)[0]
        val = ClutterVQATask(task.seed + SPLIT_SEEDS["val"], image_size=task.image_size, grid=task.grid)
        images, captions, cmap, smap = _pairs(val, np.random.default_rng([val.seed, 5]), args.val_images)
        result = {**evaluate_retrieval(clip, tok, images, captions, cmap, smap), **shape_probe(clip, task, val)}
        (Path(args.out) / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
        print("probe", json.dumps(result), flush=True)
        return result
    best = train(args)
    print("best", json.dumps(best), flush=True)
    return best


if __name__ == "__main__":
    main()
