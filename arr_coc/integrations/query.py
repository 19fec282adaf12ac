"""Which prompt tokens are the query: the user's question only, found from the chat template.

A VLM prompt is mostly template: a system prompt, role headers, image placeholders and the
generation prompt around the few tokens of the question. A query-aware allocator should
score the image against the question, so the plug-ins take, by default, the tokens of the
user's **last question** only. :class:`QuestionFinder` learns the template once, from the
processor's (or tokenizer's) ``chat_template``, and then marks the question in any batch of
``input_ids`` the processor produced, image placeholders already expanded:

```python
finder = QuestionFinder.from_processor(processor)          # or .from_chat_template(tokenizer, ...)
mask = finder(input_ids, attention_mask)                   # [B, L] bool, True at the question's tokens
vlm = llava.wrap(model, "arr_coc", budget=64, processor=processor)   # uses a finder by default
vlm(**inputs, query_mask=my_mask)                          # or an explicit [B, L] mask per call
```

How the template is learned (all offline, no model needed): the template is rendered
with sentinel user texts and tokenized with the tokenizer's offsets, which gives, as
token ids in context,

- ``closer``: what follows the user's text up to the end of the generation prompt
  (``<|im_end|>\\n<|im_start|>assistant\\n`` for Qwen, `` ASSISTANT:`` for LLaVA-1.5);
  without a generation prompt, ``turn_end`` (what ends a user turn);
- ``header``: what opens a user turn (the longest common tail of the text before the first
  user text and of the text between an assistant reply and the next user text:
  ``<|im_start|>user\\n``, ``USER:``);
- ``image_prefix`` / ``image_suffix``: the template text around an image placeholder inside
  the user turn (``<|vision_start|>`` / ``<|vision_end|>``, ``\\n`` after LLaVA's ``<image>``).

In a row of ``input_ids`` the question is then the tokens after the last ``header`` and
before the last ``closer`` (or ``turn_end``), minus the image runs with their prefix and
suffix and minus special tokens. A row in which the closer is not found raises
``ValueError`` (pass ``query_mask=`` or ``query="prompt"`` then); a user turn without text
gives an empty question (allocators then fall back to their query-agnostic rule).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["QuestionFinder", "resolve_query_mask", "resolve_query_mode"]

_SENTINELS = ("zqxjkwvb", "vbkwjxqz", "qjzxvkbw")


def _find_last(row: list[int], pattern: Sequence[int], end: int | None = None) -> int:
    """Start of the last occurrence of ``pattern`` in ``row[:end]``, or -1."""
    n = len(pattern)
    stop = len(row) if end is None else end
    if n == 0:
        return -1
    first = pattern[0]
    for i in range(stop - n, -1, -1):
        if row[i] == first and row[i : i + n] == list(pattern):
            return i
    return -1


_SPACE_CHARS = set(" \t\n\r\u2581\u0120\u010a\u0109\u010d")  # plain, SentencePiece and byte-level spellings
_BYTE_SPACES = {"<0x20>", "<0x0A>", "<0x09>", "<0x0D>"}


def _whitespace_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokens that stand for whitespace only."""
    vocab = tokenizer.get_vocab()
    out = set()
    for token, i in vocab.items():
        if token in _BYTE_SPACES or (token and set(token) <= _SPACE_CHARS):
            out.add(int(i))
    return out


@dataclass(frozen=True)
class QuestionFinder:
    """Marks the user's last question in token ids (see the module docstring).

    headers:      id sequences that open a user turn (the first turn's and a later one's;
                  none: the row's start).
    closer:       ids between the user's text and the end of the generation prompt.
    turn_end:     ids that end a user turn (used when ``closer`` is absent).
    image_token_id: the image placeholder id (a run of it is one image).
    image_prefix / image_suffix: template ids just before / after an image run.
    skip_ids:     ids never part of a question (special tokens of the tokenizer).
    space_ids:    whitespace-only tokens, trimmed from the edges of the question (a
                  sentinel and a real question tokenize their surrounding spaces differently).
    """

    headers: tuple[tuple[int, ...], ...]
    closer: tuple[int, ...]
    turn_end: tuple[int, ...]
    image_token_id: int
    image_prefix: tuple[int, ...] = ()
    image_suffix: tuple[int, ...] = ()
    skip_ids: frozenset[int] = frozenset()
    space_ids: frozenset[int] = frozenset()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_processor(cls, processor: Any, chat_template: str | None = None) -> QuestionFinder:
        """From a ``transformers`` processor (its tokenizer, chat template and image token)."""
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            return cls.from_chat_template(processor, chat_template)
        template = chat_template or getattr(processor, "chat_template", None)
        image_token = getattr(processor, "image_token", None)
        return cls.from_chat_template(tokenizer, template, image_token=image_token)

    @classmethod
    def from_chat_template(
        cls, tokenizer: Any, chat_template: str | None = None, *, image_token: str | None = None
    ) -> QuestionFinder:
        """Learn the template of ``tokenizer`` (a fast tokenizer; offsets are needed).

        chat_template: the Jinja template (default: the tokenizer's own).
        image_token:   the placeholder string the template writes for an image (default:
                       ``tokenizer.image_token``, else ``"<image>"``).
        """
        template = chat_template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise ValueError("chat_template: the tokenizer / processor has no chat template; pass chat_template=")
        image_token = image_token or getattr(tokenizer, "image_token", None) or "<image>"
        image_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_id is None or image_id == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"image_token: {image_token!r} is not a token of the tokenizer")
        s1, s2, _ = _SENTINELS

        def render(messages: list[dict], generation: bool) -> str:
            return tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=generation
            )

        def encode(text: str) -> tuple[list[int], list[tuple[int, int]]]:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

        def split(text: str, sentinel: str) -> tuple[list[int], list[int], list[int]]:
            """Token ids before, of, and after the sentinel's characters (in context)."""
            a = text.rfind(sentinel)
            if a < 0:
                raise ValueError("chat_template: the rendered template does not contain the user's text")
            b = a + len(sentinel)
            ids, offs = encode(text)
            pre = [i for i, (s, e) in zip(ids, offs) if e <= a and not (s == e and s == a)]
            post = [i for i, (s, e) in zip(ids, offs) if s >= b]
            mid = [i for i, (s, e) in zip(ids, offs) if s < b and e > a]
            if len(pre) + len(post) + len(mid) != len(ids):
                raise ValueError("chat_template: cannot align the tokenizer's offsets with the user's text")
            return pre, mid, post

        def between(text: str, a: int, b: int) -> list[int]:
            """Token ids lying entirely in text[a:b]."""
            ids, offs = encode(text)
            return [i for i, (s, e) in zip(ids, offs) if s >= a and e <= b and e > s]

        def user(text: str, image: bool) -> dict:
            content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
            return {"role": "user", "content": content}

        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special |= {int(i) for i, tok in decoder.items() if getattr(tok, "special", False)}
        special.add(int(image_id))
        space = _whitespace_ids(tokenizer)

        def from_last_special(ids: list[int]) -> list[int]:
            marks = [j for j, i in enumerate(ids) if i in special]
            return ids[marks[-1] :] if marks else ids

        def strip(ids: list[int], *, left: bool = False, right: bool = False) -> tuple[int, ...]:
            ids = list(ids)
            while right and ids and ids[-1] in space:
                ids.pop()
            while left and ids and ids[0] in space:
                ids.pop(0)
            return tuple(ids)

        s3 = _SENTINELS[2]
        with_image = render([user(s1, True)], True)
        pre_img, _, closer = split(with_image, s1)
        _, _, turn_end = split(render([user(s1, True)], False), s1)
        pre_text, _, _ = split(render([user(s1, False)], True), s1)
        headers = [strip(from_last_special(pre_text), right=True)]
        reply = {"role": "assistant", "content": [{"type": "text", "text": s2}]}
        try:
            two_turns = render([user(s1, False), reply, user(s3, False)], True)
        except Exception:  # a template that renders no assistant turn
            two_turns = ""
        if s2 in two_turns and s3 in two_turns:
            later = between(two_turns, two_turns.rfind(s2) + len(s2), two_turns.rfind(s3))
            headers.append(strip(from_last_special(later), right=True))
        system = {"role": "system", "content": [{"type": "text", "text": s2}]}
        try:
            after_system = render([system, user(s3, False)], True)
        except Exception:  # a template without system messages
            after_system = ""
        if s2 in after_system and s3 in after_system:
            first = between(after_system, after_system.rfind(s2) + len(s2), after_system.rfind(s3))
            headers.append(strip(from_last_special(first), right=True))
        headers = tuple(dict.fromkeys(h for h in headers if h))
        # image prefix / suffix: the template around the image inside the user turn
        turn = list(pre_img)
        for h in headers:
            at = _find_last(pre_img, h)
            if at >= 0:
                turn = pre_img[at + len(h) :]
                break
        if image_id not in turn:
            raise ValueError(f"chat_template: an image content item does not render to {image_token!r}")
        k = turn.index(image_id)
        return cls(
            headers=headers,
            closer=strip(closer, left=True),
            turn_end=strip(turn_end, left=True),
            image_token_id=int(image_id),
            image_prefix=strip(turn[:k], left=True),
            image_suffix=strip(turn[k + 1 :], right=True),
            skip_ids=frozenset(special),
            space_ids=frozenset(space),
        )

    # ------------------------------------------------------------------ use
    def row_span(self, row: list[int]) -> tuple[int, int]:
        """(start, end) of the last user turn's content in one unpadded row; ValueError if absent."""
        def last_header(end: int) -> int:
            start = 0
            for h in self.headers:
                at = _find_last(row, h, end)
                if at >= 0:
                    start = max(start, at + len(h))
            return start

        end = _find_last(row, self.closer)
        if end >= 0:
            return last_header(end), end
        # no generation prompt: the last user turn, up to its end marker
        start = last_header(len(row))
        if not self.turn_end:  # the template marks no end of a user turn: it runs to the end
            return start, len(row)
        n = len(self.turn_end)
        for end in range(start, len(row) - n + 1):
            if row[end : end + n] == list(self.turn_end):
                return start, end
        raise ValueError("the end of the user's turn of the chat template was not found")

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] ids (and mask, 0 = pad) -> [B, L] bool, True at the question's tokens."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a [B, L] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = torch.zeros(input_ids.shape, dtype=torch.bool)
        ids_all = input_ids.tolist()
        real_all = attention_mask.bool().tolist()
        for b, (ids, real) in enumerate(zip(ids_all, real_all)):
            cols = [j for j, r in enumerate(real) if r]
            row = [ids[j] for j in cols]
            try:
                start, end = self.row_span(row)
            except ValueError as err:
                raise ValueError(
                    f"input_ids: example {b}: {err}; pass query_mask= explicitly or query='prompt'"
                ) from None
            keep = [start <= j < end for j in range(len(row))]
            # image runs, with the template text right around them
            j = start
            while j < end:
                if row[j] != self.image_token_id:
                    j += 1
                    continue
                r = j
                while r < end and row[r] == self.image_token_id:
                    r += 1
                for t in range(j, r):
                    keep[t] = False
                p = len(self.image_prefix)
                if p and j - p >= start and row[j - p : j] == list(self.image_prefix):
                    for t in range(j - p, j):
                        keep[t] = False
                s = len(self.image_suffix)
                if s and r + s <= end and row[r : r + s] == list(self.image_suffix):
                    for t in range(r, r + s):
                        keep[t] = False
                j = r
            for t in range(start, end):
                keep[t] = keep[t] and row[t] not in self.skip_ids
            # trim whitespace-only tokens at the edges of every kept stretch
            for t in range(start, end):
                if keep[t] and row[t] in self.space_ids and (t == start or not keep[t - 1]):
                    u = t
                    while u < end and keep[u] and row[u] in self.space_ids:
                        keep[u] = False
                        u += 1
            for t in range(end - 1, start - 1, -1):
                if keep[t] and row[t] in self.space_ids and (t == end - 1 or not keep[t + 1]):
                    u = t
                    while u >= start and keep[u] and row[u] in self.space_ids:
                        keep[u] = False
                        u -= 1
            for t in range(start, end):
                if keep[t]:
                    out[b, cols[t]] = True
        return out.to(input_ids.device)


def resolve_query_mask(
    mode: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    text_mask: torch.Tensor,
    explicit: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, L] bool: the prompt tokens that form the query.

    mode:      "prompt" (every real non-image token: ``text_mask``), "question" is not
               accepted here (the plug-in turns it into a :class:`QuestionFinder`), a
               :class:`QuestionFinder`, or a callable ``(input_ids, attention_mask) -> [B, L] bool``.
    explicit:  a per-call ``query_mask`` [B, L] bool over ``input_ids``; wins over ``mode``.
    The result is restricted to ``text_mask`` (an image placeholder or pad is never a query token).
    """
    if explicit is not None:
        mask = explicit
        name = "query_mask"
    elif isinstance(mode, str):
        if mode != "prompt":
            raise ValueError(f"query: expected 'question', 'prompt', a QuestionFinder or a callable, got {mode!r}")
        return text_mask
    elif callable(mode):
        mask = mode(input_ids, attention_mask)
        name = "query (callable)"
    else:
        raise ValueError(f"query: expected 'question', 'prompt', a QuestionFinder or a callable, got {mode!r}")
    if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
        raise ValueError(
            f"{name}: expected a [B, L] = {tuple(input_ids.shape)} bool tensor over input_ids, "
            f"got {getattr(mask, 'shape', type(mask))}"
        )
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or not torch.isin(mask, torch.tensor([0, 1], device=mask.device)).all():
            raise ValueError(f"{name}: expected a bool (or 0/1) tensor, got dtype {mask.dtype}")
        mask = mask.bool()
    return mask.to(text_mask.device) & text_mask


def resolve_query_mode(query: Any, processor: Any) -> Any:
    """The ``query=`` option of a plug-in -> "prompt", a :class:`QuestionFinder` or a callable.

    ``None`` (default): the question, from ``processor``'s chat template; without a
    processor every real non-image prompt token ("prompt"), with a ``UserWarning``.
    ``"question"``: needs ``processor`` (a processor or a tokenizer with a chat template).
    """
    if query is None:
        if processor is None:
            warnings.warn(
                "query: no processor= given, so the query is every text token of the prompt (system prompt and "
                "chat template included); pass processor= for the user's question only, or query='prompt' to "
                "silence this",
                UserWarning,
                stacklevel=3,
            )
            return "prompt"
        query = "question"
    if isinstance(query, str):
        if query == "prompt":
            return "prompt"
        if query != "question":
            raise ValueError(f"query: expected 'question', 'prompt', a QuestionFinder or a callable, got {query!r}")
        if processor is None:
            raise ValueError("query: 'question' needs processor= (the processor or tokenizer with the chat template)")
        return QuestionFinder.from_processor(processor)
    if callable(query):
        return query
    raise ValueError(f"query: expected 'question', 'prompt', a QuestionFinder or a callable, got {query!r}")
