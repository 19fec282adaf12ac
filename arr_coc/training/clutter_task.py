"""Benchmark v2's task: cluttered scenes on a 16 x 16 (or 24 x 24) patch grid, deterministic.

```python
task = ClutterVQATask(seed=0)                  # 128 x 128 px, 16 x 16 = 256 patches of 8 px
ex = task.example(17)                          # the same VQAExample as the v1 task
batch = task.batch(np.random.default_rng(0), num_images=32, questions_per_image=4)
task576 = ClutterVQATask(seed=0, image_size=192, grid=24)   # LLaVA-1.5's 576 tokens
```

Why a second task: on the v1 task (8 x 8 patches, 3-6 objects) the relevant part of the image
is a large fraction of it, so every reasonable allocator keeps it and the benchmark cannot
rank allocators. Here a scene has 6-12 objects on 256 cells plus 4-10 salient distractors,
so one object is 1/256 of the image, as in real photographs.

Scene: a dark noisy background, objects (one cell each, sub-cell jitter of the drawing), every
object a *different* (colour, shape) pair, so "the red circle" is unique; colours and shapes
repeat across objects. Distractors are bright textured cells (white checkerboards or stripes
mixed with a palette colour): never the answer to a question, never relevant.

Question types (``QUESTION_TYPES_V2``), with the relevance mask (the cells the answer depends on):

- ``shape``:   "what shape is the red object ?" (red unique)          -> the object
- ``colour``:  "what colour is the circle ?" (circle unique)          -> the object
- ``side``:    "is the red circle on the left or right ?" / top or bottom -> the object
- ``nearest``: "what colour is the object nearest to the red circle ?" -> anchor and nearest
  (asked only where the nearest is nearer than the second by ``nearest_margin`` cells)
- ``compare``: "is the red circle left of the blue cross ?" yes / no  -> both objects
  (asked only where their columns differ by at least ``compare_margin`` cells)
- ``count``:   "how many circles are there ?" / "how many red objects are there ?" -> every
  object counted (one ... six)
- ``exists``:  "is there a red circle ?" yes / no, half "no" (POPE-style). "yes": the object;
  "no": every object that shares the colour or the shape (what must be seen to rule it out).

``anchor`` is what the question names, ``target`` what the answer is read from. Everything is
a function of ``(seed, index)`` (``example``, ``scene``) or of the generator handed to
``batch``. Disjoint seeds give disjoint splits (see ``SPLIT_SEEDS``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from arr_coc.training.task import CELL_DISTRACTOR, Scene, SceneQuestionTask

__all__ = [
    "COLOURS_V2",
    "DEFAULT_MIX_V2",
    "NUMBER_WORDS_V2",
    "QUESTION_TYPES_V2",
    "SHAPES_V2",
    "SPLIT_SEEDS",
    "ClutterVQATask",
]

COLOURS_V2: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.12, 0.1),
    "green": (0.1, 0.85, 0.15),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (1.0, 0.92, 0.1),
    "magenta": (1.0, 0.15, 0.95),
    "cyan": (0.1, 0.9, 0.9),
    "orange": (1.0, 0.55, 0.05),
}
SHAPES_V2: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
PLURALS_V2 = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses", "diamond": "diamonds"}
NUMBER_WORDS_V2: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
QUESTION_TYPES_V2: tuple[str, ...] = ("shape", "colour", "side", "nearest", "compare", "count", "exists")
DEFAULT_MIX_V2: dict[str, float] = {
    "shape": 0.12, "colour": 0.12, "side": 0.14, "nearest": 0.14, "compare": 0.16, "count": 0.16, "exists": 0.16,
}
# Task seeds of the three splits: train, validation and test never share a scene.
SPLIT_SEEDS: dict[str, int] = {"train": 0, "val": 1_000_003, "test": 2_000_003}


def _shape_masks_v2(px: int) -> dict[tuple[str, int], np.ndarray]:
    """Boolean drawings [s, s] of every shape at sizes s in [px - 2, px], keyed by (shape, s).

    Drawn so that every pair of shapes differs in at least 8 pixels at every size pair and every
    relative offset inside a cell (``tests/training/test_clutter_task.py``): at 6-8 px a filled
    disc, a filled diamond and a plus sign differ by 0-4 pixels, so the circle is a ring and the
    cross a saltire (x). The square is filled, the triangle points up, the diamond is filled.
    """
    out = {}
    for s in range(max(4, px - 2), px + 1):
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
        c = r = s / 2.0
        dy, dx = yy - c, xx - c
        d2 = dy**2 + dx**2
        out[("circle", s)] = (d2 <= (r * 0.98) ** 2) & (d2 >= (r - 1.4) ** 2)
        out[("square", s)] = np.ones((s, s), dtype=bool)
        out[("triangle", s)] = np.abs(dx) <= (yy / s) * r + 0.25
        out[("cross", s)] = (np.abs(dy - dx) <= 0.75) | (np.abs(dy + dx) <= 0.75)
        out[("diamond", s)] = np.abs(dy) + np.abs(dx) <= r + 0.01
    return out


class ClutterVQATask(SceneQuestionTask):
    """The cluttered task (see the module docstring); same API as :class:`~arr_coc.training.task.VQATask`.

    Args:
        seed: everything is a function of ``(seed, index)``.
        image_size / grid: pixels per side and patches per side (cells of image_size / grid >= 6 px).
        num_objects: inclusive range of objects per scene (distinct (colour, shape) pairs).
        num_distractors: inclusive range of distractor cells.
        mix: question-type probabilities over ``QUESTION_TYPES_V2`` (renormalised).
        nearest_margin / compare_margin: in cells (see the module docstring).
        noise: std of the background's Gaussian noise.
    """

    question_types: tuple[str, ...] = QUESTION_TYPES_V2

    def __init__(
        self,
        seed: int = 0,
        *,
        image_size: int = 128,
        grid: int = 16,
        num_objects: tuple[int, int] = (6, 12),
        num_distractors: tuple[int, int] = (4, 10),
        mix: dict[str, float] | None = None,
        nearest_margin: float = 1.0,
        compare_margin: int = 1,
        noise: float = 0.03,
    ) -> None:
        if grid < 4 or image_size % grid:
            raise ValueError(f"grid: expected a divisor >= 4 of image_size={image_size}, got {grid}")
        cell_px = image_size // grid
        if cell_px < 6:
            raise ValueError(f"image_size: cells must be >= 6 px, got {cell_px} (image_size={image_size}, grid={grid})")
        lo, hi = num_objects
        if not (2 <= lo <= hi <= len(COLOURS_V2) * len(SHAPES_V2)):
            raise ValueError(f"num_objects: expected 2 <= lo <= hi <= {len(COLOURS_V2) * len(SHAPES_V2)}, got {num_objects}")
        dlo, dhi = num_distractors
        if not (0 <= dlo <= dhi) or hi + dhi > grid * grid:
            raise ValueError(f"num_distractors: expected 0 <= lo <= hi with room on the grid, got {num_distractors}")
        mix = dict(DEFAULT_MIX_V2 if mix is None else mix)
        bad = set(mix) - set(QUESTION_TYPES_V2)
        if bad or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"mix: expected non-negative weights over {QUESTION_TYPES_V2}, got {mix}")
        if nearest_margin < 0 or compare_margin < 0:
            raise ValueError(f"nearest_margin / compare_margin: expected >= 0, got {nearest_margin} / {compare_margin}")
        self.seed = int(seed)
        self.image_size = image_size
        self.grid = grid
        self.cell_px = cell_px
        self.object_cells = 1
        self.num_objects = (lo, hi)
        self.num_distractors = (dlo, dhi)
        self.nearest_margin = float(nearest_margin)
        self.compare_margin = int(compare_margin)
        self.noise = float(noise)
        total = sum(mix.values())
        self.mix = {t: mix.get(t, 0.0) / total for t in QUESTION_TYPES_V2}
        self._masks = _shape_masks_v2(cell_px)
        self._colour_names = list(COLOURS_V2)
        self._palette = np.array(list(COLOURS_V2.values()), dtype=np.float32)

    # ------------------------------------------------------------------ vocabulary
    def vocabulary(self) -> list[str]:
        """Every word a question or an answer can use (sorted)."""
        words = {"what", "shape", "is", "the", "object", "?", "colour", "on", "left", "or", "right", "at", "top",
                 "bottom", "nearest", "to", "of", "how", "many", "are", "there", "objects"}
        words |= set(COLOURS_V2) | set(SHAPES_V2) | set(PLURALS_V2.values())
        words |= set(self.answer_words()) | set(self.caption_vocabulary())
        return sorted(words)

    def answer_words(self) -> list[str]:
        """Every possible answer (sorted)."""
        return sorted(
            set(SHAPES_V2) | set(COLOURS_V2) | {"left", "right", "top", "bottom", "yes", "no"} | set(NUMBER_WORDS_V2[1:])
        )

    # ------------------------------------------------------------------ scenes
    def _make_scene(self, rng: np.random.Generator) -> Scene:
        g, c, size = self.grid, self.cell_px, self.image_size
        img = 0.08 + self.noise * rng.standard_normal((size, size, 3)).astype(np.float32)
        img += rng.uniform(0.0, 0.06, size=3).astype(np.float32)
        n_obj = int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))
        n_dis = int(rng.integers(self.num_distractors[0], self.num_distractors[1] + 1))
        cells = rng.permutation(g * g)
        pairs = rng.permutation(len(COLOURS_V2) * len(SHAPES_V2))[:n_obj]
        colour_map = np.zeros((g, g), dtype=np.int64)
        shape_map = np.zeros((g, g), dtype=np.int64)
        objects = []
        for cell, pair in zip(cells[:n_obj], pairs):
            r, q = int(cell) // g, int(cell) % g
            col_i, sh_i = int(pair) // len(SHAPES_V2), int(pair) % len(SHAPES_V2)
            sz = int(rng.integers(max(4, c - 2), c + 1))
            mask = self._masks[(SHAPES_V2[sh_i], sz)]
            oy, ox = int(rng.integers(0, c - sz + 1)), int(rng.integers(0, c - sz + 1))
            colour = self._palette[col_i] * rng.uniform(0.8, 1.0)
            region = img[r * c + oy : r * c + oy + sz, q * c + ox : q * c + ox + sz]
            region[mask] = colour
            colour_map[r, q] = 2 + col_i
            shape_map[r, q] = 2 + sh_i
            objects.append((r, q, col_i, sh_i))
        yy, xx = np.mgrid[0:c, 0:c]
        distractors = []
        for cell in cells[n_obj : n_obj + n_dis]:
            r, q = int(cell) // g, int(cell) % g
            kind, period = int(rng.integers(0, 3)), int(rng.integers(1, 3))
            if kind == 0:
                pattern = ((yy // period + xx // period) % 2).astype(bool)
            elif kind == 1:
                pattern = ((yy // period) % 2).astype(bool)
            else:
                pattern = ((xx // period) % 2).astype(bool)
            tint = self._palette[int(rng.integers(0, len(COLOURS_V2)))]
            img[r * c : (r + 1) * c, q * c : (q + 1) * c] = np.where(pattern[..., None], np.float32(1.0), tint)
            colour_map[r, q] = CELL_DISTRACTOR
            shape_map[r, q] = CELL_DISTRACTOR
            distractors.append((r, q))
        np.clip(img, 0.0, 1.0, out=img)
        return Scene(img, objects, distractors, colour_map, shape_map)

    # ------------------------------------------------------------------ questions
    def _cells(self, objs: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
        m = np.zeros((self.grid, self.grid), dtype=bool)
        for o in objs:
            m[o[0], o[1]] = True
        return m

    def _name(self, o: tuple[int, int, int, int]) -> str:
        return f"{self._colour_names[o[2]]} {SHAPES_V2[o[3]]}"

    def _nearest(self, objs, i: int) -> int | None:
        ci = np.array(objs[i][:2], dtype=np.float64)
        d = sorted((float(np.linalg.norm(np.array(o[:2]) - ci)), j) for j, o in enumerate(objs) if j != i)
        if len(d) >= 2 and d[1][0] - d[0][0] < self.nearest_margin:
            return None
        return d[0][1]

    def ask(self, scene: Scene, rng: np.random.Generator, qtype: str | None = None):
        """A question about ``scene``: (qtype, question, answer, anchor [g, g], target [g, g]).

        ``qtype=None`` draws from ``mix``; a type with no valid question on this scene (no
        unique colour, no clear nearest object, ...) falls back to another drawn type.
        """
        if qtype is not None and qtype not in QUESTION_TYPES_V2:
            raise ValueError(f"qtype: expected one of {QUESTION_TYPES_V2}, got {qtype!r}")
        types = list(QUESTION_TYPES_V2)
        probs = np.array([self.mix[t] for t in types])
        for attempt in range(60):
            t = qtype if (qtype is not None and attempt < 30) else str(rng.choice(types, p=probs))
            out = self._ask_type(scene, rng, t)
            if out is not None:
                return out
        out = self._ask_type(scene, rng, "side")  # always askable
        assert out is not None
        return out

    def _ask_type(self, scene: Scene, rng: np.random.Generator, t: str):
        objs = scene.objects
        cn = self._colour_names
        n = len(objs)
        if t == "shape":
            counts = np.bincount([o[2] for o in objs], minlength=len(cn))
            unique = [j for j, o in enumerate(objs) if counts[o[2]] == 1]
            if not unique:
                return None
            o = objs[unique[int(rng.integers(len(unique)))]]
            m = self._cells([o])
            return t, f"what shape is the {cn[o[2]]} object ?", SHAPES_V2[o[3]], m, m
        if t == "colour":
            counts = np.bincount([o[3] for o in objs], minlength=len(SHAPES_V2))
            unique = [j for j, o in enumerate(objs) if counts[o[3]] == 1]
            if not unique:
                return None
            o = objs[unique[int(rng.integers(len(unique)))]]
            m = self._cells([o])
            return t, f"what colour is the {SHAPES_V2[o[3]]} ?", cn[o[2]], m, m
        if t == "side":
            o = objs[int(rng.integers(n))]
            m = self._cells([o])
            half = (self.grid - 1) / 2.0
            if rng.random() < 0.5:
                return t, f"is the {self._name(o)} on the left or right ?", ("left" if o[1] < half else "right"), m, m
            return t, f"is the {self._name(o)} at the top or bottom ?", ("top" if o[0] < half else "bottom"), m, m
        if t == "nearest":
            for i in rng.permutation(n):
                j = self._nearest(objs, int(i))
                if j is not None:
                    q = f"what colour is the object nearest to the {self._name(objs[int(i)])} ?"
                    return t, q, cn[objs[j][2]], self._cells([objs[int(i)]]), self._cells([objs[j]])
            return None
        if t == "compare":
            for _ in range(10):
                i, j = (int(v) for v in rng.choice(n, size=2, replace=False))
                if abs(objs[i][1] - objs[j][1]) >= max(1, self.compare_margin):
                    ans = "yes" if objs[i][1] < objs[j][1] else "no"
                    m = self._cells([objs[i], objs[j]])
                    return t, f"is the {self._name(objs[i])} left of the {self._name(objs[j])} ?", ans, m, m
            return None
        if t == "count":
            if rng.random() < 0.5:
                s = int(rng.choice(sorted({o[3] for o in objs})))
                hit = [o for o in objs if o[3] == s]
                q = f"how many {PLURALS_V2[SHAPES_V2[s]]} are there ?"
            else:
                col = int(rng.choice(sorted({o[2] for o in objs})))
                hit = [o for o in objs if o[2] == col]
                q = f"how many {cn[col]} objects are there ?"
            if len(hit) >= len(NUMBER_WORDS_V2):
                return None
            m = self._cells(hit)
            return t, q, NUMBER_WORDS_V2[len(hit)], m, m
        if t == "exists":
            present = {(o[2], o[3]) for o in objs}
            if rng.random() < 0.5:
                o = objs[int(rng.integers(n))]
                m = self._cells([o])
                return t, f"is there a {self._name(o)} ?", "yes", m, m
            # "no": a pair that is absent but shares a colour or a shape with the scene, so that
            # ruling it out takes looking at the objects (not just at the palette)
            absent = [(c, s) for c in range(len(cn)) for s in range(len(SHAPES_V2)) if (c, s) not in present]
            near = [p for p in absent if any(o[2] == p[0] for o in objs) and any(o[3] == p[1] for o in objs)]
            pool = near or absent
            if not pool:
                return None
            c, s = pool[int(rng.integers(len(pool)))]
            cand = [o for o in objs if o[2] == c or o[3] == s]
            m = self._cells(cand)
            return t, f"is there a {cn[c]} {SHAPES_V2[s]} ?", "no", m, m
        raise ValueError(f"qtype: unknown {t!r}")

    # ------------------------------------------------------------------ captions (stage 0)
    def caption(self, scene: Scene, rng: np.random.Generator, max_objects: int = 8) -> str:
        """A caption generated from the scene graph: a random subset of the objects, each named
        with its coarse place, e.g. "a red circle top left , a blue cross bottom right ."."""
        objs = list(scene.objects)
        order = rng.permutation(len(objs))[: min(max_objects, len(objs))]
        third = self.grid / 3.0
        parts = []
        for i in order:
            r, q, c, s = objs[int(i)]
            vert = ("top", "middle", "bottom")[min(2, int(r // third))]
            hori = ("left", "centre", "right")[min(2, int(q // third))]
            parts.append(f"a {self._colour_names[c]} {SHAPES_V2[s]} {vert} {hori}")
        return " , ".join(parts) + " ."

    def caption_vocabulary(self) -> list[str]:
        """Every word a caption uses (sorted)."""
        return sorted(set(COLOURS_V2) | set(SHAPES_V2) | {"a", ",", ".", "top", "middle", "bottom", "left", "centre", "right"})
