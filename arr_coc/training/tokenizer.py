"""A word-level tokenizer for the embedded task, built offline with the ``tokenizers`` library.

```python
tok = build_tokenizer(task)                   # transformers.PreTrainedTokenizerFast
enc = tok(["what shape is the red object ?"], padding=True, return_tensors="pt")
enc["input_ids"], enc["attention_mask"]       # [B, T] long, [B, T] (1 = real token)
tok.readout_token_id                          # the [READ] token (see BaseVLM)
tok.save_pretrained(folder); load_tokenizer(folder)
```

Special tokens: ``[PAD]`` (id 0), ``[UNK]`` (id 1), ``[READ]`` (id 2, the readout slot after
the question), then the task's words in sorted order, so the ids are a function of the
task's vocabulary alone. Splitting is on whitespace (the task writes "?" as its own word).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

__all__ = ["PAD", "READ", "SPECIAL_TOKENS", "UNK", "build_tokenizer", "build_word_tokenizer", "load_tokenizer"]

PAD, UNK, READ = "[PAD]", "[UNK]", "[READ]"
SPECIAL_TOKENS = (PAD, UNK, READ)


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` (plus the special tokens), ids in sorted order."""
    words = sorted(set(words) - set(SPECIAL_TOKENS))
    if not words:
        raise ValueError("words: expected at least one word")
    bad = [w for w in words if not w or any(ch.isspace() for ch in w)]
    if bad:
        raise ValueError(f"words: expected non-empty words without whitespace, got {bad[:3]}")
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab[w] = len(vocab)
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[READ],
        padding_side="right",
    )
    return tok


def build_tokenizer(task) -> PreTrainedTokenizerFast:
    """The tokenizer of a task (anything with ``vocabulary() -> list[str]``)."""
    return build_word_tokenizer(list(task.vocabulary()))


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer written by ``save_pretrained`` (offline, local folder)."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"folder: expected a tokenizer.json in {folder}")
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def readout_id(tok: PreTrainedTokenizerFast) -> int:
    """Id of the readout token."""
    return int(tok.convert_tokens_to_ids(READ))
