"""Stage 0 of benchmark v2 (arr_coc.training.train_clip) on a tiny config: a training run, the
object-cell accuracies and the MLP shape probe."""

from __future__ import annotations

import json

import numpy as np
import torch

from arr_coc.training.clip import ClipModel
from arr_coc.training.clutter_task import ClutterVQATask
from arr_coc.training.tokenizer import load_tokenizer
from arr_coc.training.train_clip import OBJECT_CLASS_START, _pairs, evaluate_retrieval, main, shape_probe

TINY = ["--image-size", "48", "--grid", "6", "--vit-dim", "16", "--vit-depth", "1", "--vit-heads", "2",
        "--text-dim", "16", "--embed-dim", "8", "--batch", "4", "--val-images", "8", "--warmup", "1"]


def test_tiny_run_then_object_cell_accuracy_and_probe(tmp_path):
    out, run = tmp_path / "clip", tmp_path / "run"
    main([*TINY, "--out", str(out), "--run-dir", str(run), "--max-steps", "2", "--eval-every", "2"])
    clip = ClipModel.from_pretrained(out).eval()
    tok = load_tokenizer(out)
    task = ClutterVQATask(5, image_size=48, grid=6, num_objects=(2, 4), num_distractors=(1, 2))
    images, captions, cmap, smap = _pairs(task, np.random.default_rng(0), 6)
    res = evaluate_retrieval(clip, tok, images, captions, cmap, smap)
    with torch.no_grad():
        _, shape = clip.patch_logits(clip.encode_image(images))
    labels = smap.flatten(1)
    on = labels >= OBJECT_CLASS_START
    want = float((shape.argmax(-1) == labels)[on].float().mean())
    assert abs(res["object_shape_acc"] - want) < 1e-6  # object cells only, not background / distractors
    assert 0.0 <= res["object_colour_acc"] <= 1.0 and res["n"] == 6
    probe = shape_probe(clip, task, ClutterVQATask(6, image_size=48, grid=6, num_objects=(2, 4)),
                        train_images=20, val_images=10, steps=5)
    _, _, _, s_tr = _pairs(task, np.random.default_rng([task.seed, 21]), 20)
    assert probe["train_cells"] == int((s_tr >= OBJECT_CLASS_START).sum())  # one row per object cell
    assert 0.0 <= probe["probe_val_acc"] <= 1.0
    result = main([*TINY, "--out", str(out), "--probe-only"])
    assert json.loads((out / "probe.json").read_text()) == result
