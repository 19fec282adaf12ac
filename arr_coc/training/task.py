"""The embedded visual-question task: a procedural Sort-of-CLEVR, deterministic from a seed.

```python
task = VQATask(seed=0, image_size=64, grid=8)
ex = task.example(17)          # VQAExample: image [3, H, W] float in [0, 1], question, answer,
                               # relevance [gh, gw] bool, qtype, anchor/target masks, cell labels
batch = task.batch(np.random.default_rng(0), num_images=32, questions_per_image=4)
```

Scenes: a dark noisy background, 3-6 objects (one coloured shape each, every object a
different colour, so "the red object" is unique) and 2-5 *salient distractors*: bright,
high-contrast textured cells (white checkerboards or stripes mixed with a palette colour).
Distractors are never the answer to any question and never relevant; they are there so
that "keep the brightest / most salient tokens" is not a winning strategy.

Objects and distractors sit on the patch grid (an object covers ``object_cells`` x
``object_cells`` patches, with sub-cell jitter of its drawing), so per-patch labels and
relevance masks are exact. Question types (``QUESTION_TYPES``):

- ``shape``:   "what shape is the red object ?"              -> circle / square / ...
- ``colour``:  "what colour is the triangle ?" (unique shape) -> red / green / ...
- ``side``:    "is the red object on the left or right ?" / "... at the top or bottom ?"
- ``nearest``: "what colour is the object nearest to the red object ?" (relational: two
  routing steps; only asked where the nearest object is clearly nearest, by at least
  ``nearest_margin`` cells)
- ``count``:   "how many circles are there ?" (needs every object of that shape, anywhere
  in the image) -> one / two / ...

The relevance mask of a question is the set of patches its answer depends on: the asked
object (shape, colour, side), the anchor and the nearest object (nearest), every object
of the asked shape (count). ``anchor`` is the object(s) the question names, ``target`` the
object(s) the answer is read from (equal except for ``nearest``). The mix (see
``DEFAULT_MIX``) has single-object questions where query focus wins at tiny budgets and
counts where only coverage does.

Determinism: ``example(i)`` and ``scene(i)`` depend only on ``(seed, i)``; ``batch`` only on
the generator handed to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "COLOURS",
    "DEFAULT_MIX",
    "NUMBER_WORDS",
    "QUESTION_TYPES",
    "SHAPES",
    "Scene",
    "SceneQuestionTask",
    "VQABatch",
    "VQAExample",
    "VQATask",
]

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.85, 0.1),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "magenta": (1.0, 0.1, 1.0),
    "cyan": (0.1, 0.9, 0.9),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
QUESTION_TYPES: tuple[str, ...] = ("shape", "colour", "side", "nearest", "count")
DEFAULT_MIX: dict[str, float] = {"shape": 0.2, "colour": 0.15, "side": 0.15, "nearest": 0.25, "count": 0.25}
# Per-cell label ids for the auxiliary heads: 0 = background, 1 = distractor, then classes.
CELL_BACKGROUND, CELL_DISTRACTOR = 0, 1


@dataclass
class Scene:
    """One image and what is in it.

    image:   [H, W, 3] float32 in [0, 1].
    objects: list of (row, col, colour_idx, shape_idx); (row, col) is the top-left cell.
    distractors: list of (row, col).
    colour_map / shape_map: [gh, gw] int64 cell labels (0 background, 1 distractor,
        2 + colour_idx / 2 + shape_idx for objects).
    """

    image: np.ndarray
    objects: list[tuple[int, int, int, int]]
    distractors: list[tuple[int, int]]
    colour_map: np.ndarray
    shape_map: np.ndarray


@dataclass
class VQAExample:
    """One question about one image (shapes for the default 64 x 64, 8 x 8 grid)."""

    image: torch.Tensor  # [3, H, W] float in [0, 1]
    question: str
    answer: str
    relevance: torch.Tensor  # [gh, gw] bool
    qtype: str
    anchor: torch.Tensor  # [gh, gw] bool
    target: torch.Tensor  # [gh, gw] bool
    colour_map: torch.Tensor = field(repr=False)  # [gh, gw] long
    shape_map: torch.Tensor = field(repr=False)  # [gh, gw] long


@dataclass
class VQABatch:
    """``num_images`` images with ``questions_per_image`` questions each (image-major).

    images: [I, 3, H, W] float; colour_map / shape_map: [I, gh, gw] long.
    image_index: [Q] long, which image each question is about (Q = I x questions_per_image).
    questions / answers / qtypes: lists of Q strings.
    relevance / anchor / target: [Q, gh, gw] bool.
    """

    images: torch.Tensor
    colour_map: torch.Tensor
    shape_map: torch.Tensor
    image_index: torch.Tensor
    questions: list[str]
    answers: list[str]
    qtypes: list[str]
    relevance: torch.Tensor
    anchor: torch.Tensor
    target: torch.Tensor


def _shape_masks(cell_px: int) -> dict[tuple[str, int, int], np.ndarray]:
    """Boolean drawings [s, s] of every shape at sizes s, keyed by (shape, size, variant)."""
    out = {}
    for s in range(max(3, cell_px - 2), cell_px + 1):
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
        c = s / 2.0
        r = s / 2.0
        out[("circle", s, 0)] = (yy - c) ** 2 + (xx - c) ** 2 <= (r * 0.95) ** 2
        inset = max(0.5, s * 0.12)
        out[("square", s, 0)] = (np.abs(yy - c) <= r - inset) & (np.abs(xx - c) <= r - inset)
        # apex at the top, base at the bottom
        out[("triangle", s, 0)] = np.abs(xx - c) <= (yy / s) * r + 0.25
        w = max(0.5, s * 0.18)
        out[("cross", s, 0)] = (np.abs(yy - c) <= w) | (np.abs(xx - c) <= w)
    return out


class SceneQuestionTask:
    """What every embedded task shares: examples and batches from ``scene`` / ``_make_scene``
    and ``ask`` (a subclass provides those, ``seed`` and ``question_types``)."""

    seed: int
    question_types: tuple[str, ...] = ()

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream, int(index)])

    def scene(self, index: int) -> Scene:
        """The scene with this index (a function of ``(seed, index)`` only)."""
        return self._make_scene(self._rng(index, 0))

    def _make_scene(self, rng: np.random.Generator) -> Scene:  # pragma: no cover - abstract
        raise NotImplementedError

    def ask(self, scene: Scene, rng: np.random.Generator, qtype: str | None = None):  # pragma: no cover - abstract
        raise NotImplementedError

    def example(self, index: int, qtype: str | None = None) -> VQAExample:
        """Example ``index``: scene ``index`` and one question about it (deterministic)."""
        if index < 0:
            raise ValueError(f"index: expected >= 0, got {index}")
        scene = self.scene(index)
        t, q, a, anchor, target = self.ask(scene, self._rng(index, 1), qtype)
        return VQAExample(
            image=torch.from_numpy(np.ascontiguousarray(scene.image.transpose(2, 0, 1))),
            question=q,
            answer=a,
            relevance=torch.from_numpy(anchor | target),
            qtype=t,
            anchor=torch.from_numpy(anchor),
            target=torch.from_numpy(target),
            colour_map=torch.from_numpy(scene.colour_map),
            shape_map=torch.from_numpy(scene.shape_map),
        )

    def __getitem__(self, index: int) -> VQAExample:
        return self.example(index)

    def batch(
        self,
        rng: np.random.Generator,
        num_images: int,
        questions_per_image: int = 1,
        *,
        qtypes: Sequence[str] | None = None,
    ) -> VQABatch:
        """A fresh batch drawn from ``rng`` (for on-the-fly training).

        ``qtypes`` restricts the question types (a curriculum); None uses ``mix``.
        """
        if num_images < 1 or questions_per_image < 1:
            raise ValueError(
                f"num_images / questions_per_image: expected >= 1, got {num_images} / {questions_per_image}"
            )
        images, cmaps, smaps = [], [], []
        qs, ans, ts, rel, anc, tgt, idx = [], [], [], [], [], [], []
        for k in range(num_images):
            scene = self._make_scene(rng)
            images.append(scene.image.transpose(2, 0, 1))
            cmaps.append(scene.colour_map)
            smaps.append(scene.shape_map)
            for _ in range(questions_per_image):
                want = None if qtypes is None else str(qtypes[int(rng.integers(len(qtypes)))])
                t, q, a, an, tg = self.ask(scene, rng, want)
                qs.append(q)
                ans.append(a)
                ts.append(t)
                anc.append(an)
                tgt.append(tg)
                rel.append(an | tg)
                idx.append(k)
        return VQABatch(
            images=torch.from_numpy(np.ascontiguousarray(np.stack(images))),
            colour_map=torch.from_numpy(np.stack(cmaps)),
            shape_map=torch.from_numpy(np.stack(smaps)),
            image_index=torch.tensor(idx, dtype=torch.long),
            questions=qs,
            answers=ans,
            qtypes=ts,
            relevance=torch.from_numpy(np.stack(rel)),
            anchor=torch.from_numpy(np.stack(anc)),
            target=torch.from_numpy(np.stack(tgt)),
        )

    def fixed_batch(self, num_images: int, questions_per_image: int = 4, *, stream: int = 7) -> VQABatch:
        """A deterministic batch (e.g. a validation set) from ``(seed, stream)``."""
        return self.batch(np.random.default_rng([self.seed, stream]), num_images, questions_per_image)


class VQATask(SceneQuestionTask):
    """The procedural task (see the module docstring).

    Args:
        seed: everything is a function of ``(seed, index)``.
        image_size: square image side in pixels (H = W).
        grid: patches per side (gh = gw); ``image_size`` must be a multiple of it.
        object_cells: side of an object's footprint in cells (1 on the default 8 px cells;
            2 for a 16 x 16 grid on a 64 px image).
        num_objects: inclusive range of objects per scene (at most len(COLOURS)).
        num_distractors: inclusive range of distractor cells per scene.
        mix: question-type probabilities (renormalised); types missing get 0.
        nearest_margin: the nearest object must be nearer than the second by this many cells.
        noise: std of the background's Gaussian noise.
    """

    question_types: tuple[str, ...] = QUESTION_TYPES

    def __init__(
        self,
        seed: int = 0,
        *,
        image_size: int = 64,
        grid: int = 8,
        object_cells: int = 1,
        num_objects: tuple[int, int] = (3, 6),
        num_distractors: tuple[int, int] = (2, 5),
        mix: dict[str, float] | None = None,
        nearest_margin: float = 1.0,
        noise: float = 0.03,
    ) -> None:
        if grid < 2 or image_size % grid:
            raise ValueError(f"grid: expected a divisor >= 2 of image_size={image_size}, got {grid}")
        cell_px = image_size // grid
        if object_cells < 1 or grid % object_cells:
            raise ValueError(f"object_cells: expected a divisor >= 1 of grid={grid}, got {object_cells}")
        if cell_px * object_cells < 5:
            raise ValueError(
                f"object_cells: objects must be at least 5 px wide, got {cell_px * object_cells} "
                f"(image_size={image_size}, grid={grid}); raise object_cells"
            )
        lo, hi = num_objects
        if not (2 <= lo <= hi <= len(COLOURS)):
            raise ValueError(f"num_objects: expected 2 <= lo <= hi <= {len(COLOURS)}, got {num_objects}")
        dlo, dhi = num_distractors
        slots = (grid // object_cells) ** 2
        if not (0 <= dlo <= dhi) or hi + (dhi + object_cells**2 - 1) // object_cells**2 > slots:
            raise ValueError(f"num_distractors: expected 0 <= lo <= hi with room on the grid, got {num_distractors}")
        mix = dict(DEFAULT_MIX if mix is None else mix)
        bad = set(mix) - set(QUESTION_TYPES)
        if bad or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"mix: expected non-negative weights over {QUESTION_TYPES}, got {mix}")
        if nearest_margin < 0:
            raise ValueError(f"nearest_margin: expected >= 0, got {nearest_margin}")
        self.seed = int(seed)
        self.image_size = image_size
        self.grid = grid
        self.cell_px = cell_px
        self.object_cells = object_cells
        self.num_objects = (lo, hi)
        self.num_distractors = (dlo, dhi)
        self.nearest_margin = float(nearest_margin)
        self.noise = float(noise)
        total = sum(mix.values())
        self.mix = {t: mix.get(t, 0.0) / total for t in QUESTION_TYPES}
        self._masks = _shape_masks(cell_px * object_cells)
        self._colour_names = list(COLOURS)
        self._palette = np.array(list(COLOURS.values()), dtype=np.float32)

    # ------------------------------------------------------------------ vocabulary
    def vocabulary(self) -> list[str]:
        """Every word any question or answer can use (sorted, deterministic)."""
        words = set()
        for q in self._templates_all():
            words.update(q.split())
        words.update(self.answer_words())
        return sorted(words)

    def answer_words(self) -> list[str]:
        """Every possible answer (sorted)."""
        return sorted(set(SHAPES) | set(COLOURS) | {"left", "right", "top", "bottom"} | set(NUMBER_WORDS[1:]))

    def _templates_all(self) -> list[str]:
        qs = []
        for c in COLOURS:
            qs += [
                f"what shape is the {c} object ?",
                f"is the {c} object on the left or right ?",
                f"is the {c} object at the top or bottom ?",
                f"what colour is the object nearest to the {c} object ?",
            ]
        for s in SHAPES:
            qs += [f"what colour is the {s} ?", f"how many {PLURALS[s]} are there ?"]
        return qs

    # ------------------------------------------------------------------ scenes
    def _make_scene(self, rng: np.random.Generator) -> Scene:
        g, c, f = self.grid, self.cell_px, self.object_cells
        size = self.image_size
        img = 0.08 + self.noise * rng.standard_normal((size, size, 3)).astype(np.float32)
        img += rng.uniform(0.0, 0.06, size=3).astype(np.float32)  # background tint
        slots_side = g // f
        n_obj = int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))
        n_dis = int(rng.integers(self.num_distractors[0], self.num_distractors[1] + 1))
        slots = rng.permutation(slots_side * slots_side)
        obj_slots = slots[:n_obj]
        colours = rng.permutation(len(COLOURS))[:n_obj]
        shapes = rng.integers(0, len(SHAPES), size=n_obj)
        colour_map = np.zeros((g, g), dtype=np.int64)
        shape_map = np.zeros((g, g), dtype=np.int64)
        objects = []
        for s, col_i, sh_i in zip(obj_slots, colours, shapes):
            r0, c0 = (int(s) // slots_side) * f, (int(s) % slots_side) * f
            px = c * f
            sz = int(rng.integers(max(3, px - 2), px + 1))
            mask = self._masks[(SHAPES[sh_i], sz, 0)]
            oy = int(rng.integers(0, px - sz + 1))
            ox = int(rng.integers(0, px - sz + 1))
            colour = self._palette[col_i] * rng.uniform(0.8, 1.0)
            y, x = r0 * c + oy, c0 * c + ox
            region = img[y : y + sz, x : x + sz]
            region[mask] = colour
            colour_map[r0 : r0 + f, c0 : c0 + f] = 2 + col_i
            shape_map[r0 : r0 + f, c0 : c0 + f] = 2 + sh_i
            objects.append((r0, c0, int(col_i), int(sh_i)))
        # distractors: single cells not covered by objects
        free = np.flatnonzero(colour_map.reshape(-1) == CELL_BACKGROUND)
        cells = rng.permutation(free)[:n_dis]
        distractors = []
        yy, xx = np.mgrid[0:c, 0:c]
        for cell in cells:
            r, q = int(cell) // g, int(cell) % g
            kind = int(rng.integers(0, 3))
            period = int(rng.integers(1, 3))
            if kind == 0:
                pattern = ((yy // period + xx // period) % 2).astype(bool)
            elif kind == 1:
                pattern = ((yy // period) % 2).astype(bool)
            else:
                pattern = ((xx // period) % 2).astype(bool)
            tint = self._palette[int(rng.integers(0, len(COLOURS)))]
            patch = np.where(pattern[..., None], np.float32(1.0), tint[None, None, :]).astype(np.float32)
            img[r * c : (r + 1) * c, q * c : (q + 1) * c] = patch
            colour_map[r, q] = CELL_DISTRACTOR
            shape_map[r, q] = CELL_DISTRACTOR
            distractors.append((r, q))
        np.clip(img, 0.0, 1.0, out=img)
        return Scene(img, objects, distractors, colour_map, shape_map)

    # ------------------------------------------------------------------ questions
    def _footprint(self, obj: tuple[int, int, int, int]) -> np.ndarray:
        m = np.zeros((self.grid, self.grid), dtype=bool)
        r, q = obj[0], obj[1]
        m[r : r + self.object_cells, q : q + self.object_cells] = True
        return m

    def _centre(self, obj: tuple[int, int, int, int]) -> np.ndarray:
        h = (self.object_cells - 1) / 2.0
        return np.array([obj[0] + h, obj[1] + h])

    def _nearest(self, scene: Scene, i: int) -> int | None:
        """Index of the object clearly nearest to object i, or None when there is no clear one."""
        ci = self._centre(scene.objects[i])
        d = [
            (float(np.linalg.norm(self._centre(o) - ci)), j)
            for j, o in enumerate(scene.objects)
            if j != i
        ]
        d.sort()
        if len(d) >= 2 and d[1][0] - d[0][0] < self.nearest_margin:
            return None
        return d[0][1]

    def ask(self, scene: Scene, rng: np.random.Generator, qtype: str | None = None) -> tuple[str, str, str, np.ndarray, np.ndarray]:
        """A question about ``scene``: (qtype, question, answer, anchor [g, g], target [g, g]).

        ``qtype=None`` draws from ``mix``; a type that has no valid question on this scene
        (no unique shape, no clear nearest object) falls back to another drawn type.
        """
        if qtype is not None and qtype not in QUESTION_TYPES:
            raise ValueError(f"qtype: expected one of {QUESTION_TYPES}, got {qtype!r}")
        types = list(QUESTION_TYPES)
        probs = np.array([self.mix[t] for t in types])
        for attempt in range(50):
            t = qtype if (qtype is not None and attempt < 20) else str(rng.choice(types, p=probs))
            out = self._ask_type(scene, rng, t)
            if out is not None:
                return out
        # "shape" is always askable (there are >= 2 objects)
        out = self._ask_type(scene, rng, "shape")
        assert out is not None
        return out

    def _ask_type(self, scene: Scene, rng: np.random.Generator, t: str):
        objs = scene.objects
        cn = self._colour_names
        if t == "shape":
            i = int(rng.integers(len(objs)))
            m = self._footprint(objs[i])
            return t, f"what shape is the {cn[objs[i][2]]} object ?", SHAPES[objs[i][3]], m, m
        if t == "colour":
            counts = np.bincount([o[3] for o in objs], minlength=len(SHAPES))
            unique = [j for j, o in enumerate(objs) if counts[o[3]] == 1]
            if not unique:
                return None
            i = unique[int(rng.integers(len(unique)))]
            m = self._footprint(objs[i])
            return t, f"what colour is the {SHAPES[objs[i][3]]} ?", cn[objs[i][2]], m, m
        if t == "side":
            i = int(rng.integers(len(objs)))
            m = self._footprint(objs[i])
            centre = self._centre(objs[i])
            half = (self.grid - 1) / 2.0
            if rng.random() < 0.5:
                ans = "left" if centre[1] < half else "right"
                return t, f"is the {cn[objs[i][2]]} object on the left or right ?", ans, m, m
            ans = "top" if centre[0] < half else "bottom"
            return t, f"is the {cn[objs[i][2]]} object at the top or bottom ?", ans, m, m
        if t == "nearest":
            order = rng.permutation(len(objs))
            for i in order:
                j = self._nearest(scene, int(i))
                if j is not None:
                    a, b = self._footprint(objs[int(i)]), self._footprint(objs[j])
                    q = f"what colour is the object nearest to the {cn[objs[int(i)][2]]} object ?"
                    return t, q, cn[objs[j][2]], a, b
            return None
        if t == "count":
            present = sorted({o[3] for o in objs})
            s = present[int(rng.integers(len(present)))]
            m = np.zeros((self.grid, self.grid), dtype=bool)
            for o in objs:
                if o[3] == s:
                    m |= self._footprint(o)
            n = sum(o[3] == s for o in objs)
            return t, f"how many {PLURALS[SHAPES[s]]} are there ?", NUMBER_WORDS[n], m, m
        raise ValueError(f"qtype: unknown {t!r}")
