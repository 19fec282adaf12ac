"""Host-model-agnostic helpers for plugging an allocator into a VLM's token sequence.

A VLM integration does the same four things whatever the host model:

1. normalise the budget to one integer per example (:func:`normalize_budget`);
2. take the text query from the prompt's own input embeddings - the real (attended),
   non-image tokens, gathered to the left of a ``[B, T, D]`` tensor with a mask
   (:func:`text_query`);
3. replace each image run of placeholder positions by the tokens the allocator kept:
   the ``k`` kept tokens go into the first ``k`` positions of their run, in order, and
   the remaining positions of the run are dropped (:func:`splice_runs`);
4. compact the sequence - drop the pad and dropped positions, keep everything else in
   its original order - and pad the result again on the tokenizer's side
   (:func:`compaction_plan`, :func:`gather_sequence`), then rebuild the attention mask
   and the position ids (:func:`position_ids_from_mask`).

Position ids after compaction are *contiguous*: the real tokens of an example get
``0, 1, ..., n_b - 1`` in their original order and pads get 0. This is the convention of
``transformers``' ``generate`` (``attention_mask.cumsum(-1) - 1``), so the decoding steps
after a shortened prefill continue at ``n_b, n_b + 1, ...``, and with nothing dropped the
sequence, mask and positions are exactly those of the unmodified model. Models with
multi-axis positions (M-RoPE) can gather their own position tensor with the same plan.

Nothing here imports ``transformers``; all functions work on any device and keep
gradients flowing to the spliced tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "CompactionPlan",
    "candidate_index",
    "compaction_plan",
    "gather_sequence",
    "generation_lengths",
    "image_runs",
    "infer_padding_side",
    "normalize_budget",
    "position_ids_from_mask",
    "splice_runs",
    "text_query",
]


def normalize_budget(
    budget: int | Sequence[int] | torch.Tensor, batch_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """An int, a sequence of ints or a ``[B]`` / scalar tensor -> ``[B]`` long tensor.

    Raises ``ValueError`` for negative, fractional, boolean or wrongly sized budgets.
    """
    if isinstance(budget, bool):
        raise ValueError(f"budget: expected an int or {batch_size} ints, got {budget!r}")
    if isinstance(budget, int):
        out = torch.full((batch_size,), budget, dtype=torch.long, device=device)
    else:
        if isinstance(budget, torch.Tensor):
            t = budget.detach()
        else:
            try:
                t = torch.as_tensor(list(budget))
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"budget: expected an int or {batch_size} ints, got {budget!r}") from err
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"budget: expected integer values, got dtype {t.dtype}")
        if t.dim() == 0:
            t = t.expand(batch_size)
        if t.shape != (batch_size,):
            raise ValueError(
                f"budget: expected an int or a [B={batch_size}] tensor (one per prompt), got shape {tuple(t.shape)}"
            )
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError(f"budget: expected integer values, got {t.tolist()}")
        out = t.to(device=device, dtype=torch.long)
    if (out < 0).any():
        raise ValueError(f"budget: expected values >= 0, got {out.tolist()}")
    return out


def infer_padding_side(attention_mask: torch.Tensor) -> str:
    """``"right"`` when some row has a pad after its last real token, else ``"left"``.

    attention_mask: [B, L] (0 = pad). A batch without padding counts as left-padded,
    which is what decoder-only generation expects.
    """
    m = attention_mask.bool()
    if m.shape[1] == 0:
        return "left"
    # a row is right-padded when it ends with a pad but has a real token before it
    ends_with_pad = ~m[:, -1]
    return "right" if bool((ends_with_pad & m.any(dim=1)).any()) else "left"


@dataclass
class CompactionPlan:
    """Where each slot of the compacted sequence comes from.

    source: [B, L'] long, position in the original sequence (0 at pad slots).
    valid:  [B, L'] bool, which slots hold a kept token (False = pad).
    """

    source: torch.Tensor
    valid: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """[B] number of kept tokens per example."""
        return self.valid.sum(dim=1)


def compaction_plan(keep: torch.Tensor, *, padding_side: str = "left") -> CompactionPlan:
    """Plan to drop the positions where ``keep`` is False, keeping the order of the rest.

    keep: [B, L] bool. The result has ``L' = max_b keep[b].sum()`` slots, the kept tokens
    of each row packed to the right (``padding_side="left"``) or to the left (``"right"``).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
    if keep.dim() != 2:
        raise ValueError(f"keep: expected a [B, L] bool tensor, got shape {tuple(keep.shape)}")
    keep = keep.bool()
    b, seq = keep.shape
    counts = keep.sum(dim=1)  # [B]
    new_len = int(counts.max().item()) if b else 0
    # kept positions first, in their original order (stable sort on "is dropped")
    order = (~keep).to(torch.int8).argsort(dim=1, stable=True)[:, :new_len]  # [B, L']
    slots = torch.arange(new_len, device=keep.device)[None, :]  # [1, L']
    if padding_side == "left":
        shift = (new_len - counts)[:, None]  # pads in front
        rank = slots - shift
        valid = rank >= 0
    else:
        rank = slots.expand(b, -1)
        valid = rank < counts[:, None]
    source = order.gather(1, rank.clamp(min=0, max=max(new_len - 1, 0))) if new_len else order
    source = torch.where(valid, source, torch.zeros_like(source))
    return CompactionPlan(source=source, valid=valid)


def gather_sequence(x: torch.Tensor, plan: CompactionPlan, fill: float | int | torch.Tensor = 0) -> torch.Tensor:
    """Apply a :class:`CompactionPlan` to ``x`` of shape [B, L] or [B, L, ...] -> [B, L', ...].

    Pad slots get ``fill`` (a scalar, or a tensor broadcastable to one slot ``x[0, 0]``).
    Differentiable with respect to ``x``.
    """
    src = plan.source
    extra = x.shape[2:]
    idx = src.reshape(*src.shape, *(1,) * len(extra)).expand(*src.shape, *extra)
    out = x.gather(1, idx)
    valid = plan.valid.reshape(*plan.valid.shape, *(1,) * len(extra))
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    return torch.where(valid, out, fill_t)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Contiguous positions of the real tokens: [B, L] mask -> [B, L] long, pads at 0.

    Same rule as ``transformers`` generation (``cumsum - 1``, pads filled with 0).
    """
    m = attention_mask.long()
    pos = m.cumsum(dim=-1) - 1
    return pos.masked_fill(m == 0, 0)


def text_query(
    embeds: torch.Tensor, text_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The query an allocator sees: the prompt's own text-token embeddings.

    embeds:    [B, L, D] input embeddings of the prompt.
    text_mask: [B, L] bool, True at real (attended) non-image tokens.
    Returns ``query`` [B, T, D] (the text tokens in order, packed to the left) and
    ``query_mask`` [B, T] bool, with ``T = max_b text_mask[b].sum()`` (at least 1, so a
    prompt without text gives a single masked-out slot).
    """
    plan = compaction_plan(text_mask, padding_side="right")
    if plan.valid.shape[1] == 0:
        b, _, d = embeds.shape
        return embeds.new_zeros(b, 1, d), torch.zeros(b, 1, dtype=torch.bool, device=embeds.device)
    return gather_sequence(embeds, plan), plan.valid


def image_runs(image_mask: torch.Tensor, tokens_per_image: int, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the placeholder positions into one run of ``tokens_per_image`` per image.

    image_mask: [B, L] bool, True at image placeholder tokens. Images are taken in
    reading order (example by example, left to right), which is how ``pixel_values`` is
    ordered by LLaVA-style processors; consecutive images may touch.
    Returns ``positions`` [I, n] long (sequence positions of each image's placeholders)
    and ``rows`` [I] long (the example each image belongs to).
    Raises ``ValueError`` when an example's placeholder count is not a multiple of
    ``tokens_per_image`` or the number of runs differs from ``num_images``.
    """
    if tokens_per_image <= 0:
        raise ValueError(f"tokens_per_image: expected > 0, got {tokens_per_image}")
    per_row = image_mask.sum(dim=1)  # [B]
    bad = (per_row % tokens_per_image) != 0
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"input_ids: example {row} has {int(per_row[row])} image placeholder tokens, "
            f"not a multiple of the {tokens_per_image} features per image"
        )
    runs = int(per_row.sum().item()) // tokens_per_image
    if runs != num_images:
        raise ValueError(
            f"pixel_values: got {num_images} image(s) but input_ids hold {runs} image placeholder run(s) "
            f"of {tokens_per_image} tokens (per example: {(per_row // tokens_per_image).tolist()})"
        )
    nz = image_mask.nonzero()  # [I * n, 2], row-major = reading order
    nz = nz.reshape(num_images, tokens_per_image, 2)
    return nz[..., 1], nz[:, 0, 0]


def splice_runs(
    embeds: torch.Tensor,
    keep: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    tokens: torch.Tensor,
    token_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write each run's kept tokens into the first positions of the run; drop the rest.

    embeds:     [B, L, D] sequence embeddings (the run positions hold placeholders).
    keep:       [B, L] bool, positions kept so far (e.g. the attention mask).
    positions:  [I, n] long sequence positions of each run (-1 = no position).
    rows:       [I] long example of each run.
    tokens:     [I, k, D] replacement tokens; token_mask [I, k] bool marks the real ones
                (any pattern; their order is kept).
    Returns ``(embeds, keep)``: the run's first ``c_i = token_mask[i].sum()`` positions hold
    the real tokens in order and stay kept, its other positions are marked dropped.
    Raises ``ValueError`` when a run has more real tokens than positions.
    """
    num, n = positions.shape
    if num == 0:
        return embeds, keep
    if tokens.shape[:2] != token_mask.shape or tokens.shape[0] != num:
        raise ValueError(
            f"tokens: expected [I={num}, k, D] with token_mask [I, k], got {tuple(tokens.shape)} "
            f"and {tuple(token_mask.shape)}"
        )
    token_mask = token_mask.bool()
    counts = token_mask.sum(dim=1)  # [I]
    run_len = (positions >= 0).sum(dim=1)
    if (counts > run_len).any():
        raise ValueError(
            f"tokens: a run holds more kept tokens ({counts.tolist()}) than placeholder positions ({run_len.tolist()})"
        )
    # real tokens first, order kept; then pad / truncate the slot axis to the run length n
    order = (~token_mask).to(torch.int8).argsort(dim=1, stable=True)
    tokens = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))
    k = tokens.shape[1]
    if k < n:
        tokens = torch.cat([tokens, tokens.new_zeros(num, n - k, tokens.shape[-1])], dim=1)
    tokens = tokens[:, :n]
    slot = torch.arange(n, device=positions.device)[None, :]
    filled = (slot < counts[:, None]) & (positions >= 0)  # [I, n]
    r = rows[:, None].expand(-1, n)[filled]
    p = positions[filled]
    embeds = embeds.index_put((r, p), tokens[filled].to(embeds.dtype))
    dropped = (slot >= counts[:, None]) & (positions >= 0)
    keep = keep.clone()
    keep[rows[:, None].expand(-1, n)[dropped], positions[dropped]] = False
    keep[r, p] = True
    return embeds, keep


#: ``transformers``' model-agnostic default of ``max_length`` (new tokens when nothing is set)
_DEFAULT_MAX_LENGTH = 20


def generation_lengths(model: Any, generation_kwargs: dict[str, Any], prompt_length: int) -> dict[str, Any]:
    """Turn the prompt-counting lengths of a ``generate`` call into new-token counts.

    ``model.generate`` counts ``max_length`` / ``min_length`` from the prompt it is handed;
    a plug-in hands it a *shortened* prompt, so the same numbers would buy more new tokens.
    This returns a copy of ``generation_kwargs`` in which every length refers to the
    caller's prompt of ``prompt_length`` tokens, as it would for the unwrapped model:

    - ``max_new_tokens`` set (keyword, ``generation_config=`` or the model's config): kept;
    - else ``max_length`` (keyword or ``generation_config=``): ``max_new_tokens =
      max_length - prompt_length`` (``ValueError`` when that is < 1, as ``generate`` raises);
    - else the default: ``generation_config.max_length`` (20 when unset) *new* tokens, capped
      at ``config.max_position_embeddings`` total, the rule of ``transformers`` 5;
    - ``min_length`` likewise becomes ``min_new_tokens = max(min_length - prompt_length, 0)``
      unless ``min_new_tokens`` is set.
    """
    kw = dict(generation_kwargs)
    given = kw.get("generation_config")
    base = given if given is not None else getattr(model, "generation_config", None)

    def setting(name: str) -> Any:
        if kw.get(name) is not None:
            return kw[name]
        return getattr(base, name, None) if base is not None else None

    max_length = kw.pop("max_length", None)
    min_length = kw.pop("min_length", None)
    if max_length is None and given is not None:
        max_length = getattr(given, "max_length", None)
    if min_length is None and given is not None:
        min_length = getattr(given, "min_length", None)
    if given is not None and (getattr(given, "max_length", None) is not None or getattr(given, "min_length", None)):
        given = copy.deepcopy(given)  # the lengths now travel as *_new_tokens; avoid "both set" warnings
        given.max_length = None
        given.min_length = 0
        kw["generation_config"] = given
    if setting("max_new_tokens") is None:
        if max_length is None:
            default = getattr(base, "max_length", None) if base is not None else None
            max_length = int(default or _DEFAULT_MAX_LENGTH) + prompt_length
            cap = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            if isinstance(cap, int):
                max_length = min(max_length, cap)
        max_length = int(max_length)
        if max_length <= prompt_length:
            raise ValueError(
                f"max_length: the prompt (input_ids) has {prompt_length} tokens but max_length is {max_length}; "
                "increase max_length or set max_new_tokens"
            )
        kw["max_new_tokens"] = max_length - prompt_length
    if setting("min_new_tokens") is None and min_length:
        kw["min_new_tokens"] = max(int(min_length) - prompt_length, 0)
    return kw


def candidate_index(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Index in the candidate pyramid (fine grid, then levels 1, 2, ...) of positions [K, 3].

    Matches :func:`arr_coc.pyramid.pyramid_positions` for levels ``1..max(level)``.
    """
    h, w = grid
    row, col, lvl = pos.unbind(-1)
    out = torch.empty_like(row)
    offset = 0
    for level in range(int(lvl.max().item()) + 1 if pos.numel() else 0):
        f = 2**level
        hc, wc = -(-h // f), -(-w // f)
        sel = lvl == level
        out[sel] = offset + (row[sel] // f) * wc + col[sel] // f
        offset += hc * wc
    return out
