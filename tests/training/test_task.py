"""The embedded task: determinism, answers and relevance checked against brute force, tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arr_coc.pyramid import pyramid_positions
from arr_coc.training.task import COLOURS, NUMBER_WORDS, PLURALS, QUESTION_TYPES, SHAPES, VQATask
from arr_coc.training.tokenizer import PAD, READ, UNK, build_tokenizer, build_word_tokenizer, load_tokenizer

COLOUR_NAMES = list(COLOURS)
SINGULAR = {v: k for k, v in PLURALS.items()}

def brute_force_answer(scene, question: str, grid: int) -> tuple[str, np.ndarray]:
    """Answer and relevance mask, recomputed from the scene's object list with plain loops."""
    words = question.split()
    objs = scene.objects  # (row, col, colour, shape)

    def cells(o):
        m = np.zeros((grid, grid), dtype=bool)
        m[o[0], o[1]] = True
        return m

    def by_colour(name):
        found = [o for o in objs if COLOUR_NAMES[o[2]] == name]
        assert len(found) == 1, "colours are unique per scene"
        return found[0]

    if question.startswith("what shape is the"):
        o = by_colour(words[4])
        return SHAPES[o[3]], cells(o)
    if question.startswith("what colour is the object nearest"):
        a = by_colour(words[-3])
        dists = sorted(
            (((o[0] - a[0]) ** 2 + (o[1] - a[1]) ** 2) ** 0.5, i) for i, o in enumerate(objs) if o is not a
        )
        assert len(dists) < 2 or dists[1][0] - dists[0][0] >= 1.0, "nearest must be clear"
        b = objs[dists[0][1]]
        return COLOUR_NAMES[b[2]], cells(a) | cells(b)
    if question.startswith("what colour is the"):
        shape = words[4]
        found = [o for o in objs if SHAPES[o[3]] == shape]
        assert len(found) == 1, "colour questions only about a unique shape"
        return COLOUR_NAMES[found[0][2]], cells(found[0])
    if question.startswith("is the"):
        o = by_colour(words[2])
        if "left" in words:
            return ("left" if o[1] < grid / 2 else "right"), cells(o)
        return ("top" if o[0] < grid / 2 else "bottom"), cells(o)
    if question.startswith("how many"):
        shape = SINGULAR[words[2]]
        found = [o for o in objs if SHAPES[o[3]] == shape]
        m = np.zeros((grid, grid), dtype=bool)
        for o in found:
            m |= cells(o)
        return NUMBER_WORDS[len(found)], m
    raise AssertionError(f"unknown template: {question}")

def test_generator_is_deterministic_for_a_seed():
    a, b, c = VQATask(seed=3), VQATask(seed=3), VQATask(seed=4)
    for i in (0, 5, 123):
        ea, eb = a.example(i), b.example(i)
        assert torch.equal(ea.image, eb.image)
        assert (ea.question, ea.answer, ea.qtype) == (eb.question, eb.answer, eb.qtype)
        assert torch.equal(ea.relevance, eb.relevance)
    assert not torch.equal(a.example(0).image, c.example(0).image)
    ba = a.batch(np.random.default_rng(9), 3, 2)
    bb = b.batch(np.random.default_rng(9), 3, 2)
    assert torch.equal(ba.images, bb.images) and ba.questions == bb.questions
    assert torch.equal(a.fixed_batch(2).images, b.fixed_batch(2).images)

def test_answers_and_relevance_match_brute_force():
    task = VQATask(seed=1)
    rng = np.random.default_rng(0)
    seen = set()
    for k in range(60):
        scene = task._make_scene(rng)
        for _ in range(4):
            t, q, a, anchor, target = task.ask(scene, rng)
            seen.add(t)
            want, rel = brute_force_answer(scene, q, task.grid)
            assert a == want, q
            np.testing.assert_array_equal(anchor | target, rel)
            # distractors are never relevant and never answers
            assert not (rel & (scene.colour_map == 1)).any()
    assert seen == set(QUESTION_TYPES)

def test_relevant_cells_hold_the_named_colour_in_the_pixels():
    task = VQATask(seed=2)
    for i in range(40):
        ex = task.example(i, qtype="shape")
        colour = np.array(COLOURS[ex.question.split()[4]])
        img = ex.image.permute(1, 2, 0).numpy()
        c = task.cell_px
        (r,), (q,) = np.nonzero(ex.relevance.numpy())
        cell = img[r * c : (r + 1) * c, q * c : (q + 1) * c].reshape(-1, 3)
        # pixels of the object are a positive multiple (0.8..1) of the palette colour
        bright = cell[cell.max(axis=1) > 0.5]
        assert len(bright) >= 6
        ratio = bright / colour.clip(min=0.1)
        assert np.allclose(ratio.min(axis=1), ratio.max(axis=1), atol=0.35)
        assert not np.any(np.all(cell > 0.95, axis=1)), "objects hold no white (distractor) pixels"

def test_distractor_cells_are_bright_and_textured():
    task = VQATask(seed=5)
    scene = task.scene(0)
    c = task.cell_px
    assert scene.distractors
    for r, q in scene.distractors:
        cell = scene.image[r * c : (r + 1) * c, q * c : (q + 1) * c]
        assert cell.mean() > 0.5  # bright
        assert cell.std() > 0.15  # textured
        assert scene.colour_map[r, q] == 1

def test_question_mix_covers_every_type_and_answers_are_not_constant():
    task = VQATask(seed=0)
    batch = task.batch(np.random.default_rng(1), 100, 4)
    types = np.array(batch.qtypes)
    for t in QUESTION_TYPES:
        answers = [a for a, tt in zip(batch.answers, types) if tt == t]
        assert len(answers) > 20
        # no answer is right more than 65 % of the time within a type (prior is not enough)
        top = max(answers.count(a) for a in set(answers)) / len(answers)
        assert top < 0.65, (t, top)
    # counts and nearest questions need more patches than single-object ones
    rel = batch.relevance.flatten(1).sum(1).float()
    single = torch.tensor([t == "shape" for t in batch.qtypes])
    count = torch.tensor([t == "count" for t in batch.qtypes])
    assert (rel[single] == 1).all()
    assert rel[count].mean() > 1.2

def test_larger_grid_config_with_multi_cell_objects():
    task = VQATask(seed=0, image_size=64, grid=16, object_cells=2)
    ex = task.example(0, qtype="shape")
    assert ex.relevance.shape == (16, 16)
    assert int(ex.relevance.sum()) == 4
    rows, cols = np.nonzero(ex.relevance.numpy())
    assert rows.max() - rows.min() == 1 and cols.max() - cols.min() == 1

@pytest.mark.parametrize(
    "kwargs",
    [
        {"grid": 7},
        {"grid": 16},  # 4 px objects are too small
        {"num_objects": (1, 3)},
        {"num_objects": (3, 9)},
        {"mix": {"colourz": 1.0}},
        {"mix": {"shape": -1.0, "count": 2.0}},
        {"nearest_margin": -1},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        VQATask(0, **kwargs)

def test_bad_qtype_and_index_raise():
    task = VQATask(0)
    with pytest.raises(ValueError, match="qtype"):
        task.example(0, qtype="colours")
    with pytest.raises(ValueError, match="index"):
        task.example(-1)

def test_tokenizer_round_trip_and_special_tokens(tmp_path):
    task = VQATask(0)
    tok = build_tokenizer(task)
    assert tok.convert_tokens_to_ids([PAD, UNK, READ]) == [0, 1, 2]
    assert len(tok) == 3 + len(task.vocabulary())
    questions = task._templates_all()
    enc = tok(questions, padding=True, return_tensors="pt")
    for q, ids, m in zip(questions, enc["input_ids"], enc["attention_mask"]):
        assert int(m.sum()) == len(q.split())
        assert tok.decode(ids[m.bool()]) == q
        assert (ids[~m.bool()] == 0).all()
    for a in task.answer_words():
        ids = tok(a)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids)[0] == a
    assert tok("red zebra")["input_ids"][1] == 1  # unknown word -> [UNK]
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(tmp_path)
    assert again(questions)["input_ids"] == tok(questions)["input_ids"]
    assert again.convert_tokens_to_ids(READ) == 2

def test_tokenizer_rejects_bad_vocabularies(tmp_path):
    with pytest.raises(ValueError):
        build_word_tokenizer([])
    with pytest.raises(ValueError):
        build_word_tokenizer(["two words"])
    with pytest.raises(ValueError):
        load_tokenizer(tmp_path)

def test_random_allocation_mixes_levels_in_raster_order():
    from arr_coc.pyramid import raster_key
    from arr_coc.training.train_base import random_allocation

    grid = (8, 8)
    positions, sizes = pyramid_positions(grid, (1, 2))
    gen = torch.Generator().manual_seed(0)
    idx, mask = random_allocation(200, positions, 64, grid, gen, full_prob=0.3, keep_min=0.05)
    counts = mask.sum(1)
    assert counts.min() >= 3 and counts.max() <= 64  # round(0.05 * 64) = 3
    full = (idx[:, :64] == torch.arange(64)).all(1)
    assert 30 <= int(full.sum()) <= 90
    levels = positions[idx.clamp(min=0)][..., 2][mask]
    assert set(levels.unique().tolist()) == {0, 1, 2}
    for row in range(20):
        chosen = idx[row][mask[row]]
        assert len(set(chosen.tolist())) == len(chosen)
        keys = raster_key(positions[chosen], grid)
        assert torch.all(keys[1:] > keys[:-1])
        assert (idx[row][~mask[row]] == -1).all()

def test_candidate_regions_cover_the_right_patches():
    from arr_coc.training.base_vlm import candidate_regions

    pos = torch.tensor([[2, 4, 1], [0, 0, 0], [4, 4, 2], [-1, -1, -1]])
    cover = candidate_regions((8, 8), pos).view(4, 8, 8)
    expect = torch.zeros(4, 8, 8, dtype=torch.bool)
    expect[0, 2:4, 4:6] = True
    expect[1, 0, 0] = True
    expect[2, 4:8, 4:8] = True
    assert torch.equal(cover, expect)
    # every pyramid candidate covers 4^level patches on an 8 x 8 grid
    positions, _ = pyramid_positions((8, 8), (1, 2))
    assert torch.equal(candidate_regions((8, 8), positions).sum(1), 4 ** positions[:, 2])
