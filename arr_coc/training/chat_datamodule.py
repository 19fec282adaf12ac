"""LLaVA conversation data for a transformers host: whole conversations through its processor.

```python
dm = LlavaChatDataModule("train.json", "images/", processor, image_size=336, batch_size=8)
batch = next(iter(dm.train_dataloader()))   # what LlavaHost / QwenVLHost read (see hosts.py)
```

The splits, the seeded training order and the loaders are those of
:class:`~arr_coc.training.datamodule.LlavaDataModule`; the items are whole conversations
(:class:`~arr_coc.training.llava_data.LlavaConversationDataset`) and the batches come from
:class:`~arr_coc.training.llava_data.ChatCollator`. :func:`llava_data_module` is the one
entry of ``conf/data/llava.yaml``: with a processor it builds this module (a real host),
without one the embedded base VLM's :class:`LlavaDataModule`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from arr_coc.training.datamodule import LlavaDataModule
from arr_coc.training.llava_data import ChatCollator, LlavaConversationDataset

__all__ = ["LlavaChatDataModule", "llava_data_module", "load_processor"]


def load_processor(processor: Any) -> Any:
    """A transformers processor: given, or loaded from a folder / Hub id (``AutoProcessor``)."""
    if isinstance(processor, (str, Path)):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(processor))
    return processor


class LlavaChatDataModule(LlavaDataModule):
    """Whole LLaVA conversations over an image folder, batched by the host's processor.

    Args:
        train_json, image_folder, val_json, test_json, val_fraction, batch_size,
            num_workers, seed: as :class:`~arr_coc.training.datamodule.LlavaDataModule`
            (the held-out fraction counts records, i.e. conversations).
        processor: the host's transformers processor, or the folder / Hub id to load it from.
        image_size: resize every image to this before the processor (one grid per batch).
        max_length: drop tokens beyond this length (:class:`ChatCollator`).
        chat_template: a Jinja template instead of the processor's own.
    """

    def __init__(
        self,
        train_json: str | Path,
        image_folder: str | Path,
        processor: Any,
        *,
        val_json: str | Path | None = None,
        test_json: str | Path | None = None,
        val_fraction: float = 0.1,
        image_size: int | tuple[int, int] = 336,
        max_length: int | None = None,
        chat_template: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ):
        processor = load_processor(processor)
        super().__init__(
            train_json,
            image_folder,
            getattr(processor, "tokenizer", None),
            val_json=val_json,
            test_json=test_json,
            val_fraction=val_fraction,
            image_size=image_size,
            question_types=[],
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        self.processor = processor
        self.collate = ChatCollator(processor, max_length=max_length, chat_template=chat_template)

    def _dataset(self, path: str | Path) -> LlavaConversationDataset:
        return LlavaConversationDataset(path, self.image_folder, image_size=self.image_size)


def llava_data_module(*, processor: Any = None, tokenizer: Any = None, max_length: int | None = None,
                      chat_template: str | None = None, **kwargs: Any):
    """``LlavaChatDataModule`` when a ``processor`` is given (a real host), else the embedded
    base VLM's ``LlavaDataModule`` with ``tokenizer`` (one example per turn, one-word answers)."""
    if processor is None:
        if max_length is not None or chat_template is not None:
            raise ValueError("max_length/chat_template: only apply with a processor (a transformers host)")
        return LlavaDataModule(tokenizer=tokenizer, **kwargs)
    if kwargs.pop("first_turn_only", False) or kwargs.pop("question_types", None) is not None:
        raise ValueError("first_turn_only/question_types: options of the one-word reader; a processor reads whole conversations")
    return LlavaChatDataModule(processor=processor, max_length=max_length, chat_template=chat_template, **kwargs)
