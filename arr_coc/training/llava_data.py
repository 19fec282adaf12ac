"""LLaVA conversation JSON over an image folder: reading it, and exporting a task to it.

The format (LLaVA-Instruct, ShareGPT-style) is a JSON list of records::

    {"id": "000017",
     "image": "images/000017.png",                      # relative to the image folder
     "conversations": [
        {"from": "human", "value": "<image>\\nwhat shape is the red object?"},
        {"from": "gpt",   "value": "circle"},
        {"from": "human", "value": "how many squares are there?"},   # more turns: same image
        {"from": "gpt",   "value": "two"}]}

Every (human, gpt) pair is one question-answer example on the record's image; the
``<image>`` placeholder is removed from the question text (the model inserts the visual
tokens itself). Records may carry extra keys, which LLaVA loaders ignore; the exporter
writes the ground-truth relevance mask of each turn (``relevance``: one [gh, gw] list of
0/1 rows per turn) and its question type (``question_types``) so that an exported task
round-trips with everything the allocator metrics need.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["IMAGE_TOKEN", "LlavaDataset", "export_llava", "load_image", "read_llava_json"]

IMAGE_TOKEN = "<image>"
_HUMAN = ("human", "user")
_ASSISTANT = ("gpt", "assistant")


def read_llava_json(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a LLaVA conversation file (a JSON list, or JSON lines)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"json_path: no such file {str(path)!r}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = json.loads(text)
    if not isinstance(records, list):
        raise ValueError(f"json_path: expected a JSON list of records in {str(path)!r}, got {type(records).__name__}")
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping) or "conversations" not in rec:
            raise ValueError(f"json_path: record {i} has no 'conversations' list")
        if "image" not in rec:
            raise ValueError(f"json_path: record {i} ({rec.get('id', '?')}) has no 'image' (text-only records are not supported)")
    return records


def _turn_pairs(rec: Mapping[str, Any], where: str) -> list[tuple[str, str]]:
    """(question, answer) pairs of one record, with the ``<image>`` placeholder removed."""
    conv = rec["conversations"]
    if len(conv) % 2 or not conv:
        raise ValueError(f"{where}: expected alternating human/gpt turns, got {len(conv)} turns")
    pairs = []
    for q, a in zip(conv[0::2], conv[1::2]):
        if q.get("from") not in _HUMAN or a.get("from") not in _ASSISTANT:
            raise ValueError(f"{where}: expected a human turn then a gpt turn, got {q.get('from')!r}, {a.get('from')!r}")
        question = " ".join(q["value"].replace(IMAGE_TOKEN, " ").split())
        pairs.append((question, a["value"].strip()))
    if IMAGE_TOKEN not in conv[0]["value"]:
        raise ValueError(f"{where}: the first human turn has no {IMAGE_TOKEN!r} placeholder")
    return pairs


def load_image(path: str | Path, image_size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """An image file -> [3, H, W] float32 in [0, 1] (RGB), resized (bicubic) when asked."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if image_size is not None:
            h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
            if im.size != (w, h):
                im = im.resize((w, h), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


class LlavaDataset(Dataset):
    """One example per (human, gpt) turn pair of a LLaVA conversation file.

    Args:
        json_path: the conversation file (JSON list or ``.jsonl``).
        image_folder: folder the records' ``image`` paths are relative to.
        image_size: resize every image to this (int = square); None keeps the file's size.
        first_turn_only: keep only the first question of each record.

    Each item is a dict: ``image`` [3, H, W] float in [0, 1], ``question`` str, ``answer``
    str, ``id`` str, and where the record has them ``relevance`` [gh, gw] bool and
    ``question_type`` str.
    """

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path,
        *,
        image_size: int | tuple[int, int] | None = None,
        first_turn_only: bool = False,
    ):
        self.image_folder = Path(image_folder)
        if not self.image_folder.is_dir():
            raise ValueError(f"image_folder: no such folder {str(self.image_folder)!r}")
        self.image_size = image_size
        self.records = read_llava_json(json_path)
        self.index: list[tuple[int, int, str, str]] = []
        for r, rec in enumerate(self.records):
            pairs = _turn_pairs(rec, f"record {r} ({rec.get('id', '?')})")
            for t, (q, a) in enumerate(pairs[:1] if first_turn_only else pairs):
                self.index.append((r, t, q, a))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r, t, question, answer = self.index[i]
        rec = self.records[r]
        path = self.image_folder / rec["image"]
        if not path.is_file():
            raise ValueError(f"image: record {r} points to a missing file {str(path)!r}")
        item: dict[str, Any] = {
            "image": load_image(path, self.image_size),
            "question": question,
            "answer": answer,
            "id": str(rec.get("id", r)),
        }
        rel = rec.get("relevance", [None] * (t + 1))[t]
        if rel is not None:
            item["relevance"] = torch.tensor(rel, dtype=torch.bool)
        qtype = rec.get("question_types", [None] * (t + 1))[t]
        if qtype is not None:
            item["question_type"] = qtype
        return item


def _get(ex: Any, key: str, default: Any = None) -> Any:
    if isinstance(ex, Mapping):
        return ex.get(key, default)
    return getattr(ex, key, default)


def _to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image: expected a [3, H, W] tensor, got {getattr(image, 'shape', type(image))}")
    img = image.detach().float().cpu()
    if img.min() < -1e-6 or img.max() > 1 + 1e-6:
        raise ValueError(f"image: expected values in [0, 1], got [{img.min().item():.3g}, {img.max().item():.3g}]")
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def export_llava(
    examples: Iterable[Any],
    out_dir: str | Path,
    *,
    json_name: str = "data.json",
    image_dir: str = "images",
) -> Path:
    """Write examples as a LLaVA conversation file plus PNG images; returns the JSON path.

    ``examples`` yields mappings or objects with ``image`` ([3, H, W] float in [0, 1]),
    ``question`` and ``answer`` (str), and optionally ``relevance`` ([gh, gw] bool),
    ``question_type`` (str) and ``image_id`` (examples sharing an ``image_id`` become
    turns of one record with one image file). Images are stored as 8-bit PNG, so pixel
    values come back within 1/510 of the original.
    """
    out_dir = Path(out_dir)
    (out_dir / image_dir).mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    for n, ex in enumerate(examples):
        question, answer, image = _get(ex, "question"), _get(ex, "answer"), _get(ex, "image")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise ValueError(f"examples: item {n} needs str 'question' and 'answer'")
        key = str(_get(ex, "image_id", n))
        rec = records.get(key)
        if rec is None:
            rel_path = f"{image_dir}/{key}.png"
            Image.fromarray(_to_uint8_hwc(image)).save(out_dir / rel_path)
            rec = {"id": key, "image": rel_path, "conversations": [], "relevance": [], "question_types": []}
            records[key] = rec
        prefix = f"{IMAGE_TOKEN}\n" if not rec["conversations"] else ""
        rec["conversations"] += [
            {"from": "human", "value": prefix + question},
            {"from": "gpt", "value": answer},
        ]
        rel = _get(ex, "relevance")
        rec["relevance"].append(None if rel is None else torch.as_tensor(rel).bool().int().tolist())
        rec["question_types"].append(_get(ex, "question_type"))
    for rec in records.values():
        if all(r is None for r in rec["relevance"]):
            del rec["relevance"]
        if all(t is None for t in rec["question_types"]):
            del rec["question_types"]
    json_path = out_dir / json_name
    json_path.write_text(json.dumps(list(records.values()), indent=1), encoding="utf-8")
    return json_path
