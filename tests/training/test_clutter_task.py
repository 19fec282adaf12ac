"""Benchmark v2's task: determinism, exact answers and relevance, splits, the 576-token config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arr_coc.training.clutter_task import (
    COLOURS_V2,
    NUMBER_WORDS_V2,
    QUESTION_TYPES_V2,
    SHAPES_V2,
    SPLIT_SEEDS,
    ClutterVQATask,
)
from arr_coc.training.tasks import build_task, task_spec
from arr_coc.training.tokenizer import build_tokenizer

COLOUR_NAMES = list(COLOURS_V2)


def _obj(scene, name):
    colour, shape = name.split()
    (hit,) = [o for o in scene.objects if COLOUR_NAMES[o[2]] == colour and SHAPES_V2[o[3]] == shape]
    return hit


def test_scenes_are_deterministic_cluttered_and_exactly_labelled():
    task = ClutterVQATask(3)
    a, b = task.scene(5), task.scene(5)
    assert np.array_equal(a.image, b.image) and a.objects == b.objects
    assert not np.array_equal(task.scene(6).image, a.image)
    for i in range(30):
        s = task.scene(i)
        assert 6 <= len(s.objects) <= 12 and 4 <= len(s.distractors) <= 10
        pairs = [(o[2], o[3]) for o in s.objects]
        assert len(set(pairs)) == len(pairs)  # "the red circle" is unique
        cells = [(o[0], o[1]) for o in s.objects] + list(s.distractors)
        assert len(set(cells)) == len(cells)
        for r, c, col, sh in s.objects:
            assert s.colour_map[r, c] == 2 + col and s.shape_map[r, c] == 2 + sh
        assert int((s.colour_map >= 2).sum()) == len(s.objects)
        assert s.image.shape == (128, 128, 3)


def test_every_answer_follows_from_the_scene_and_relevance_is_what_it_depends_on():
    task = ClutterVQATask(0)
    rng = np.random.default_rng(0)
    seen = set()
    for i in range(200):
        scene = task.scene(i)
        t, q, a, anchor, target = task.ask(scene, rng)
        seen.add(t)
        words = q.split()
        rel = anchor | target
        cells = {(int(r), int(c)) for r, c in zip(*np.nonzero(rel))}
        if t == "side":
            o = _obj(scene, " ".join(words[2:4]))
            half = (task.grid - 1) / 2
            want = ("left" if o[1] < half else "right") if "left" in words else ("top" if o[0] < half else "bottom")
            assert a == want and cells == {(o[0], o[1])}
        elif t == "compare":
            o1, o2 = _obj(scene, " ".join(words[2:4])), _obj(scene, " ".join(words[7:9]))
            assert a == ("yes" if o1[1] < o2[1] else "no") and o1[1] != o2[1]
            assert cells == {(o1[0], o1[1]), (o2[0], o2[1])}
        elif t == "count":
            if words[3] == "objects":
                hit = [o for o in scene.objects if COLOUR_NAMES[o[2]] == words[2]]
            else:
                hit = [o for o in scene.objects if SHAPES_V2[o[3]] + ("es" if SHAPES_V2[o[3]] == "cross" else "s") == words[2]]
            assert a == NUMBER_WORDS_V2[len(hit)] and cells == {(o[0], o[1]) for o in hit}
        elif t == "exists":
            colour, shape = words[3], words[4]
            present = any(COLOUR_NAMES[o[2]] == colour and SHAPES_V2[o[3]] == shape for o in scene.objects)
            assert a == ("yes" if present else "no")
            if not present:  # every object that shares the colour or the shape must be looked at
                cand = {(o[0], o[1]) for o in scene.objects if COLOUR_NAMES[o[2]] == colour or SHAPES_V2[o[3]] == shape}
                assert cells == cand
        elif t == "nearest":
            o = _obj(scene, " ".join(words[-3:-1]))
            d = sorted((np.hypot(p[0] - o[0], p[1] - o[1]), p) for p in scene.objects if p != o)
            assert d[1][0] - d[0][0] >= task.nearest_margin and a == COLOUR_NAMES[d[0][1][2]]
            assert cells == {(o[0], o[1]), (d[0][1][0], d[0][1][1])}
        elif t == "shape":
            (o,) = [p for p in scene.objects if COLOUR_NAMES[p[2]] == words[4]]  # the colour is unique
            assert a == SHAPES_V2[o[3]]
        elif t == "colour":
            (o,) = [p for p in scene.objects if SHAPES_V2[p[3]] == words[4]]  # the shape is unique
            assert a == COLOUR_NAMES[o[2]]
    assert seen == set(QUESTION_TYPES_V2)


def test_relevant_fraction_is_small_and_exists_is_balanced():
    task = ClutterVQATask(0)
    b = task.batch(np.random.default_rng(1), 150, 4)
    frac = b.relevance.flatten(1).float().mean(1)
    assert float(frac.mean()) < 0.02 and float(frac.max()) <= 16 / 256
    ex = [a for a, t in zip(b.answers, b.qtypes) if t == "exists"]
    assert 0.35 < ex.count("yes") / len(ex) < 0.65


def test_tokenizer_covers_questions_answers_and_captions():
    task = ClutterVQATask(0)
    tok = build_tokenizer(task)
    rng = np.random.default_rng(2)
    scene = task.scene(0)
    texts = [task.ask(scene, rng)[1] for _ in range(30)] + [task.caption(scene, rng)] + task.answer_words()
    for text in texts:
        assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"], text


def test_splits_are_disjoint_and_the_576_config_builds():
    assert len(set(SPLIT_SEEDS.values())) == 3
    tr, te = ClutterVQATask(SPLIT_SEEDS["train"]), ClutterVQATask(SPLIT_SEEDS["test"])
    assert not np.array_equal(tr.scene(0).image, te.scene(0).image)
    big = build_task({"name": "clutter", "image_size": 192, "grid": 24}, 0)
    assert big.scene(0).colour_map.shape == (24, 24) and task_spec(big) == {"name": "clutter", "image_size": 192, "grid": 24}
    ex = big.example(0)
    assert ex.image.shape == (3, 192, 192) and ex.relevance.shape == (24, 24) and ex.relevance.any()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="grid"):
        ClutterVQATask(0, grid=15)
    with pytest.raises(ValueError, match="num_objects"):
        ClutterVQATask(0, num_objects=(1, 3))
    with pytest.raises(ValueError, match="mix"):
        ClutterVQATask(0, mix={"nonsense": 1.0})
    with pytest.raises(ValueError, match="qtype"):
        ClutterVQATask(0).example(0, qtype="nonsense")
    with pytest.raises(ValueError, match="spec"):
        build_task({"name": "nope"}, 0)


def test_every_shape_is_distinguishable_at_every_size():
    """Every pair of shapes differs in >= 8 pixels for every pair of drawn sizes and every relative
    offset inside a cell (the jitter the scenes use): no question has a drawing-imposed ceiling.
    The old drawings failed this (circle = diamond at 6 px; circle / cross / diamond 4 px apart)."""
    from itertools import combinations

    from arr_coc.training.clutter_task import SHAPES_V2, _shape_masks_v2

    cell = 8
    masks = _shape_masks_v2(cell)
    sizes = sorted({s for _, s in masks})
    assert sizes == [6, 7, 8]

    def placed(m, oy, ox):
        canvas = np.zeros((2 * cell, 2 * cell), dtype=bool)
        canvas[oy : oy + m.shape[0], ox : ox + m.shape[1]] = m
        return canvas

    for a, b in combinations(SHAPES_V2, 2):
        fewest = min(
            int((placed(masks[(a, sa)], cell // 2, cell // 2) != placed(masks[(b, sb)], oy, ox)).sum())
            for sa in sizes
            for sb in sizes
            for oy in range(cell // 2 - (cell - sb), cell // 2 + (cell - sa) + 1)
            for ox in range(cell // 2 - (cell - sb), cell // 2 + (cell - sa) + 1)
        )
        assert fewest >= 8, f"{a} vs {b}: only {fewest} pixels apart at some size pair and offset"
