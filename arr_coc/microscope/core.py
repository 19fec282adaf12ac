"""The functions behind the microscope page (no Gradio here, so they test without a browser).

```python
models = load_models()                          # base VLM + tokenizer + task + allocators (+ notes)
image = load_image("photo.png", image_size=models.image_size)   # [H, W, 3] float32 in [0, 1]
res = analyse(models, image, "what shape is the red object ?", ["arr_coc", "random"], budget=16)
res.runs["arr_coc"].answer, res.runs["arr_coc"].overlay     # answer word, PIL overlay
res.maps                                        # {"participatory": [gh, gw], "propositional": ..., "perspectival": ...}
res.greedy                                      # pick-order gains of the arr_coc allocator (nats)
```

Pipeline (the stage-2 pipeline of :class:`arr_coc.training.module.ARRCOCModule`, on one image):
the ViT encodes the image once (cached per image), the projector maps its tokens into the
LLM's space, each allocator picks K candidates (fine tokens + pooled 2x2 / 4x4 regions)
given the question's LLM embeddings, pooled picks are re-pooled in ViT space, and the
frozen LLM reads the kept tokens and answers with one word. A budget change re-runs only
the allocators and the answer, never the image encoder.

Latency (``python -m benchmarks microscope``, experiments/results/microscope.md): a budget
change for the page's five default allocators costs 83 ms wall / 27 ms CPU on the 2-core
machine shared with a training job (load average 10), 13-30 ms per allocator; a new image
(ViT encoding + relevance maps) 116 ms. The browser round trip of a slider move measured
by the end-to-end test is 0.1-0.6 s on the same loaded machine.

Model files: the base VLM from ``checkpoints/base_vlm`` (else the newest
``experiments/runs/*/best``, else an untrained VLM), trained allocators from
``checkpoints/allocator`` (folders written by :func:`arr_coc.training.hub.save_allocator`),
else the registry's untrained defaults. Every fallback is recorded in ``Models.notes`` and
shown on the page.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from arr_coc.allocators import Allocator, create_allocator, list_allocators
from arr_coc.pyramid import pyramid_positions

__all__ = [
    "DEFAULT_ALLOCATOR_DIR",
    "DEFAULT_CHECKPOINT",
    "LEVEL_COLOURS",
    "MAX_PIXELS",
    "Analysis",
    "AllocatorRun",
    "Models",
    "analyse",
    "find_base_checkpoint",
    "greedy_rows",
    "load_image",
    "load_models",
    "relevance_maps",
    "render_gains",
    "render_heatmap",
    "render_overlay",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CHECKPOINT = REPO_ROOT / "checkpoints" / "base_vlm"
DEFAULT_ALLOCATOR_DIR = REPO_ROOT / "checkpoints" / "allocator"
MAX_PIXELS = 25_000_000  # uploads above this are refused before decoding
SCALE = 6  # display pixels per image pixel (64 px -> 384 px)
# outline colours per pyramid level: 0 fine, 1 = 2x2, 2 = 4x4, 3 = 8x8
LEVEL_COLOURS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (255, 150, 0), (0, 190, 255), (255, 60, 170))
LEVEL_NAMES = ("fine", "2x2", "4x4", "8x8")


# ---------------------------------------------------------------------------- loading
def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def find_base_checkpoint(path: str | Path | None = None, *, root: Path = REPO_ROOT) -> tuple[Path | None, list[str]]:
    """The base VLM folder to load, and notes on any fallback.

    ``path`` given: that folder (``ValueError`` if it holds no ``config.json`` +
    ``model.safetensors``). Otherwise ``checkpoints/base_vlm``, else the newest
    ``experiments/runs/*/best``, else None (an untrained VLM).
    """
    if path is not None:
        folder = Path(path)
        if not _has_weights(folder):
            raise ValueError(f"checkpoint: expected config.json and model.safetensors in {folder}")
        return folder, []
    default = root / "checkpoints" / "base_vlm"
    if _has_weights(default):
        return default, []
    runs = sorted(
        (p for p in (root / "experiments" / "runs").glob("*/best") if _has_weights(p)),
        key=lambda p: (p / "model.safetensors").stat().st_mtime,
    )
    if runs:
        return runs[-1], [f"No checkpoint in {default}; using the latest training run, {runs[-1]}."]
    return None, [f"No base VLM checkpoint found ({default}): the VLM is UNTRAINED, its answers are noise."]


@dataclass
class Models:
    """Everything the page runs: the frozen VLM, its tokenizer, the task and the allocators."""

    vlm: Any
    tokenizer: Any
    task: Any
    allocators: dict[str, Allocator]
    trained: set[str]
    checkpoint: Path | None
    notes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    cache: "OrderedDict[str, dict[str, torch.Tensor]]" = field(default_factory=OrderedDict, repr=False)
    map_cache: "OrderedDict[tuple, tuple[dict, dict]]" = field(default_factory=OrderedDict, repr=False)
    cache_size: int = 32

    @property
    def image_size(self) -> int:
        return int(self.vlm.config.vision.img_size)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.vlm.grid)  # type: ignore[return-value]

    @property
    def num_fine(self) -> int:
        return self.grid[0] * self.grid[1]


def _load_trained_allocators(folder: Path) -> tuple[dict[str, Allocator], list[str]]:
    from arr_coc.training.hub import load_allocator

    out: dict[str, Allocator] = {}
    notes: list[str] = []
    if not folder.is_dir():
        return out, [f"No trained allocators in {folder}: allocators are the untrained registry defaults."]
    candidates = [folder] if (folder / "config.json").is_file() else sorted(p for p in folder.iterdir() if p.is_dir())
    for sub in candidates:
        if not (sub / "config.json").is_file():
            continue
        try:
            name = json.loads((sub / "config.json").read_text())["name"]
            alloc = load_allocator(sub).eval()
        except Exception as err:  # a broken folder must not take the page down
            notes.append(f"Could not load the allocator in {sub}: {type(err).__name__}: {err}")
            continue
        out[str(name)] = alloc
    if not out:
        notes.append(f"No loadable allocator in {folder}: allocators are the untrained registry defaults.")
    return out, notes


def load_models(
    checkpoint: str | Path | None = None,
    allocator_dir: str | Path | None = DEFAULT_ALLOCATOR_DIR,
    *,
    seed: int = 0,
    threads: int | None = None,
) -> Models:
    """Load the base VLM (see :func:`find_base_checkpoint`), tokenizer, task and allocators.

    ``allocator_dir=None`` skips trained allocators. Allocators that cannot be built without
    arguments are left out (noted).
    """
    from arr_coc.training.base_vlm import BaseVLM, BaseVLMConfig
    from arr_coc.training.task import VQATask
    from arr_coc.training.tokenizer import build_tokenizer, load_tokenizer

    if threads is not None:
        torch.set_num_threads(int(threads))
    folder, notes = find_base_checkpoint(checkpoint)
    if folder is not None:
        vlm = BaseVLM.from_pretrained(folder)
        cfg = vlm.config
        size = int(cfg.vision.img_size)
        task = VQATask(seed=seed, image_size=size, grid=size // int(cfg.vision.patch_size))
        tokenizer = load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else build_tokenizer(task)
    else:
        task = VQATask(seed=seed)
        tokenizer = build_tokenizer(task)
        torch.manual_seed(seed)
        vlm = BaseVLM(BaseVLMConfig.for_task(task, tokenizer))
    vlm.eval().requires_grad_(False)
    allocators: dict[str, Allocator] = {}
    for name in list_allocators():
        try:
            allocators[name] = create_allocator(name).eval()
        except Exception as err:
            notes.append(f"Allocator {name!r} needs arguments and is left out ({err}).")
    trained: set[str] = set()
    if allocator_dir is not None:
        loaded, more = _load_trained_allocators(Path(allocator_dir))
        allocators.update(loaded)
        trained = set(loaded)
        notes += more
    return Models(vlm, tokenizer, task, allocators, trained, folder, notes)


# ---------------------------------------------------------------------------- images
def _to_square(img: Image.Image, size: int) -> np.ndarray:
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if s != size:
        img = img.resize((size, size), Image.Resampling.BOX if s > size else Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def load_image(source: str | Path | np.ndarray | Image.Image, *, image_size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A file path, PIL image or array -> [image_size, image_size, 3] float32 in [0, 1].

    Non-square images are centre-cropped, then resized. ``ValueError`` (with a message fit
    for the page) for a file that is not an image, an image over ``max_pixels`` pixels
    (checked from the header, before decoding) or an array of the wrong shape.
    """
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or min(arr.shape[:2]) < 1:
            raise ValueError(f"image: expected an [H, W, 3] array, got shape {arr.shape}")
        if arr.shape[0] * arr.shape[1] > max_pixels:
            raise ValueError(f"image: {arr.shape[1]} x {arr.shape[0]} pixels is over the limit of {max_pixels:,}")
        arr = arr[..., :3]
        if arr.dtype != np.uint8:
            arr = np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0)
            arr = (arr * 255.0 + 0.5).astype(np.uint8)
        return _to_square(Image.fromarray(arr, "RGB"), image_size)
    if isinstance(source, Image.Image):
        img = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"image: no such file {path.name!r}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(path)
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning, OSError) as err:
            if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
                raise ValueError(f"image: {path.name!r} is too large to decode safely") from None
            raise ValueError(f"image: {path.name!r} is not an image file PIL can read (PNG, JPEG, ...)") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ValueError(f"image: {w} x {h} = {w * h:,} pixels is over the limit of {max_pixels:,}; upload a smaller image")
    if w < 1 or h < 1:
        raise ValueError(f"image: empty image ({w} x {h})")
    try:
        with _strict_decoding():
            img = img.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"image: the file is damaged or truncated ({err})") from None
    return _to_square(img, image_size)


@contextlib.contextmanager
def _strict_decoding():
    """Decode with PIL's default strictness: a truncated file is an error even when another
    library in the process (lmms-eval's task module does) set ``ImageFile.LOAD_TRUNCATED_IMAGES``."""
    from PIL import ImageFile

    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def _image_key(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image, dtype=np.float32).tobytes()).hexdigest()


def _encode(models: Models, image: np.ndarray) -> tuple[dict[str, torch.Tensor], bool]:
    """Cached ViT and projected tokens of one image; returns (entry, was_cached)."""
    key = _image_key(image)
    hit = models.cache.get(key)
    if hit is not None:
        models.cache.move_to_end(key)
        return hit, True
    pixels = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float()  # [1, 3, H, W]
    vision = models.vlm.encode_image(pixels)  # [1, P + N, Dv]
    entry = {"pixels": pixels, "vision": vision, "projected": models.vlm.project(vision)}
    models.cache[key] = entry
    while len(models.cache) > models.cache_size:
        models.cache.popitem(last=False)
    return entry, False


def _tokenize(models: Models, question: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    words = (question or "").strip().lower().replace("?", " ?").split()
    if not words:
        raise ValueError("question: type a question, e.g. 'what shape is the red object ?'")
    enc = models.tokenizer([" ".join(words)], return_tensors="pt")
    ids = enc["input_ids"].long()
    unk = [w for w, i in zip(words, ids[0].tolist()) if i == models.tokenizer.unk_token_id]
    return ids, enc["attention_mask"].bool(), unk


# ---------------------------------------------------------------------------- rendering
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _upscale(image: np.ndarray, scale: int = SCALE) -> Image.Image:
    img = Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def render_overlay(image: np.ndarray, positions: np.ndarray, grid: tuple[int, int], *, scale: int = SCALE) -> Image.Image:
    """Kept tokens over the upscaled image: uncovered patches dimmed, one outline per kept region.

    image: [H, W, 3] in [0, 1]; positions: [K, 3] (row, col, level) of the kept tokens
    (rows with level < 0 are padding and ignored). Outline colour = level (``LEVEL_COLOURS``).
    """
    base = _upscale(image, scale)
    gh, gw = grid
    ph, pw = base.height / gh, base.width / gw
    covered = np.zeros((gh, gw), dtype=bool)
    pos = [tuple(int(v) for v in p) for p in np.asarray(positions).reshape(-1, 3) if p[2] >= 0]
    for r, c, lv in pos:
        s = 2**lv
        covered[r : r + s, c : c + s] = True
    shade = Image.new("L", base.size, 0)
    d = ImageDraw.Draw(shade)
    for r in range(gh):
        for c in range(gw):
            if not covered[r, c]:
                d.rectangle([c * pw, r * ph, (c + 1) * pw - 1, (r + 1) * ph - 1], fill=170)
    out = Image.composite(Image.new("RGB", base.size, (0, 0, 0)), base, shade)
    d = ImageDraw.Draw(out)
    for r, c, lv in sorted(pos, key=lambda p: -p[2]):  # coarse first, fine outlines on top
        s = 2**lv
        x0, y0 = c * pw, r * ph
        x1, y1 = min(c + s, gw) * pw - 1, min(r + s, gh) * ph - 1
        colour = LEVEL_COLOURS[min(lv, len(LEVEL_COLOURS) - 1)]
        inset = 1 + 2 * (2 - min(lv, 2))
        d.rectangle([x0 + inset, y0 + inset, x1 - inset, y1 - inset], outline=colour, width=2)
    return out


def _colormap(values: np.ndarray) -> np.ndarray:
    """[..] in [0, 1] -> [.., 3] uint8 (viridis)."""
    from matplotlib import colormaps

    return (colormaps["viridis"](np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8)


def render_heatmap(values: np.ndarray, image: np.ndarray, *, scale: int = SCALE, title: str = "") -> Image.Image:
    """A [gh, gw] score map (min-max normalised, viridis) blended over the upscaled image.

    ``title`` writes a caption bar with the title and the value range on top.
    """
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    norm = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    base = _upscale(image, scale)
    heat = Image.fromarray(_colormap(norm), "RGB").resize(base.size, Image.Resampling.NEAREST)
    out = Image.blend(base.convert("L").convert("RGB"), heat, 0.65)
    if title:
        d = ImageDraw.Draw(out)
        d.rectangle([0, 0, out.width, 14], fill=(0, 0, 0))
        d.text((3, 2), f"{title}  [{lo:.3g}, {hi:.3g}]", fill=(255, 255, 255), font=_font())
    return out


def render_gains(rows: list[dict[str, Any]], *, width: int = 384, height: int = 200) -> Image.Image:
    """Bar chart of the greedy gains in pick order (query information stacked on coverage)."""
    out = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(out)
    if not rows:
        d.text((8, height // 2), "no greedy picks", fill=(0, 0, 0), font=_font())
        return out
    gains = np.array([r["gain (nats)"] for r in rows])
    query = np.array([r["I(c_j; Q | S) (nats)"] for r in rows])
    top = max(float(gains.max()), float(query.max()), 1e-9)
    left, bottom, plot_h = 30, height - 16, height - 40
    bw = (width - left - 6) / len(rows)
    for i, (g, q) in enumerate(zip(gains, query)):
        x0 = left + i * bw
        d.rectangle([x0 + 1, bottom - g / top * plot_h, x0 + max(bw - 2, 1), bottom], fill=(150, 170, 210))
        d.rectangle([x0 + bw * 0.3, bottom - q / top * plot_h, x0 + max(bw * 0.7, 1), bottom], fill=(200, 60, 60))
    d.line([left, bottom, width - 4, bottom], fill=(0, 0, 0))
    d.text((2, bottom - plot_h - 4), f"{top:.2f}", fill=(0, 0, 0), font=_font())
    d.text((2, bottom - 6), "0", fill=(0, 0, 0), font=_font())
    d.text((4, 2), "blue: gain, red: I(c_j; Q | S), nats, in pick order", fill=(0, 0, 0), font=_font())
    d.text((left, bottom + 3), "pick 1", fill=(0, 0, 0), font=_font())
    d.text((width - 50, bottom + 3), f"pick {len(rows)}", fill=(0, 0, 0), font=_font())
    return out


# ---------------------------------------------------------------------------- analysis
@dataclass
class AllocatorRun:
    """One allocator on one image + question + budget."""

    name: str
    trained: bool
    positions: np.ndarray  # [K, 3] (row, col, level) of the kept tokens
    level_counts: dict[str, int]
    answer: str
    top: list[tuple[str, float]]  # top-3 (word, probability)
    seconds: float  # allocator + answer (the image encoding is shared and cached)
    gain: float | None  # the allocator's I(selected; query) estimate (nats), if any
    alpha: float | None
    price: float | None
    overlay: Image.Image
    extras: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def kept(self) -> int:
        return int(self.positions.shape[0])


@dataclass
class Analysis:
    """Everything the page shows for one image + question + budget."""

    runs: dict[str, AllocatorRun]
    maps: dict[str, np.ndarray]  # scorer name -> [gh, gw]
    map_images: dict[str, Image.Image]
    greedy: list[dict[str, Any]]  # pick-order gains of "arr_coc" (empty when not run)
    greedy_total: float | None  # sum of the query information of the picks (chain rule)
    greedy_gain: float | None  # the allocator's own reported I(c_S; Q)
    alpha: float | None
    price: float | None
    unknown_words: list[str]
    encode_seconds: float
    encode_cached: bool
    total_seconds: float
    notes: list[str] = field(default_factory=list)


def greedy_rows(extras: dict[str, Any], candidate_positions: torch.Tensor) -> list[dict[str, Any]]:
    """The ``arr_coc`` allocator's picks in order (batch row 0), one dict per pick.

    candidate_positions: [M, 3] (row, col, level) of the candidate list. The column
    ``cumulative I (nats)`` is the running sum of the query information, whose last value is
    I(c_S ; Q) by the chain rule.
    """
    order = extras["pick_order"][0]
    rows, cum = [], 0.0
    for step, idx in enumerate(order.tolist()):
        if idx < 0:
            break
        q = float(extras["query_gains"][0, step])
        cum += q
        r, c, lv = (int(v) for v in candidate_positions[idx].tolist())
        rows.append(
            {
                "step": step + 1,
                "row": r,
                "col": c,
                "level": LEVEL_NAMES[min(lv, len(LEVEL_NAMES) - 1)],
                "gain (nats)": round(float(extras["step_gains"][0, step]), 4),
                "I(c_j; Q | S) (nats)": round(q, 4),
                "coverage (nats)": round(float(extras["coverage_gains"][0, step]), 4),
                "cumulative I (nats)": round(cum, 4),
            }
        )
    return rows


def relevance_maps(
    models: Models, entry: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, *, source: str = "pixels"
) -> dict[str, np.ndarray]:
    """The three scorers' maps on the fine grid, each [gh, gw].

    participatory: pointwise MI (nats) of each fine candidate with the question, from the
    ``arr_coc`` allocator's scorer (trained if one was loaded). propositional / perspectival:
    query-agnostic, from the pixels (patch colour entropy in nats / salience in [0, 1]) or
    from the ViT tokens (feature norm / CLS attention), per ``source``.
    """
    from arr_coc.knowing import PerspectivalScorer, PropositionalScorer
    from arr_coc.pyramid import build_pyramid

    if source not in ("pixels", "tokens"):
        raise ValueError(f"source: expected 'pixels' or 'tokens', got {source!r}")
    gh, gw = models.grid
    p = int(models.vlm.num_prefix_tokens)
    proj = entry["projected"]
    alloc = models.allocators.get("arr_coc") or create_allocator("arr_coc").eval()
    query = models.vlm.query_embeddings(ids)
    cands = build_pyramid(proj[:, p:], (gh, gw), tuple(alloc.pyramid_levels)).candidates
    pmi = alloc.scorer(cands, query, mask).pmi[0, : gh * gw]
    vision = entry["vision"]
    if source == "pixels":
        prop = PropositionalScorer("pixels")(pixels=entry["pixels"], grid=(gh, gw))[0]
        persp = PerspectivalScorer("pixels")(pixels=entry["pixels"], grid=(gh, gw))[0]
    else:
        prop = PropositionalScorer("tokens")(vision[:, p:])[0]
        persp = PerspectivalScorer("tokens")(vision[:, p:], prefix=vision[:, :p])[0]
    return {k: v.reshape(gh, gw).float().numpy() for k, v in (("participatory", pmi), ("propositional", prop), ("perspectival", persp))}


MAP_TITLES = {
    "pixels": {
        "participatory": "participatory: PMI with the question (nats)",
        "propositional": "propositional: patch colour entropy (nats)",
        "perspectival": "perspectival: salience",
    },
    "tokens": {
        "participatory": "participatory: PMI with the question (nats)",
        "propositional": "propositional: ViT token norm",
        "perspectival": "perspectival: CLS attention",
    },
}


def _run_one(models: Models, name: str, entry, ids, mask, query, budget: int) -> AllocatorRun:
    from arr_coc.training.module import repool_in_vision_space

    alloc = models.allocators[name]
    vlm = models.vlm
    p = int(vlm.num_prefix_tokens)
    t0 = time.perf_counter()
    out = alloc(entry["projected"], query=query, query_mask=mask, budget=int(budget), grid=models.grid, num_prefix_tokens=p)
    visual = repool_in_vision_space(
        out.tokens, out.positions, out.mask, entry["vision"][:, p:], entry["projected"][:, p:], models.grid, vlm.project
    )
    if visual.shape[1] == 0:  # nothing kept: one masked placeholder so the LLM still reads the question
        visual = visual.new_zeros(1, 1, visual.shape[-1])
        vmask = torch.zeros(1, 1, dtype=torch.bool)
        vpos = torch.full((1, 1, 3), -1, dtype=torch.long)
    else:
        vmask, vpos = out.mask, out.positions
    logits = vlm.answer_logits(visual, vmask, vpos, ids, mask)[0]
    seconds = time.perf_counter() - t0
    probs = logits.float().softmax(-1)
    top_p, top_i = probs.topk(3)
    words = models.tokenizer.convert_ids_to_tokens(top_i.tolist())
    pos = out.positions[0][out.mask[0]].numpy()
    counts = {n: int((pos[:, 2] == lv).sum()) for lv, n in enumerate(LEVEL_NAMES) if (pos[:, 2] == lv).any()}
    ex = out.extras
    alpha = float(ex["alpha"][0]) if "alpha" in ex else None
    price = float(ex["price"][0]) if "price" in ex else None
    return AllocatorRun(
        name=name,
        trained=name in models.trained,
        positions=pos,
        level_counts=counts,
        answer=words[0],
        top=[(w, float(pr)) for w, pr in zip(words, top_p.tolist())],
        seconds=seconds,
        gain=None if out.gain is None else float(out.gain[0]),
        alpha=alpha,
        price=price,
        overlay=render_overlay(entry["pixels"][0].permute(1, 2, 0).numpy(), pos, models.grid),
        extras=ex,
    )


def analyse(
    models: Models,
    image: np.ndarray,
    question: str,
    allocators: list[str] | tuple[str, ...],
    budget: int,
    *,
    source: str = "pixels",
    with_maps: bool = True,
) -> Analysis:
    """Run every chosen allocator on one image + question + budget (see the module docstring).

    image: [H, W, 3] in [0, 1] at the VLM's resolution (:func:`load_image`). ``ValueError``
    for an empty question, no allocator, an unknown allocator or a budget outside
    [1, N fine tokens].
    """
    if image is None:
        raise ValueError("image: pick an example or upload an image first")
    image = np.asarray(image, dtype=np.float32)
    s = models.image_size
    if image.shape != (s, s, 3):
        raise ValueError(f"image: expected [{s}, {s}, 3] (use load_image), got {image.shape}")
    allocators = list(allocators or [])
    if not allocators:
        raise ValueError("allocators: choose at least one allocator")
    unknown = [a for a in allocators if a not in models.allocators]
    if unknown:
        raise ValueError(f"allocators: unknown {unknown}; known: {sorted(models.allocators)}")
    if isinstance(budget, float) and budget.is_integer():
        budget = int(budget)
    if not isinstance(budget, int) or isinstance(budget, bool) or not 1 <= budget <= models.num_fine:
        raise ValueError(f"budget: expected an int in [1, {models.num_fine}], got {budget!r}")
    t_start = time.perf_counter()
    with models.lock, torch.inference_mode():
        ids, mask, unk = _tokenize(models, question)
        t0 = time.perf_counter()
        entry, cached = _encode(models, image)
        enc_s = time.perf_counter() - t0
        query = models.vlm.query_embeddings(ids)
        runs = {name: _run_one(models, name, entry, ids, mask, query, budget) for name in allocators}
        maps, map_images = {}, {}
        if with_maps:  # the maps do not depend on the budget: cached per image, question and source
            key = (_image_key(image), tuple(ids[0].tolist()), source)
            hit = models.map_cache.get(key)
            if hit is None:
                maps = relevance_maps(models, entry, ids, mask, source=source)
                shown = entry["pixels"][0].permute(1, 2, 0).numpy()
                hit = maps, {k: render_heatmap(v, shown) for k, v in maps.items()}
                models.map_cache[key] = hit
                while len(models.map_cache) > models.cache_size:
                    models.map_cache.popitem(last=False)
            maps, map_images = hit
    greedy, total, g_gain, alpha, price = [], None, None, None, None
    if "arr_coc" in runs:
        run = runs["arr_coc"]
        cand_pos, _ = pyramid_positions(models.grid, tuple(models.allocators["arr_coc"].pyramid_levels))
        greedy = greedy_rows(run.extras, cand_pos)
        total = float(run.extras["query_gains"][0, : len(greedy)].sum())  # chain rule: = I(c_S; Q)
        g_gain, alpha, price = run.gain, run.alpha, run.price
    else:
        for run in runs.values():
            if run.alpha is not None:
                alpha, price = run.alpha, run.price
                break
    notes = []
    if unk:
        notes.append(f"Words the model does not know (read as [UNK]): {', '.join(unk)}")
    return Analysis(
        runs=runs,
        maps=maps,
        map_images=map_images,
        greedy=greedy,
        greedy_total=total,
        greedy_gain=g_gain,
        alpha=alpha,
        price=price,
        unknown_words=unk,
        encode_seconds=enc_s,
        encode_cached=cached,
        total_seconds=time.perf_counter() - t_start,
        notes=notes,
    )
