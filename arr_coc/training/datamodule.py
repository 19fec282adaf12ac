"""Lightning DataModules: the embedded task, and LLaVA-format data over an image folder.

Both yield the same batch (a dict), which ``ARRCOCModule`` consumes::

    pixels         [B, 3, H, W] float in [0, 1]
    question_ids   [B, T] long      (tokenizer ids, right-padded)
    question_mask  [B, T] bool      (True = real token)
    answer         [B] long         (the answer's first token id)
    relevance      [B, gh, gw] bool (where every example has one)
    question_type  [B] long         (index into ``question_types``; -1 = unknown)

Order and content are functions of the seed alone: the training order of epoch ``e`` is a
permutation drawn from ``seed + e`` (Lightning calls ``set_epoch``; under DDP Lightning's
``DistributedSampler`` takes over with the run's global seed), and the loaders never draw
from the global RNG, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from arr_coc.training.llava_data import LlavaDataset

__all__ = [
    "EmbeddedVQADataModule",
    "EmbeddedVQADataset",
    "LlavaDataModule",
    "SeededRandomSampler",
    "VQACollator",
]


class SeededRandomSampler(RandomSampler):
    """A shuffling sampler whose order is a function of ``(seed, epoch)`` only.

    A ``RandomSampler`` subclass so that Lightning treats the loader as shuffled (and swaps
    in a seeded ``DistributedSampler`` under DDP).
    """

    def __init__(self, data_source: Sequence, seed: int = 0):
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=g).tolist()


class EmbeddedVQADataset(Dataset):
    """Examples ``start .. start + length - 1`` of a ``VQATask`` (generated on access)."""

    def __init__(self, task: Any, start: int, length: int):
        if start < 0 or length < 0:
            raise ValueError(f"start/length: expected >= 0, got {start}/{length}")
        self.task, self.start, self.length = task, int(start), int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        ex = self.task.example(self.start + i)
        return {
            "image": ex.image,
            "question": ex.question,
            "answer": ex.answer,
            "relevance": ex.relevance,
            "question_type": ex.qtype,
            "image_id": str(self.start + i),
        }


class VQACollator:
    """List of example dicts -> the batch dict in the module docstring.

    Args:
        tokenizer: a ``transformers`` tokenizer (the task's word-level one or a real LLM's).
        question_types: names for ``question_type`` indices.
        max_question_length: truncate questions to this many tokens (None: no limit).
    """

    def __init__(self, tokenizer: Any, question_types: Sequence[str] = (), max_question_length: int | None = None):
        self.tokenizer = tokenizer
        self.question_types = list(question_types)
        self.max_question_length = max_question_length
        self._answer_cache: dict[str, int] = {}

    def answer_id(self, answer: str) -> int:
        if answer not in self._answer_cache:
            ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            unk = getattr(self.tokenizer, "unk_token_id", None)
            if not ids or (unk is not None and ids[0] == unk):
                raise ValueError(f"answer: {answer!r} is not in the tokenizer's vocabulary")
            self._answer_cache[answer] = int(ids[0])
        return self._answer_cache[answer]

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("items: expected a non-empty batch")
        shapes = {tuple(it["image"].shape) for it in items}
        if len(shapes) != 1:
            raise ValueError(f"image: every image in a batch must have one size, got {sorted(shapes)}; set image_size")
        enc = self.tokenizer(
            [it["question"] for it in items],
            padding=True,
            truncation=self.max_question_length is not None,
            max_length=self.max_question_length,
            add_special_tokens=False,
            return_tensors="pt",
        )
        batch = {
            "pixels": torch.stack([it["image"].float() for it in items]),
            "question_ids": enc["input_ids"].long(),
            "question_mask": enc["attention_mask"].bool(),
            "answer": torch.tensor([self.answer_id(it["answer"]) for it in items], dtype=torch.long),
        }
        if all(it.get("relevance") is not None for it in items):
            batch["relevance"] = torch.stack([torch.as_tensor(it["relevance"]).bool() for it in items])
        if self.question_types:
            batch["question_type"] = torch.tensor(
                [
                    self.question_types.index(t) if (t := it.get("question_type")) in self.question_types else -1
                    for it in items
                ],
                dtype=torch.long,
            )
        return batch


class _LoaderMixin:
    """Loaders shared by both data modules (needs ``split(name)``, ``collate``, ``batch_size``,
    ``num_workers``, ``seed``)."""

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.split("train"), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.split("val"), train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.split("test"), train=False)

    def _loader(self, ds: Dataset, *, train: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=SeededRandomSampler(ds, self.seed) if train else None,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=train and len(ds) >= self.batch_size,
            generator=torch.Generator().manual_seed(self.seed),
        )


def _check_loader_args(batch_size: int, num_workers: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers: expected an int >= 0, got {num_workers!r}")


class EmbeddedVQADataModule(_LoaderMixin, L.LightningDataModule):
    """The embedded task as train / val / test splits of disjoint example indices.

    Args:
        task: a ``VQATask`` (or anything with ``example(i)`` and ``vocabulary()``).
        tokenizer: the VLM's tokenizer; None builds the task's word-level one.
        train_size / val_size / test_size: examples per split (train is ``0..train_size-1``,
            then val, then test).
        batch_size, num_workers, seed: loader settings (``seed`` fixes the training order).
    """

    def __init__(
        self,
        task: Any,
        tokenizer: Any = None,
        *,
        train_size: int = 4096,
        val_size: int = 512,
        test_size: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        _check_loader_args(batch_size, num_workers)
        for name, n in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {n!r}")
        if tokenizer is None:
            from arr_coc.training.tokenizer import build_tokenizer

            tokenizer = build_tokenizer(task)
        from arr_coc.training.task import QUESTION_TYPES

        self.task, self.tokenizer = task, tokenizer
        self.sizes = (train_size, val_size, test_size)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, int(seed)
        self.question_types = list(getattr(task, "question_types", QUESTION_TYPES))
        self.collate = VQACollator(tokenizer, self.question_types)

    def split(self, name: str) -> EmbeddedVQADataset:
        tr, va, te = self.sizes
        starts = {"train": (0, tr), "val": (tr, va), "test": (tr + va, te)}
        if name not in starts:
            raise ValueError(f"name: expected one of {list(starts)}, got {name!r}")
        return EmbeddedVQADataset(self.task, *starts[name])


class LlavaDataModule(_LoaderMixin, L.LightningDataModule):
    """LLaVA conversation JSON over an image folder (see ``arr_coc.training.llava_data``).

    Args:
        train_json: the training conversations.
        image_folder: folder the ``image`` paths are relative to.
        tokenizer: the VLM's tokenizer (a ``transformers`` tokenizer).
        val_json / test_json: separate files; without ``val_json`` the last
            ``val_fraction`` of the training examples is held out (a fixed split).
        image_size: resize images to this (int = square).
        question_types: names for ``question_type`` indices (records may carry
            ``question_types``, as the exporter writes them).
    """

    def __init__(
        self,
        train_json: str | Path,
        image_folder: str | Path,
        tokenizer: Any,
        *,
        val_json: str | Path | None = None,
        test_json: str | Path | None = None,
        val_fraction: float = 0.1,
        image_size: int | tuple[int, int] = 64,
        question_types: Sequence[str] | None = None,
        first_turn_only: bool = False,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        _check_loader_args(batch_size, num_workers)
        if tokenizer is None:
            raise ValueError("tokenizer: required (the VLM's tokenizer)")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction: expected a float in [0, 1), got {val_fraction}")
        self.paths = {"train": train_json, "val": val_json, "test": test_json}
        self.image_folder, self.image_size = image_folder, image_size
        self.first_turn_only, self.val_fraction = first_turn_only, val_fraction
        self.tokenizer = tokenizer
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, int(seed)
        if question_types is None:
            from arr_coc.training.task import QUESTION_TYPES

            question_types = QUESTION_TYPES
        self.question_types = list(question_types)
        self.collate = VQACollator(tokenizer, self.question_types)
        self._splits: dict[str, Dataset] = {}

    def _dataset(self, path: str | Path) -> LlavaDataset:
        return LlavaDataset(path, self.image_folder, image_size=self.image_size, first_turn_only=self.first_turn_only)

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        train = self._dataset(self.paths["train"])
        if self.paths["val"] is not None:
            self._splits = {"train": train, "val": self._dataset(self.paths["val"])}
        else:
            n_val = int(round(len(train) * self.val_fraction))
            n_tr = len(train) - n_val
            self._splits = {"train": Subset(train, range(n_tr)), "val": Subset(train, range(n_tr, len(train)))}
        if self.paths["test"] is not None:
            self._splits["test"] = self._dataset(self.paths["test"])

    def split(self, name: str) -> Dataset:
        self.setup()
        if name not in self._splits:
            raise ValueError(f"name: no {name!r} split (have {list(self._splits)})")
        return self._splits[name]
