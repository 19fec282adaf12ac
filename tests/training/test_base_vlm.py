"""BaseVLM on tiny configs: shapes, invariances, persistence, backbone loading, a training smoke run."""

from __future__ import annotations

import csv
import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from arr_coc.pyramid import build_pyramid
from arr_coc.training.backbones import LLMConfig, VisionConfig, build_causal_lm, build_vision_encoder
from arr_coc.training.base_vlm import BaseVLM, BaseVLMConfig
from arr_coc.training.task import VQATask
from arr_coc.training.tokenizer import build_tokenizer

TINY_VISION = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    task = VQATask(0, image_size=32, grid=4, num_objects=(2, 3), num_distractors=(1, 2))
    tok = build_tokenizer(task)
    cfg = BaseVLMConfig.for_task(
        task, tok, vision=VisionConfig(**TINY_VISION), llm=LLMConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    )
    vlm = BaseVLM(cfg).eval()
    exs = [task.example(i) for i in range(3)]
    pixels = torch.stack([e.image for e in exs])
    enc = tok([e.question for e in exs], padding=True, return_tensors="pt")
    return task, tok, vlm, pixels, enc


def test_forward_shapes(setup):
    task, tok, vlm, pixels, enc = setup
    assert vlm.grid == (4, 4) and vlm.num_prefix_tokens == 1
    tokens = vlm.encode_image(pixels)
    assert tokens.shape == (3, 1 + 16, 16)
    visual = vlm.project(tokens[:, 1:])
    assert visual.shape == (3, 16, 16)
    q = vlm.query_embeddings(enc["input_ids"])
    assert torch.equal(q, vlm.llm.get_input_embeddings().weight[enc["input_ids"]])
    logits, att = vlm.answer_logits(visual, None, None, enc["input_ids"], enc["attention_mask"], return_attention=True)
    assert logits.shape == (3, len(tok))
    assert len(att) == 2 and att[0].shape == (3, 2, 16)
    assert torch.all(att[0].sum(-1) <= 1 + 1e-5) and torch.all(att[0] >= 0)
    assert torch.allclose(vlm(pixels, enc["input_ids"], enc["attention_mask"]), logits, atol=1e-5)
    colour, shape = vlm.patch_logits(tokens)
    assert colour.shape == (3, 16, 8) and shape.shape == (3, 16, 6)


def test_positions_none_means_fine_raster_and_padding_is_ignored(setup):
    _, _, vlm, pixels, enc = setup
    tokens = vlm.encode_image(pixels)
    pyr = build_pyramid(tokens[:, 1:], vlm.grid)
    visual = vlm.project(pyr.candidates)
    ids, qm = enc["input_ids"], enc["attention_mask"]
    fine_pos = pyr.positions[:16][None].expand(3, -1, -1)
    ref = vlm.answer_logits(visual[:, :16], None, None, ids, qm)
    explicit = vlm.answer_logits(visual[:, :16], None, fine_pos, ids, qm)
    assert torch.allclose(ref, explicit, atol=1e-5)
    # padded slots (mask False, position -1, arbitrary values) change nothing
    junk = torch.randn(3, 5, visual.shape[-1]) * 100
    padded = torch.cat([visual[:, :16], junk], dim=1)
    mask = torch.cat([torch.ones(3, 16, dtype=torch.bool), torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    pos = torch.cat([fine_pos, torch.full((3, 5, 3), -1)], dim=1)
    assert torch.allclose(vlm.answer_logits(padded, mask, pos, ids, qm), ref, atol=1e-4)
    # pooled tokens with their own positions give a different (finite) answer
    mixed = vlm.answer_logits(visual[:, 16:], None, pyr.positions[16:][None].expand(3, -1, -1), ids, qm)
    assert torch.isfinite(mixed).all() and not torch.allclose(mixed, ref)
    # a question's logits do not depend on the padding of the batch it is in
    alone = vlm.answer_logits(visual[:1, :16], None, None, ids[:1, : int(qm[0].sum())], None)
    assert torch.allclose(alone, ref[:1], atol=1e-5)


def test_bad_inputs_raise(setup):
    _, _, vlm, pixels, enc = setup
    visual = vlm.project(vlm.encode_image(pixels)[:, 1:])
    ids = enc["input_ids"]
    with pytest.raises(ValueError, match="pixels"):
        vlm.encode_image(pixels[:, :1])
    with pytest.raises(ValueError, match="tokens"):
        vlm.project(torch.zeros(3, 4, 5))  # wrong width
    with pytest.raises(ValueError, match="visual_positions"):
        vlm.answer_logits(visual[:, :5], None, None, ids)
    with pytest.raises(ValueError, match="visual_mask"):
        vlm.answer_logits(visual, torch.ones(3, 4, dtype=torch.bool), None, ids)
    with pytest.raises(ValueError, match="question_ids"):
        vlm.answer_logits(visual, None, None, ids[:2])


def test_save_load_round_trip(setup, tmp_path):
    _, tok, vlm, pixels, enc = setup
    vlm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["llm_config"]["model_type"] == "llama" and cfg["vision"]["embed_dim"] == 16
    again = BaseVLM.from_pretrained(tmp_path).eval()
    ref = vlm(pixels, enc["input_ids"], enc["attention_mask"])
    assert torch.equal(again(pixels, enc["input_ids"], enc["attention_mask"]), ref)
    with pytest.raises(ValueError, match="folder"):
        BaseVLM.from_pretrained(tmp_path / "missing")


def test_timm_encoder_loads_a_local_file_through_the_pretrained_overlay(tmp_path):
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TINY_VISION)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    cfg = VisionConfig(pretrained=True, pretrained_file=str(path), **TINY_VISION)
    loaded = build_vision_encoder(cfg)
    for (k, a), (k2, b) in zip(ref.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    fresh = build_vision_encoder(VisionConfig(**TINY_VISION))
    assert not torch.equal(fresh.patch_embed.proj.weight, ref.patch_embed.proj.weight)
    with pytest.raises(ValueError, match="pretrained_file"):
        build_vision_encoder(VisionConfig(pretrained=True, pretrained_file=str(tmp_path / "nope.pt"), **TINY_VISION))
    with pytest.raises(ValueError, match="pretrained"):
        build_vision_encoder(VisionConfig(pretrained=False, pretrained_file=str(path), **TINY_VISION))


def test_causal_lm_loads_from_a_local_folder(tmp_path):
    lm = build_causal_lm(LLMConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), vocab_size=20)
    lm.save_pretrained(tmp_path)
    again = build_causal_lm(LLMConfig(name_or_path=str(tmp_path)))
    ids = torch.randint(0, 20, (2, 5))
    assert torch.allclose(lm(ids).logits, again(ids).logits)
    # a BaseVLM around the loaded LM uses its width
    with pytest.raises(ValueError, match="vocab_size"):
        build_causal_lm(LLMConfig(), vocab_size=None)


def test_training_smoke_run_writes_checkpoint_and_curve(tmp_path):
    from arr_coc.training.train_base import main

    out, run = tmp_path / "ckpt", tmp_path / "run"
    best = main(
        [
            "--out", str(out), "--run-dir", str(run), "--image-size", "32", "--grid", "4",
            "--vit-dim", "16", "--vit-depth", "1", "--vit-heads", "2", "--llm-dim", "16", "--llm-layers", "2",
            "--llm-heads", "2", "--images-per-step", "2", "--questions-per-image", "2", "--max-steps", "4",
            "--eval-every", "2", "--val-images", "3", "--curriculum-threshold", "0", "--warmup", "2",
        ]
    )
    assert 0.0 <= best["val_acc"] <= 1.0 and best["step"] in (2, 4)
    rows = list(csv.DictReader((run / "training_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(float(r["loss"]) > 0 for r in rows)
    model = BaseVLM.from_pretrained(out)
    assert model.grid == (4, 4)
    assert (out / "tokenizer.json").is_file() and (out / "training_log.csv").is_file()
    # held-out evaluation of the written checkpoint at several allocations
    full = main(["--out", str(out), "--eval-only", "--image-size", "32", "--grid", "4", "--test-images", "3"])
    result = json.loads((out / "eval.json").read_text())
    assert full == result["full"] and result["full"]["tokens"] == 16
    assert result["random_4"]["tokens"] == 4 and result["pooled_2x2"]["tokens"] == 4 and result["pooled_4x4"]["tokens"] == 1
    assert all(0.0 <= r["all"] <= 1.0 for k, r in result.items() if k != "_meta")


def test_shared_prefix_equals_one_sequence_per_question_and_carries_gradients(setup):
    task, tok, vlm, pixels, _ = setup
    torch.manual_seed(3)
    tokens = vlm.encode_image(pixels)
    pyr = build_pyramid(tokens[:, 1:], vlm.grid)
    visual = vlm.project(pyr.candidates)  # [3, M, D]: fine + pooled, some rows padded below
    mask = torch.ones(visual.shape[:2], dtype=torch.bool)
    mask[0, 9:] = False
    mask[1, 15:] = False
    pos = pyr.positions[None].expand(3, -1, -1).masked_fill(~mask[..., None], -1)
    questions = ["what colour is the circle ?", "how many objects are there ?", "what shape is the red object ?",
                 "is the blue square on the left ?", "what colour is the square ?"]
    enc = tok(questions, padding=True, return_tensors="pt")
    image_index = torch.tensor([2, 0, 2, 1, 0])  # unsorted, uneven questions per image
    ref = vlm.answer_logits(visual[image_index], mask[image_index], pos[image_index], enc["input_ids"], enc["attention_mask"])
    shared = vlm.answer_logits_shared(visual, mask, pos, enc["input_ids"], enc["attention_mask"], image_index)
    assert torch.allclose(shared, ref, atol=1e-5)
    wrong = vlm.answer_logits_shared(visual, mask, pos, enc["input_ids"], enc["attention_mask"], image_index.flip(0))
    assert not torch.allclose(wrong, ref, atol=1e-3)  # the image each question reads matters
    # an image no question asks about is skipped, and gradients reach the visual tokens
    vis = visual.detach().requires_grad_(True)
    ids1 = enc["input_ids"][3:4]
    out = vlm.answer_logits_shared(vis, mask, pos, ids1, enc["attention_mask"][3:4], torch.tensor([1]))
    assert torch.allclose(out, ref[3:4], atol=1e-5)
    out.sum().backward()
    grad = vis.grad.abs().sum((1, 2))
    assert grad[1] > 0 and grad[0] == 0 and grad[2] == 0
    with pytest.raises(ValueError, match="image_index"):
        vlm.answer_logits_shared(visual, mask, pos, enc["input_ids"], enc["attention_mask"], torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="image_index"):
        vlm.answer_logits_shared(visual, mask, pos, enc["input_ids"], enc["attention_mask"], torch.tensor([0, 1]))


def test_shared_dropping_trains_and_init_from_starts_from_another_run(tmp_path):
    from arr_coc.training.train_base import main, parse_args

    tiny = [
        "--image-size", "32", "--grid", "4", "--vit-dim", "16", "--vit-depth", "1", "--vit-heads", "2",
        "--llm-dim", "16", "--llm-layers", "2", "--llm-heads", "2", "--images-per-step", "3",
        "--questions-per-image", "3", "--eval-every", "2", "--val-images", "3", "--warmup", "2",
        "--drop", "shared", "--attn-weight", "0", "--bucket-images", "2", "--curriculum-threshold", "0",
    ]
    first, second = tmp_path / "a", tmp_path / "b"
    main([*tiny, "--out", str(first / "best"), "--run-dir", str(first), "--max-steps", "2"])
    start = torch.load(first / "last.pt", weights_only=False)["model"]
    # --init-from: the weights of the other run, a fresh step count and log
    main([*tiny, "--out", str(second / "best"), "--run-dir", str(second), "--max-steps", "2", "--eval-every", "1",
          "--init-from", str(first / "last.pt"), "--lr", "0"])
    rows = list(csv.DictReader((second / "training_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2]
    after = torch.load(second / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(start[k], after[k]) for k in start)  # lr 0 (after warmup 0 too): nothing moved
    with pytest.raises(ValueError, match="--drop shared"):
        parse_args(["--drop", "shared", "--attn-weight", "0.5"])


def test_training_task_widens_objects_and_reweights_types_but_not_the_evaluated_task():
    import numpy as np

    from arr_coc.training.clutter_task import DEFAULT_MIX_V2
    from arr_coc.training.train_base import parse_args, split_task, training_task

    args = parse_args(["--task", "clutter", "--image-size", "128", "--grid", "16",
                       "--train-objects", "2", "12", "--train-mix", "nearest=2,count=3"])
    task = split_task(args, "train")
    train = training_task(args, task)
    assert task.num_objects == (6, 12) and train.num_objects == (2, 12) and train.seed == task.seed
    w = {t: DEFAULT_MIX_V2[t] * {"nearest": 2, "count": 3}.get(t, 1) for t in DEFAULT_MIX_V2}
    assert all(abs(train.mix[t] - w[t] / sum(w.values())) < 1e-12 for t in w)
    sizes = [len(train.scene(i).objects) for i in range(200)]
    assert min(sizes) < 6 and max(sizes) <= 12
    batch = train.batch(np.random.default_rng(0), 50, 4)
    assert 0.30 < np.mean([t in ("nearest", "count") for t in batch.qtypes]) < 0.65  # 0.46 expected
    assert training_task(parse_args(["--task", "clutter"]), task) is task
    with pytest.raises(ValueError, match="--train-mix"):
        training_task(parse_args(["--task", "clutter", "--train-mix", "colour"]), task)
    with pytest.raises(ValueError, match="--train-objects"):
        training_task(parse_args(["--train-objects", "2", "5"]), task)


def test_quadratic_position_features_make_squared_distance_bilinear_and_widening_keeps_the_model(setup):
    from arr_coc.training.base_vlm import VisualPositionEmbedding
    from arr_coc.training.train_base import load_widening

    emb = VisualPositionEmbedding(3, (16, 16), quadratic=True)
    with torch.no_grad():  # read out (y, x, y^2 + x^2) exactly
        emb.coord.weight.zero_()
        emb.coord.bias.zero_()
        emb.coord.weight[:, -3:] = torch.eye(3)
        emb.level.weight.zero_()
    g = torch.Generator().manual_seed(0)
    pos = torch.cat([torch.randint(0, 16, (1, 40, 2), generator=g), torch.zeros(1, 40, 1, dtype=torch.long)], -1)
    f = emb(pos)[0]  # [40, 3]
    centre = (pos[0, :, :2].float() + 0.5) / 16 * 2 - 1
    assert torch.allclose(f[:, :2], centre, atol=1e-6)
    a, j = f[0], f[1:]
    score = j[:, 0] * 2 * a[0] + j[:, 1] * 2 * a[1] - j[:, 2]  # a bilinear form of the two tokens' features
    dist2 = ((centre[1:] - centre[0]) ** 2).sum(-1)
    assert torch.allclose(score, -dist2 + (centre[0] ** 2).sum(), atol=1e-5)
    # a model without the features loads into one with them and computes the same thing
    task, tok, vlm, pixels, enc = setup
    wide = BaseVLM(BaseVLMConfig.from_dict({**vlm.config.to_dict(), "position_quadratic": True})).eval()
    load_widening(wide, vlm.state_dict())
    assert wide.position.coord.weight.shape[1] == vlm.position.coord.weight.shape[1] + 3
    assert torch.allclose(wide(pixels, enc["input_ids"], enc["attention_mask"]),
                          vlm(pixels, enc["input_ids"], enc["attention_mask"]), atol=1e-5)
    old = {k: v for k, v in vlm.config.to_dict().items() if k != "position_quadratic"}
    assert BaseVLMConfig.from_dict(old).position_quadratic is False  # configs written before the option
    with pytest.raises(ValueError, match="cannot widen"):
        load_widening(vlm, wide.state_dict())


def test_acceptance_check_measures_the_v2_criteria_on_a_split(tmp_path):
    from arr_coc.training.train_base import acceptance_check, main

    out, run = tmp_path / "ckpt", tmp_path / "run"
    main(["--task", "clutter", "--image-size", "48", "--grid", "6", "--vit-dim", "16", "--vit-depth", "1",
          "--vit-heads", "2", "--llm-dim", "16", "--llm-layers", "2", "--llm-heads", "2", "--images-per-step", "2",
          "--questions-per-image", "2", "--max-steps", "1", "--eval-every", "1", "--val-images", "2",
          "--curriculum-threshold", "0", "--warmup", "1", "--out", str(out), "--run-dir", str(run)])
    res = acceptance_check(out, "val", size=12)
    assert res["budgets"] == [9, 4, 2] and res["task_seed"] == 1_000_003 and res["questions"] == 12
    acc = res["accuracy"]
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731 (NaN-safe)
    assert same(acc["full@9"], acc["full@2"])  # full tokens whatever the budget
    full, rand = acc["full@9"], acc["random@4"]
    assert res["checks"]["random@4 <= 70% of full"] == (rand["all"] <= 0.70 * full["all"])
    assert res["checks"]["full >= 0.95"] == (full["all"] >= 0.95)
    assert res["passed"] == all(res["checks"].values())
    assert same(json.loads((out / "acceptance_val.json").read_text()), res)
    with pytest.raises(ValueError, match="split"):
        acceptance_check(out, "train")


def test_deepening_spreads_the_old_layers_and_keeps_the_model(setup):
    """--init-from a 2-layer LLM into a 3-layer one: old layers 0, 1 land at 0 and 2 (the new one
    between them starts with zero output projections), so logits are unchanged; fewer layers refuse."""
    from arr_coc.training.train_base import load_widening

    task, tok, vlm, pixels, enc = setup
    llm = {**vlm.config.to_dict()["llm"], "num_layers": 3}
    deep = BaseVLM(BaseVLMConfig.from_dict({**vlm.config.to_dict(), "llm": llm})).eval()
    assert len(deep.llm.model.layers) == 3
    load_widening(deep, vlm.state_dict())
    old, new = vlm.llm.model.layers, deep.llm.model.layers
    assert torch.equal(new[0].self_attn.q_proj.weight, old[0].self_attn.q_proj.weight)
    assert torch.equal(new[2].mlp.up_proj.weight, old[1].mlp.up_proj.weight)
    assert not new[1].self_attn.o_proj.weight.any() and not new[1].mlp.down_proj.weight.any()
    assert new[1].self_attn.q_proj.weight.abs().sum() > 0  # the rest of the new layer is a fresh init
    assert torch.allclose(deep(pixels, enc["input_ids"], enc["attention_mask"]),
                          vlm(pixels, enc["input_ids"], enc["attention_mask"]), atol=1e-5)
    with pytest.raises(ValueError, match="more than --llm-layers"):
        load_widening(vlm, deep.state_dict())


def test_set_image_size_runs_the_same_model_on_a_finer_grid():
    from arr_coc.evaluation import build_eval_batches
    from arr_coc.training.clutter_task import ClutterVQATask
    from arr_coc.training.tokenizer import build_tokenizer
    from tests.training._helpers import micro_vlm_v2

    vlm = micro_vlm_v2().eval()
    assert (vlm.image_size, vlm.grid, vlm.num_patches) == (128, (16, 16), 256)
    cls_pos = vlm.vision.pos_embed[:, :1].detach().clone()
    centre16 = vlm.position(torch.tensor([[[7, 7, 1]]]))  # rows / cols 7..8 of 16: centre 1/2
    vlm.set_image_size(192)
    assert (vlm.image_size, vlm.grid, vlm.num_patches, vlm.position.grid) == (192, (24, 24), 576, (24, 24))
    # timm resampled the position embeddings: the [CLS] slot untouched, the grid interpolated to 576
    assert vlm.vision.pos_embed.shape[1] == 1 + 576
    assert torch.equal(vlm.vision.pos_embed[:, :1], cls_pos)
    task = ClutterVQATask(0, image_size=192, grid=24)
    batch = build_eval_batches(task, build_tokenizer(task), start=0, size=2, batch_size=2)[0]
    with torch.no_grad():
        tokens = vlm.encode_image(batch["pixels"])
    assert tokens.shape[:2] == (2, 1 + 576) and bool(torch.isfinite(tokens).all())
    # the visual position features are normalised by the grid: the same scene point, the same features
    centre24 = vlm.position(torch.tensor([[[10, 10, 2]]]))  # rows / cols 10..13 of 24: centre 1/2
    level = vlm.position.level.weight
    torch.testing.assert_close(centre16 - level[1], centre24 - level[2])
    for bad in (100, 0, 7.5, True):
        with pytest.raises(ValueError, match="image_size"):
            vlm.set_image_size(bad)
