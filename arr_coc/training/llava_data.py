"""LLaVA conversation JSON over an image folder: reading it, and exporting a task to it.

The format (LLaVA-Instruct, ShareGPT-style) is a JSON list of records::

    {"id": "000017",
     "image": "images/000017.png",                      # relative to the image folder
     "conversations": [
        {"from": "human", "value": "<image>\\nwhat shape is the red object?"},
        {"from": "gpt",   "value": "circle"},
        {"from": "human", "value": "how many squares are there?"},   # more turns: same image
        {"from": "gpt",   "value": "two"}]}

Two readers:

- :class:`LlavaDataset`: every (human, gpt) pair is one question-answer example on the
  record's image; the ``<image>`` placeholder is removed from the question text (the model
  inserts the visual tokens itself). The embedded base VLM reads these (one-word answers).
- :class:`LlavaConversationDataset` + :class:`ChatCollator`: one example per record, the
  *whole* conversation, for a real host (LLaVA, Qwen-VL: :mod:`arr_coc.training.hosts`). The
  collator renders it with the host processor's chat template, the image where the
  ``<image>`` placeholder was in the first human turn (before, after or inside the text; the
  processor expands it to the host's image tokens), and labels every assistant turn (teacher
  forcing; everything else is -100). Records may carry extra keys, which LLaVA loaders ignore; the exporter
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

__all__ = [
    "IMAGE_TOKEN",
    "ChatCollator",
    "LlavaConversationDataset",
    "LlavaDataset",
    "chat_messages",
    "export_llava",
    "load_image",
    "read_llava_json",
]

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


def _conversation(rec: Mapping[str, Any], where: str) -> tuple[list[tuple[str, str]], tuple[str, str]]:
    """All (question, answer) turns of a record, placeholder removed, and the first human
    turn's text before and after its one ``<image>`` placeholder."""
    conv = rec["conversations"]
    if not conv or len(conv) % 2:
        raise ValueError(f"{where}: expected alternating human/gpt turns, got {len(conv)} turns")
    first = conv[0].get("value", "")
    if first.count(IMAGE_TOKEN) != 1:
        raise ValueError(f"{where}: the first human turn must hold exactly one {IMAGE_TOKEN!r}, found {first.count(IMAGE_TOKEN)}")
    for t, turn in enumerate(conv[1:], start=1):
        if IMAGE_TOKEN in turn.get("value", ""):
            raise ValueError(f"{where}: turn {t} holds {IMAGE_TOKEN!r}; one image per record, in the first human turn")
    before, after = (" ".join(part.split()) for part in first.split(IMAGE_TOKEN))
    return _turn_pairs(rec, where), (before, after)


class LlavaConversationDataset(Dataset):
    """One example per record of a LLaVA conversation file: the whole conversation.

    Args: as :class:`LlavaDataset` (``json_path``, ``image_folder``, ``image_size``).

    Each item is a dict: ``image`` [3, H, W] float in [0, 1], ``turns`` a list of (question,
    answer) str pairs (every human turn then its gpt turn, the placeholder removed),
    ``image_text`` the first human turn's text (before, after) the ``<image>`` placeholder,
    ``id`` str, and where every turn of the record has one, ``relevance`` [gh, gw] bool (the
    union of the turns' masks: every patch some answer depends on).
    """

    def __init__(self, json_path: str | Path, image_folder: str | Path, *, image_size: int | tuple[int, int] | None = None):
        self.image_folder = Path(image_folder)
        if not self.image_folder.is_dir():
            raise ValueError(f"image_folder: no such folder {str(self.image_folder)!r}")
        self.image_size = image_size
        self.records = read_llava_json(json_path)
        self.conversations = [
            _conversation(rec, f"record {r} ({rec.get('id', '?')})") for r, rec in enumerate(self.records)
        ]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        path = self.image_folder / rec["image"]
        if not path.is_file():
            raise ValueError(f"image: record {i} points to a missing file {str(path)!r}")
        turns, image_text = self.conversations[i]
        item: dict[str, Any] = {
            "image": load_image(path, self.image_size),
            "turns": list(turns),
            "image_text": image_text,
            "id": str(rec.get("id", i)),
        }
        rel = rec.get("relevance")
        if rel is not None and len(rel) == len(turns) and all(r is not None for r in rel):
            item["relevance"] = torch.tensor(rel, dtype=torch.bool).any(0)
        return item


def chat_messages(turns: list[tuple[str, str]], image_text: tuple[str, str] = ("", "")) -> list[dict[str, Any]]:
    """A conversation in the transformers chat format (content lists), the image in the first
    user turn where its placeholder was: ``image_text`` = (text before, text after)."""
    if not turns:
        raise ValueError("turns: expected at least one (question, answer) pair")
    before, after = image_text
    messages: list[dict[str, Any]] = []
    for t, (question, answer) in enumerate(turns):
        if t == 0:
            content = [{"type": "text", "text": before}] if before else []
            content.append({"type": "image"})
            content += [{"type": "text", "text": after}] if after else []
        else:
            content = [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


class ChatCollator:
    """Whole conversations -> the batch a transformers host reads (:mod:`arr_coc.training.hosts`).

    Args:
        processor: the host's processor (``transformers`` ``LlavaProcessor``,
            ``Qwen2VLProcessor``...): its chat template renders the conversation, it expands the
            image placeholder and preprocesses the image, its tokenizer tokenizes.
        max_length: drop trailing tokens beyond this length (never inside the image run).
        chat_template: a Jinja template to use instead of the processor's own.

    The conversation is rendered turn by turn: ``render(messages[:2t+1], generation prompt)``
    must extend the rendering of the previous turns and ``render(messages[:2t+2])`` must extend
    that; the extension of an assistant turn (its answer and the template's end-of-turn
    tokens) is the target, labelled with its token ids; everything else (system prompt,
    template tokens, questions, image tokens) is -100. The first segment, which holds the
    image, goes through the processor (placeholder expansion, pixels); the others through its
    tokenizer.

    Batch (right-padded): ``input_ids``, ``attention_mask``, ``labels`` [B, L]; the processor's
    pixel inputs concatenated over the batch (``pixel_values`` and, for Qwen-VL,
    ``image_grid_thw``); ``question_ids`` / ``question_mask`` [B, T]: the user's questions
    only (no template, no placeholder), the allocator's query; ``relevance`` [B, gh, gw]
    where every example has one.
    """

    def __init__(self, processor: Any, *, max_length: int | None = None, chat_template: str | None = None):
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None or not hasattr(processor, "apply_chat_template"):
            raise ValueError(f"processor: expected a transformers processor with a tokenizer, got {type(processor).__name__}")
        if chat_template is None and not getattr(processor, "chat_template", None):
            raise ValueError("chat_template: the processor has none; pass chat_template=")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length: expected an int >= 1 or None, got {max_length!r}")
        self.processor, self.tokenizer = processor, tokenizer
        self.max_length, self.chat_template = max_length, chat_template
        image_token = getattr(processor, "image_token", None)
        if image_token is None:
            raise ValueError(f"processor: {type(processor).__name__} names no image_token")
        self.image_token = image_token
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(image_token))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        kw = {"chat_template": self.chat_template} if self.chat_template is not None else {}
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **kw
        )

    def segments(self, turns: list[tuple[str, str]], image_text: tuple[str, str] = ("", "")) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, is_answer) pieces, in order."""
        messages = chat_messages(turns, image_text)
        out: list[tuple[str, bool]] = []
        done = ""
        for t in range(len(turns)):
            prompt = self._render(messages[: 2 * t + 1], True)
            full = self._render(messages[: 2 * t + 2], False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise ValueError(
                    f"chat_template: rendering turn {t} does not extend the rendering of the turns before it, "
                    "so the answer tokens cannot be located"
                )
            out += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        return out

    def encode(self, item: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """One conversation: ``input_ids`` / ``labels`` [L], the pixel inputs, ``question`` ids [T]."""
        turns = [tuple(t) for t in item["turns"]]
        pieces = self.segments(turns, tuple(item.get("image_text", ("", turns[0][0]))))
        first = pieces[0][0]
        if first.count(self.image_token) != 1:
            raise ValueError(
                f"chat_template: the first rendered turn must hold the image token {self.image_token!r} once, "
                f"found {first.count(self.image_token)}"
            )
        enc = self.processor(
            images=[_to_uint8_hwc(item["image"])], text=[first], add_special_tokens=False, return_tensors="pt"
        )
        ids = [enc["input_ids"][0]]
        labels = [torch.full_like(ids[0], -100)]
        for text, is_answer in pieces[1:]:
            piece = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            ids.append(piece)
            labels.append(piece.clone() if is_answer else torch.full_like(piece, -100))
        input_ids, label_ids = torch.cat(ids), torch.cat(labels)
        if self.max_length is not None and input_ids.numel() > self.max_length:
            image_cols = (input_ids == self.image_token_id).nonzero().flatten()
            if image_cols.numel() and int(image_cols[-1]) >= self.max_length:
                raise ValueError(f"max_length: {self.max_length} cuts the image tokens (they end at {int(image_cols[-1]) + 1})")
            input_ids, label_ids = input_ids[: self.max_length], label_ids[: self.max_length]
        # the query: the user's questions only (placeholder removed), one per line
        q_ids = self.tokenizer("\n".join(q for q, _ in turns), add_special_tokens=False)["input_ids"]
        pixels = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        return {"input_ids": input_ids, "labels": label_ids, "question_ids": torch.tensor(q_ids, dtype=torch.long), **pixels}

    def __call__(self, items: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("items: expected a non-empty batch")
        shapes = {tuple(it["image"].shape) for it in items}
        if len(shapes) != 1:
            raise ValueError(f"image: every image in a batch must have one size, got {sorted(shapes)}; set image_size")
        encoded = [self.encode(it) for it in items]
        batch = {
            "input_ids": _pad([e["input_ids"] for e in encoded], self.pad_id),
            "labels": _pad([e["labels"] for e in encoded], -100),
            "attention_mask": _pad([torch.ones_like(e["input_ids"]) for e in encoded], 0),
            "question_ids": _pad([e["question_ids"] for e in encoded], self.pad_id),
            "question_mask": _pad([torch.ones_like(e["question_ids"]) for e in encoded], 0).bool(),
        }
        for key in encoded[0]:
            if key not in batch:
                batch[key] = torch.cat([torch.as_tensor(e[key]) for e in encoded])
        if all(it.get("relevance") is not None for it in items):
            batch["relevance"] = torch.stack([torch.as_tensor(it["relevance"]).bool() for it in items])
        return batch


def _pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    """Right-pad 1-D tensors to [B, max length]."""
    out = torch.full((len(rows), max(r.numel() for r in rows)), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


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
