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

__all__ = [
    "PAD",
    "READ",
    "SPECIAL_TOKENS",
    "UNK",
    "build_tokenizer",
    "build_word_tokenizer",
    "load_pretrained_tokenizer",
    "load_tokenizer",
    "readout_id",
]

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


def load_pretrained_tokenizer(name_or_path: str | Path, **kwargs):
    """A real LLM's tokenizer (``AutoTokenizer.from_pretrained``: a local folder, a GGUF file
    via ``gguf_file=``, or a Hub name) made ready for batching: a tokenizer without a pad
    token pads with its end-of-sequence token, as is usual for causal LMs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"name_or_path: the tokenizer of {name_or_path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def readout_id(tok: PreTrainedTokenizerFast) -> int:
    """Id of the readout token: ``[READ]`` in our word-level tokenizers; a real LLM's
    tokenizer has none, so its end-of-sequence token takes the readout slot."""
    rid = tok.convert_tokens_to_ids(READ)
    if rid is None or (tok.unk_token_id is not None and rid == tok.unk_token_id):
        if tok.eos_token_id is None:
            raise ValueError("tok: no [READ] token and no eos token to read the answer at")
        return int(tok.eos_token_id)
    return int(rid)
