"""The functions behind the microscope page, without a browser."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from arr_coc.microscope import core
from arr_coc.pyramid import pyramid_positions
from arr_coc.training.module import coverage_mask

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def models():
    return core.load_models()


@pytest.fixture(scope="module")
def example(models):
    ex = models.task.example(3)
    return ex, ex.image.permute(1, 2, 0).numpy().astype(np.float32)


# ---------------------------------------------------------------------------- loading
def test_find_checkpoint_fallbacks(tmp_path):
    folder, notes = core.find_base_checkpoint(root=tmp_path)
    assert folder is None and "UNTRAINED" in notes[0]
    run = tmp_path / "experiments" / "runs" / "r1" / "best"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "model.safetensors").write_bytes(b"")
    folder, notes = core.find_base_checkpoint(root=tmp_path)
    assert folder == run and "latest training run" in notes[0]
    with pytest.raises(ValueError, match="checkpoint"):
        core.find_base_checkpoint(tmp_path / "nowhere")


def test_untrained_fallback_runs(tmp_path, monkeypatch, example):
    monkeypatch.setattr(core, "find_base_checkpoint", lambda path=None: (None, ["untrained"]))
    m = core.load_models(allocator_dir=tmp_path / "none")
    assert m.checkpoint is None and "untrained" in m.notes and any("untrained registry" in n for n in m.notes)
    a = core.analyse(m, example[1], example[0].question, ["random"], 8, with_maps=False)
    assert a.runs["random"].kept == 8


def test_trained_allocator_is_loaded(tmp_path, models, example):
    from arr_coc.training.hub import save_allocator

    cfg = {"alpha": 0.5, "vision_dim": models.vlm.llm_dim, "query_dim": models.vlm.llm_dim}
    alloc = core.create_allocator("arr_coc", **cfg)
    save_allocator(alloc, tmp_path / "alloc" / "arr_coc", name="arr_coc", config=cfg)
    (tmp_path / "alloc" / "broken").mkdir()
    (tmp_path / "alloc" / "broken" / "config.json").write_text('{"name": "random"}')
    loaded, notes = core._load_trained_allocators(tmp_path / "alloc")
    assert set(loaded) == {"arr_coc"} and len(notes) == 1 and "broken" in notes[0]
    m = core.Models(models.vlm, models.tokenizer, models.task, {**models.allocators, **loaded}, {"arr_coc"}, None)
    a = core.analyse(m, example[1], example[0].question, ["arr_coc"], 8, with_maps=False)
    assert a.runs["arr_coc"].trained and a.alpha == pytest.approx(0.5)


# ---------------------------------------------------------------------------- images
def test_load_image_crop_resize_and_modes(tmp_path):
    rgb = np.zeros((100, 300, 3), dtype=np.uint8)
    rgb[:, 100:200] = (255, 0, 0)  # the centre square is red; the cropped-away sides black
    path = tmp_path / "wide.png"
    Image.fromarray(rgb).save(path)
    out = core.load_image(path, image_size=64)
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], 1.0)
    np.testing.assert_allclose(out[..., 1:], 0.0)
    grey = tmp_path / "grey.png"
    Image.new("LA", (64, 64), (128, 255)).save(grey)  # grey + alpha -> RGB
    np.testing.assert_allclose(core.load_image(grey, image_size=64), 128 / 255, atol=1e-6)
    arr = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(core.load_image(arr, image_size=64), arr, atol=0.5 / 255 + 1e-6)


def test_load_image_bad_input(tmp_path):
    txt = tmp_path / "x.png"
    txt.write_text("not an image")
    with pytest.raises(ValueError, match="not an image"):
        core.load_image(txt, image_size=64)
    huge = tmp_path / "huge.png"
    Image.new("1", (6000, 5000)).save(huge)
    with pytest.raises(ValueError, match="over the limit"):
        core.load_image(huge, image_size=64)
    trunc = tmp_path / "trunc.png"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(trunc)
    trunc.write_bytes(trunc.read_bytes()[:60])
    with pytest.raises(ValueError, match="image"):
        core.load_image(trunc, image_size=64)
    with pytest.raises(ValueError, match="no such file"):
        core.load_image(tmp_path / "missing.png", image_size=64)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        core.load_image(np.zeros((4, 4, 5)), image_size=64)


# ---------------------------------------------------------------------------- rendering
def test_overlay_dims_exactly_the_uncovered_patches():
    grid = (8, 8)
    img = np.ones((64, 64, 3), dtype=np.float32)
    pos = np.array([[0, 0, 0], [4, 4, 2], [2, 6, 1], [-1, -1, -1]])  # last row is padding
    out = np.asarray(core.render_overlay(img, pos, grid, scale=6))
    assert out.shape == (384, 384, 3)
    covered = coverage_mask(torch.from_numpy(pos)[None], torch.from_numpy(pos[:, 2] >= 0)[None], grid)[0].numpy()
    cell = out.reshape(8, 48, 8, 48, 3)[:, 24, :, 24]  # each patch's centre pixel
    np.testing.assert_array_equal(cell.min(-1) == 255, covered)
    assert set(np.unique(cell[~covered])) == {85}  # 255 * (1 - 170 / 255)
    # outline colours name the level: 4x4 at (4, 4) has its outline 1 px inside the region
    assert tuple(out[4 * 48 + 1, 4 * 48 + 100]) == core.LEVEL_COLOURS[2]
    assert tuple(out[2 * 48 + 3, 6 * 48 + 50]) == core.LEVEL_COLOURS[1]
    assert tuple(out[5, 20]) == core.LEVEL_COLOURS[0]


def test_heatmap_orders_values():
    vals = np.arange(64, dtype=np.float64).reshape(8, 8)
    img = np.zeros((64, 64, 3), dtype=np.float32)
    out = np.asarray(core.render_heatmap(vals, img, scale=2)).astype(int)
    lo, hi = out[1, 1], out[-2, -2]  # value 0 vs 63 (viridis: dark purple -> yellow)
    assert hi.sum() > lo.sum() and hi[1] > lo[1]
    flat = np.asarray(core.render_heatmap(np.full((8, 8), 2.0), img, scale=2))
    assert flat.shape == (128, 128, 3)
    assert len(np.unique(flat.reshape(-1, 3), axis=0)) == 1  # a constant map is one colour


# ---------------------------------------------------------------------------- analysis
def test_analyse_contract(models, example):
    ex, img = example
    names = ["arr_coc", "random", "full", "visionzip"]
    a = core.analyse(models, img, ex.question, names, 12)
    assert list(a.runs) == names
    n = models.num_fine
    for name, r in a.runs.items():
        adaptive = r.price is not None and r.price > 0  # a priced balancer may stop early
        assert r.kept == n if name == "full" else (r.kept <= 12 if adaptive else r.kept == 12)
        assert sum(r.level_counts.values()) == r.kept
        assert r.answer == r.top[0][0] and 1 >= r.top[0][1] >= r.top[1][1] >= r.top[2][1] >= 0
        assert r.overlay.size == (models.image_size * core.SCALE,) * 2 and r.seconds > 0
    # greedy: pick order = the allocator's picks, the chain rule gives its reported gain
    g = a.greedy
    assert len(g) == a.runs["arr_coc"].kept and [row["step"] for row in g] == list(range(1, len(g) + 1))
    assert a.greedy_total == pytest.approx(a.greedy_gain, rel=1e-4, abs=1e-6)
    assert g[-1]["cumulative I (nats)"] == pytest.approx(a.greedy_total, abs=1e-3)
    gains = [row["gain (nats)"] for row in g]
    for row in g:  # gain = alpha * query + (1 - alpha) * coverage
        assert row["gain (nats)"] == pytest.approx(
            a.alpha * row["I(c_j; Q | S) (nats)"] + (1 - a.alpha) * row["coverage (nats)"], abs=2e-4
        )
    # gains need not diminish (conditional MI is not submodular), but what the greedy does
    # guarantee can fail: no pick below the price (it stops there), information and coverage
    # never negative, no candidate picked twice
    assert all(gain >= a.price - 1e-4 for gain in gains)
    assert all(row["I(c_j; Q | S) (nats)"] >= -1e-4 and row["coverage (nats)"] >= -1e-4 for row in g)
    picked = {(row["row"], row["col"]) for row in g}
    assert len(picked) == len(g)
    kept = {(int(p[0]), int(p[1])) for p in a.runs["arr_coc"].positions}
    assert picked == kept
    assert 0 <= a.alpha <= 1 and a.price >= 0
    bal = models.allocators["arr_coc"].balancer
    if bal.fixed_alpha is not None:  # fixed values are shown as set (the question has real tokens)
        assert a.alpha == pytest.approx(bal.fixed_alpha)
    if bal.fixed_price is not None:
        assert a.price == pytest.approx(bal.fixed_price)
    # maps: fine grid; participatory pmi sums to <= 0 against a uniform prior over candidates
    gh, gw = models.grid
    assert set(a.maps) == {"participatory", "propositional", "perspectival"}
    assert all(v.shape == (gh, gw) and np.isfinite(v).all() for v in a.maps.values())
    assert a.maps["propositional"].min() >= 0 and a.maps["propositional"].max() <= np.log(512) + 1e-6
    assert 0 <= a.maps["perspectival"].min() and a.maps["perspectival"].max() <= 1


def test_answer_matches_the_direct_pipeline(models, example):
    """The page's answer for `full` is the base VLM's own full-token answer."""
    ex, img = example
    a = core.analyse(models, img, ex.question, ["full"], 5, with_maps=False)
    ids = models.tokenizer([ex.question], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = models.vlm(torch.from_numpy(img.transpose(2, 0, 1))[None], ids)
    assert a.runs["full"].answer == models.tokenizer.convert_ids_to_tokens(int(logits.argmax()))
    assert a.runs["full"].top[0][1] == pytest.approx(float(logits.softmax(-1).max()), rel=1e-4)


def test_budget_rerun_uses_cache_and_is_fast(models, example):
    ex, img = example
    names = ["arr_coc", "random", "visionzip", "divprune", "full"]
    core.analyse(models, img, ex.question, names, 16)
    times = []
    for b in (4, 8, 12, 16, 20):
        a = core.analyse(models, img, ex.question, names, b)
        assert a.encode_cached
        times.append(a.total_seconds)
    # generous (shared CI machine); the measured median on 2 idle cores is reported in the docs
    assert float(np.median(times)) < 2.0, times


def test_maps_do_not_depend_on_the_budget_but_on_the_question(models, example):
    ex, img = example
    a = core.analyse(models, img, ex.question, ["random"], 4)
    b = core.analyse(models, img, ex.question, ["random"], 30)
    c = core.analyse(models, img, "what colour is the square ?", ["random"], 4)
    np.testing.assert_array_equal(a.maps["participatory"], b.maps["participatory"])
    assert not np.allclose(a.maps["participatory"], c.maps["participatory"])
    np.testing.assert_array_equal(a.maps["perspectival"], c.maps["perspectival"])
    t = core.analyse(models, img, ex.question, ["random"], 4, source="tokens")
    assert t.maps["perspectival"].sum() == pytest.approx(1.0, abs=1e-4)  # CLS attention is a distribution


def test_analyse_bad_input(models, example):
    ex, img = example
    with pytest.raises(ValueError, match="question"):
        core.analyse(models, img, "   ", ["random"], 4)
    with pytest.raises(ValueError, match="allocators"):
        core.analyse(models, img, ex.question, [], 4)
    with pytest.raises(ValueError, match="unknown"):
        core.analyse(models, img, ex.question, ["nope"], 4)
    for b in (0, models.num_fine + 1, 2.5, True):
        with pytest.raises(ValueError, match="budget"):
            core.analyse(models, img, ex.question, ["random"], b)
    with pytest.raises(ValueError, match="image"):
        core.analyse(models, None, ex.question, ["random"], 4)
    with pytest.raises(ValueError, match="image"):
        core.analyse(models, img[:32], ex.question, ["random"], 4)
    a = core.analyse(models, img, "what is the zorblax ?", ["random"], 4, with_maps=False)
    assert a.unknown_words == ["zorblax"] and "zorblax" in a.notes[0]


def test_gains_chart_and_rows():
    rows = [
        {"gain (nats)": 0.5, "I(c_j; Q | S) (nats)": 0.3},
        {"gain (nats)": 0.2, "I(c_j; Q | S) (nats)": 0.1},
    ]
    img = np.asarray(core.render_gains(rows, width=200, height=100))
    assert img.shape == (100, 200, 3) and (img != 255).any()
    extras = {
        "pick_order": torch.tensor([[3, 0, -1]]),
        "step_gains": torch.tensor([[0.5, 0.2, 0.0]]),
        "query_gains": torch.tensor([[0.3, 0.1, 0.0]]),
        "coverage_gains": torch.tensor([[2.3, 1.1, 0.0]]),
    }
    pos, _ = pyramid_positions((2, 2), (1,))
    out = core.greedy_rows(extras, pos)
    assert [(r["row"], r["col"], r["level"]) for r in out] == [(1, 1, "fine"), (0, 0, "fine")]
    assert out[-1]["cumulative I (nats)"] == pytest.approx(0.4)


def test_cli_rejects_a_missing_checkpoint_and_bad_port(tmp_path, capsys):
    from arr_coc.microscope.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tmp_path / "nope")])
    assert e.value.code == 2 and "checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--port", "70000"])
    assert e.value.code == 2 and "--port" in capsys.readouterr().err


def test_truncated_file_is_refused_whatever_pil_global_another_library_set(tmp_path):
    from PIL import ImageFile

    trunc = tmp_path / "trunc.png"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(trunc)
    trunc.write_bytes(trunc.read_bytes()[:60])
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # as lmms-eval's task module does on import
    try:
        with pytest.raises(ValueError, match="image"):
            core.load_image(trunc, image_size=64)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
