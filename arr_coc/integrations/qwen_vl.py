"""Plug-in for the Qwen-VL family: any allocator between the vision tower and the language model.

``wrap(model, allocator, budget=...)`` takes a ``transformers``
``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` or
``Qwen3VLForConditionalGeneration`` (or a subclass) and returns a :class:`QwenVLAllocation`
whose ``forward(**inputs)`` and ``generate(**inputs, **generation_kwargs)`` take the
processor's output (``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``,
optionally ``mm_token_type_ids``) and feed the language model a shortened sequence.
``unwrap()`` hands the model back; the model is never modified (no patching, no hooks, no
state written: ``model.model.rope_deltas`` stays what it was).

What happens, per batch (all through public methods of the model):

1. ``model.get_image_features`` runs the vision tower; its output is one tensor per image
   of *merged* tokens (the 2x2 patch merger: ``t * (h / m) * (w / m)`` tokens for a
   ``(t, h, w)`` patch grid and merge size ``m``), in raster order of the merged grid, plus,
   for Qwen3-VL, the DeepStack features of intermediate vision layers (same layout).
2. ``model.model.get_rope_index`` computes the 3-D M-RoPE position ids ``[3, B, L]`` of the
   *full* sequence exactly as ``transformers`` would: text ``(p, p, p)``, an image's merged
   token at grid cell ``(r, c)`` gets ``(s, s + r, s + c)`` where ``s`` is the position after
   the preceding text, and the text after an image continues at ``s + max(h/m, w/m)``.
3. The allocator runs on each image's merged tokens on its merged grid ``(h/m, w/m)`` with
   zero prefix tokens and the input embeddings of the user's question as the query (with
   ``processor=``: the tokens the chat template leaves for the user's last question,
   :class:`~arr_coc.integrations.query.QuestionFinder`; ``query=`` / ``query_mask=``
   choose otherwise, see :func:`wrap`). The allocator contract is batched
   over examples of one grid, so images are **grouped by merged grid** (images of different
   sizes run in separate allocator calls, images of the same size share one); each image has
   its own budget.
4. Each image's placeholder run is replaced by its kept tokens (raster order) and the
   sequence is compacted and re-padded (:func:`~arr_coc.integrations._common.compaction_plan`).
   Every token keeps the M-RoPE position transformers gave it: a kept image token the
   position of its grid cell (a pooled pyramid token that of its region's top-left cell),
   every text token its original position, so the text after an image still starts at
   ``s + max(h/m, w/m)``. With the ``full`` allocator the language model therefore sees
   exactly what the unmodified model feeds it. The explicit ``position_ids`` are passed to
   the language model; ``rope_deltas`` of the shortened sequence (``max position + 1 - L'``)
   are reported.
5. Qwen3-VL DeepStack: the features injected into the first language layers at the visual
   positions are selected with the same indices (area-averaged over the region for a pooled
   token; merging allocators get the features of each merged token's representative).

Generation: ``generate`` runs ``model.generate`` on the shortened ``inputs_embeds`` with
explicit 4-row position ids (the text row ``attention_mask.cumsum - 1`` that transformers
uses for the mask, then the three M-RoPE rows), the layout ``model.generate`` itself builds;
``generate`` advances every row by one per new token, so decoding continues at
``max prompt position + 1`` (what ``rope_deltas`` encodes in transformers), and the KV cache
holds the shortened sequence. For Qwen3-VL the prompt minus its last token is prefilled by
the language model with the DeepStack features (``model.forward`` cannot take them with
``inputs_embeds``), and ``model.generate`` continues from that cache; this path needs the
prompt to end with a text token and supports neither beam search nor several sequences per
prompt. The returned ids are ``input_ids`` followed by the new tokens, as ``model.generate``.

In-LLM allocators (``allocator.in_llm``: ``fastv``, ``sparsevlm``): every visual token enters
the language model and the allocator prunes between decoder layers
(:mod:`arr_coc.integrations._llm`, forward pre-hooks for the call only), in ``forward``
and (Qwen2-VL, Qwen2.5-VL) ``generate``, batched; survivors keep their M-RoPE positions.
The budgets of a prompt's images are summed into the prompt's budget. Qwen3-VL: pruning
must come after the last DeepStack layer, and ``generate`` raises ``NotImplementedError``.
``last_in_llm`` holds the run (``.trace``, ``.final``).

Not supported (clear ``ValueError``): videos, ``inputs_embeds`` instead of ``input_ids``,
images with ``t != 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from arr_coc.allocators.base import AllocationOutput, Allocator
from arr_coc.allocators.registry import create_allocator
from arr_coc.integrations._common import (
    candidate_index as _candidate_index,
    compaction_plan,
    gather_sequence,
    generation_lengths,
    infer_padding_side,
    text_query,
)
from arr_coc.integrations._llm import InLLMPruning
from arr_coc.integrations.query import resolve_query_mask, resolve_query_mode
from arr_coc.integrations.signals import LLMLayer, PluginSignals, check_relevance, llm_layer_states, run_allocator

__all__ = ["SUPPORTED_MODELS", "QwenVLAllocation", "QwenVLOutput", "QwenVLPrepared", "normalize_image_budget", "wrap"]

#: transformers class name -> family tag. Subclasses of these are accepted too.
SUPPORTED_MODELS: dict[str, str] = {
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
}


# ---------------------------------------------------------------------------- outputs
@dataclass
class QwenVLPrepared:
    """The shortened language-model input of one batch.

    inputs_embeds:  [B, L', D] text embeddings and kept visual tokens, re-padded.
    attention_mask: [B, L'] long (0 = pad).
    position_ids:   [3, B, L'] long M-RoPE (t, h, w) positions, the full sequence's ones.
    rope_deltas:    [B, 1] long, ``max position + 1 - L'`` (transformers' convention).
    visual_mask:    [B, L'] bool, True at kept image tokens.
    source:         [B, L'] long, column of ``input_ids`` each slot comes from (for an image
                    token: the merged cell at the top-left of its region), -1 at pads.
    deepstack:      Qwen3-VL only: per DeepStack layer a [B, L', D] tensor (zeros off the
                    visual positions); None otherwise.
    kept:           [I] long, tokens kept per image (in ``image_grid_thw`` order).
    image_rows:     [I] long, the example of each image.
    allocations:    per image: ``(indices [k], positions [k, 3] (row, col, level))`` on its
                    merged grid.
    padding_side:   "left" or "right".
    question:       [B, L'] bool, the query (question) tokens.
    llm_budget:     [B] long, visual tokens an in-LLM allocator must leave per prompt (the
                    images' budgets summed over the prompt).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    rope_deltas: torch.Tensor
    visual_mask: torch.Tensor
    source: torch.Tensor
    deepstack: list[torch.Tensor] | None
    kept: torch.Tensor
    image_rows: torch.Tensor
    allocations: list[tuple[torch.Tensor, torch.Tensor]]
    padding_side: str
    question: torch.Tensor | None = None
    llm_budget: torch.Tensor | None = None

    @property
    def deepstack_visual_embeds(self) -> list[torch.Tensor] | None:
        """Per DeepStack layer [n_visual, D]: the features at ``visual_mask``, row-major."""
        if self.deepstack is None:
            return None
        return [d[self.visual_mask] for d in self.deepstack]

    def text_position_ids(self) -> torch.Tensor:
        """[B, L'] the 1-D positions transformers uses for the attention mask (cumsum - 1)."""
        m = self.attention_mask.long()
        return (m.cumsum(-1) - 1).masked_fill(m == 0, 0)


@dataclass
class QwenVLOutput:
    """What :meth:`QwenVLAllocation.forward` returns.

    logits:          [B, L', V] (or the last ``logits_to_keep`` slots).
    loss:            scalar when ``labels`` were given (labels follow the compaction).
    past_key_values: the cache of the shortened sequence when ``use_cache``.
    prepared:        the :class:`QwenVLPrepared` input the language model saw.
    extras:          anything else the language model returned (hidden states...).
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    past_key_values: Any
    prepared: QwenVLPrepared
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def rope_deltas(self) -> torch.Tensor:
        return self.prepared.rope_deltas


# ---------------------------------------------------------------------------- helpers
# model inputs the plug-in computes itself (or does not support): a clear error when given
_NOT_ACCEPTED = ("inputs_embeds", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "position_ids",
                 "past_key_values", "cache_position", "rope_deltas")

def _family(model: nn.Module) -> str:
    import transformers

    for name, tag in SUPPORTED_MODELS.items():
        cls = getattr(transformers, name, None)
        if cls is not None and isinstance(model, cls):
            return tag
    known = ", ".join(n for n in SUPPORTED_MODELS if hasattr(transformers, n))
    raise ValueError(
        f"model: expected a Qwen-VL model ({known}), got {type(model).__name__}; "
        "for LLaVA-style models use arr_coc.integrations.llava"
    )


def normalize_image_budget(
    budget: int | float | Sequence[int] | torch.Tensor | None, sizes: torch.Tensor
) -> torch.Tensor:
    """Budget -> [I] long tokens per image, for images of ``sizes`` [I] merged tokens.

    ``None``: every token. An ``int`` k >= 0: at most k per image. A ``float`` f in (0, 1]:
    that fraction of each image, ``max(1, round(f * n_i))``. A sequence or [I] tensor of
    ints: one cap per image, in ``image_grid_thw`` order. Caps above n_i keep everything.
    """
    num = sizes.shape[0]
    if budget is None:
        return sizes.clone()
    if isinstance(budget, bool):
        raise ValueError(f"budget: expected an int, a fraction in (0, 1] or {num} ints, got {budget!r}")
    if isinstance(budget, float):
        if not (0.0 < budget <= 1.0) or math.isnan(budget):
            raise ValueError(f"budget: a float budget is a fraction of each image's tokens, in (0, 1]; got {budget}")
        return torch.tensor([max(1, round(budget * int(n))) for n in sizes.tolist()], dtype=torch.long,
                            device=sizes.device)
    if isinstance(budget, int):
        t = torch.full((num,), budget, dtype=torch.long, device=sizes.device)
    else:
        try:
            t = budget.detach() if isinstance(budget, torch.Tensor) else torch.as_tensor(list(budget))
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"budget: expected an int, a fraction in (0, 1] or {num} ints, got {budget!r}") from err
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"budget: expected integer values, got dtype {t.dtype}")
        if t.dim() == 0:
            t = t.expand(num)
        if t.shape != (num,):
            raise ValueError(
                f"budget: expected an int or one value per image (a [I={num}] tensor, in image_grid_thw "
                f"order), got shape {tuple(t.shape)}"
            )
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError(f"budget: expected integer token counts per image, got {t.tolist()}")
        t = t.to(device=sizes.device, dtype=torch.long)
    if (t < 0).any():
        raise ValueError(f"budget: expected values >= 0, got {t.tolist()}")
    return t


def _pyramid_features(feat: torch.Tensor, grid: tuple[int, int], max_level: int) -> torch.Tensor:
    """[N, D] merged-grid features -> [M, D] fine plus levels 1..max_level (area averages)."""
    h, w = grid
    parts = [feat]
    maps = rearrange(feat, "(h w) d -> 1 d h w", h=h, w=w)
    for level in range(1, max_level + 1):
        f = 2**level
        pooled = F.avg_pool2d(maps.float(), f, f, ceil_mode=True, count_include_pad=False).to(feat.dtype)
        parts.append(rearrange(pooled, "1 d h w -> (h w) d"))
    return torch.cat(parts)


# ---------------------------------------------------------------------------- wrapper
class QwenVLAllocation:
    """A Qwen-VL model with an allocator between the vision tower and the language model.

    Build it with :func:`wrap`. ``forward`` / ``__call__`` and ``generate`` take the
    processor's inputs; ``budget=`` on a call overrides the default of :func:`wrap`.
    """

    def __init__(self, model: nn.Module, allocator: Allocator | str, budget=None, *, query: Any = None,
                 processor: Any = None, relevance: Any = None):
        self.family = _family(model)
        self.query_mode = resolve_query_mode(query, processor)
        self.relevance = check_relevance(relevance, text_tower_ok=False)
        self._keep_all = create_allocator("full")
        self.last_in_llm: InLLMPruning | None = None
        if isinstance(allocator, str):
            allocator = create_allocator(allocator)
        if not callable(allocator):
            raise ValueError(f"allocator: expected an Allocator or a registered name, got {type(allocator).__name__}")
        self.model = model
        self.allocator = allocator
        self.budget = budget
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.video_token_id = int(cfg.video_token_id)
        self.special_ids = [self.image_token_id, self.video_token_id]
        for name in ("vision_start_token_id", "vision_end_token_id"):
            if getattr(cfg, name, None) is not None:
                self.special_ids.append(int(getattr(cfg, name)))
        self.merge = int(cfg.vision_config.spatial_merge_size)

    @property
    def in_llm(self) -> bool:
        """Whether the allocator prunes inside the language model (FastV, SparseVLM)."""
        return bool(getattr(self.allocator, "in_llm", False))

    def unwrap(self) -> nn.Module:
        """The model, untouched."""
        return self.model

    def __repr__(self) -> str:
        return f"QwenVLAllocation({type(self.model).__name__}, {type(self.allocator).__name__}, budget={self.budget!r})"

    # ------------------------------------------------------------------ input checks
    def _check_inputs(self, input_ids, attention_mask, extra: dict[str, Any]) -> torch.Tensor:
        if extra.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds: not supported; pass input_ids (the image placeholders locate the images)")
        if extra.get("pixel_values_videos") is not None or extra.get("video_grid_thw") is not None:
            raise ValueError("pixel_values_videos: videos are not supported by the Qwen-VL allocation plug-in (images only)")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a [B, L] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
        if (input_ids == self.video_token_id).any():
            raise ValueError("input_ids: contain video placeholder tokens; videos are not supported (images only)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask: expected shape {tuple(input_ids.shape)} like input_ids, got {tuple(attention_mask.shape)}"
            )
        return attention_mask

    def _image_runs(self, input_ids, attention_mask, grid_thw) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Placeholder columns [n_i] of each image and its example, images in reading order."""
        image_mask = (input_ids == self.image_token_id) & attention_mask.bool()
        sizes = (grid_thw.prod(-1) // self.merge**2).tolist()
        runs, rows = [], []
        i = 0
        for b in range(input_ids.shape[0]):
            cols = image_mask[b].nonzero().flatten()
            start = 0
            while start < cols.numel():
                if i >= len(sizes):
                    raise ValueError(
                        f"image_grid_thw: {len(sizes)} image(s), but input_ids hold more image placeholder tokens "
                        f"(example {b} has {cols.numel()})"
                    )
                n = sizes[i]
                run = cols[start : start + n]
                if run.numel() != n or int(run[-1] - run[0]) != n - 1:
                    raise ValueError(
                        f"input_ids: image {i} (example {b}) needs a contiguous run of {n} placeholder tokens "
                        f"for its grid {grid_thw[i].tolist()}, found {run.numel()} from column {int(run[0])}"
                    )
                runs.append(run)
                rows.append(b)
                start += n
                i += 1
        if i != len(sizes):
            raise ValueError(f"image_grid_thw: {len(sizes)} image(s), but input_ids hold placeholders for {i}")
        return runs, torch.tensor(rows, dtype=torch.long, device=input_ids.device)

    # ------------------------------------------------------------------ prepare
    def prepare(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        *,
        budget=None,
        padding_side: str | None = None,
        query_mask: torch.Tensor | None = None,
        **extra: Any,
    ) -> QwenVLPrepared:
        """Run the vision tower and the allocator; build the shortened language-model input.

        input_ids [B, L], attention_mask [B, L], pixel_values [sum_i t_i h_i w_i, C * tp * p * p],
        image_grid_thw [I, 3] (patch grid of each image), mm_token_type_ids [B, L] (optional;
        checked against the image placeholders, not needed by this transformers version).
        ``padding_side`` of the result: by default that of the input. ``query_mask`` [B, L]
        bool over ``input_ids``: the query tokens of this call (default: the ``query`` rule
        given to :func:`wrap`).
        """
        attention_mask = self._check_inputs(input_ids, attention_mask, extra)
        bad = sorted(k for k, v in extra.items() if v is not None)
        if bad:
            raise ValueError(
                f"{bad[0]}: not accepted by the Qwen-VL allocation plug-in, which builds the positions and "
                f"the cache of the shortened sequence itself (got {bad})"
            )
        model = self.model
        device = input_ids.device
        has_images = bool((input_ids == self.image_token_id).any())
        if has_images and (pixel_values is None or image_grid_thw is None):
            raise ValueError("pixel_values: input_ids hold image placeholders, so pixel_values and image_grid_thw are required")
        if not has_images and pixel_values is not None:
            raise ValueError("pixel_values: given, but input_ids hold no image placeholder token")
        if mm_token_type_ids is not None:
            mm = torch.as_tensor(mm_token_type_ids, device=device)
            if mm.shape != input_ids.shape or not torch.equal(mm == 1, input_ids == self.image_token_id):
                raise ValueError("mm_token_type_ids: expected [B, L] with 1 exactly at the image placeholder tokens")
        if padding_side is None:
            padding_side = infer_padding_side(attention_mask)

        embed = model.get_input_embeddings()
        embeds = embed(input_ids)  # [B, L, D]
        if has_images:
            grid_thw = torch.as_tensor(image_grid_thw, device=device).long()
            if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
                raise ValueError(f"image_grid_thw: expected [I, 3] (t, h, w), got {tuple(grid_thw.shape)}")
            if (grid_thw[:, 0] != 1).any():
                raise ValueError(f"image_grid_thw: images must have t == 1 (videos are not supported), got {grid_thw.tolist()}")
            if ((grid_thw[:, 1:] % self.merge) != 0).any():
                raise ValueError(f"image_grid_thw: h and w must be multiples of the merge size {self.merge}")
            runs, rows = self._image_runs(input_ids, attention_mask, grid_thw)
            n_patches = int(grid_thw.prod(-1).sum())
            if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 2 or pixel_values.shape[0] != n_patches:
                raise ValueError(
                    f"pixel_values: expected [{n_patches}, C * tp * p * p] patches for image_grid_thw "
                    f"{grid_thw.tolist()}, got {tuple(getattr(pixel_values, 'shape', ()))}"
                )
            vis = model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid_thw, return_dict=True)
            feats = [f.to(embeds.dtype) for f in vis.pooler_output]  # I x [n_i, D]
            deep = getattr(vis, "deepstack_features", None) if self.family == "qwen3_vl" else None
        else:
            grid_thw = torch.zeros(0, 3, dtype=torch.long, device=device)
            runs, rows, feats, deep = [], torch.zeros(0, dtype=torch.long, device=device), [], None
        full_pos, _ = model.model.get_rope_index(
            input_ids=input_ids, image_grid_thw=grid_thw if has_images else None, attention_mask=attention_mask
        )  # [3, B, L]
        full_pos = full_pos.to(device)

        sizes = torch.tensor([f.shape[0] for f in feats], dtype=torch.long, device=device)
        budgets = normalize_image_budget(self.budget if budget is None else budget, sizes)
        text_mask = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(self.special_ids, device=device))
        qmask = resolve_query_mask(self.query_mode, input_ids, attention_mask, text_mask, explicit=query_mask)
        query, query_mask = text_query(embeds, qmask)

        signals = self._signals(input_ids, attention_mask, qmask, embeds, feats, runs, rows, full_pos, deep)
        # allocation, one call per merged grid
        grids = [(int(h) // self.merge, int(w) // self.merge) for _, h, w in grid_thw.tolist()]
        kept_tokens: list[torch.Tensor | None] = [None] * len(feats)
        kept_pos: list[torch.Tensor | None] = [None] * len(feats)
        kept_idx: list[torch.Tensor | None] = [None] * len(feats)
        for g in sorted(set(grids)):
            members = [i for i, gi in enumerate(grids) if gi == g]
            sel = torch.tensor(members, device=device)
            allocator = self._keep_all if self.in_llm else self.allocator  # in-LLM: every token enters the LLM
            host = signals.subset(sel)
            scoring = None
            if isinstance(self.relevance, LLMLayer) and allocator is not self._keep_all:
                scoring = host.llm_hidden(self.relevance.layer)
            out: AllocationOutput = run_allocator(
                allocator,
                torch.stack([feats[i] for i in members]),
                query[rows[sel]],
                query_mask[rows[sel]],
                host=host,
                scoring=scoring,
                budget=budgets[sel],
                grid=g,
                num_prefix_tokens=0,
            )
            for j, i in enumerate(members):
                m = out.mask[j]
                kept_tokens[i], kept_pos[i], kept_idx[i] = out.tokens[j][m], out.positions[j][m], out.indices[j][m]

        # splice: the run's first k_i slots take the kept tokens, the rest is dropped
        keep = attention_mask.bool().clone()
        pos_seq = rearrange(full_pos, "c b l -> b l c").clone()  # [B, L, 3]
        source = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids).clone()
        visual = torch.zeros_like(keep)
        deep_seq = [embeds.new_zeros(embeds.shape) for _ in deep] if deep is not None else None
        offsets = [0] + torch.cumsum(sizes, 0).tolist()
        r_all, s_all, t_all = [], [], []
        for i, run in enumerate(runs):
            b, k = int(rows[i]), kept_tokens[i].shape[0]
            if k > run.numel():
                raise ValueError(f"allocator: returned {k} tokens for image {i} of {run.numel()} merged tokens")
            w_i = grids[i][1]
            cell = run[0] + kept_pos[i][:, 0] * w_i + kept_pos[i][:, 1]  # source column of each kept token
            slots = run[:k]
            keep[b, run[k:]] = False
            pos_seq[b, slots] = rearrange(full_pos[:, b, cell], "c k -> k c")
            source[b, slots] = cell
            visual[b, slots] = True
            r_all.append(torch.full_like(slots, b))
            s_all.append(slots)
            t_all.append(kept_tokens[i])
            if deep_seq is not None and k:
                max_level = int(kept_pos[i][:, 2].max())
                cand = _candidate_index(kept_pos[i], grids[i])
                for layer, feat in enumerate(deep):
                    pyr = _pyramid_features(feat[offsets[i] : offsets[i + 1]], grids[i], max_level)
                    deep_seq[layer][b, slots] = pyr[cand].to(embeds.dtype)
        if t_all:
            embeds = embeds.index_put((torch.cat(r_all), torch.cat(s_all)), torch.cat(t_all).to(embeds.dtype))

        plan = compaction_plan(keep, padding_side=padding_side)
        pad_id = getattr(model.config.get_text_config(), "pad_token_id", None)
        pad_embed = embed(torch.tensor(pad_id if pad_id is not None else 0, device=device))
        new_mask = plan.valid.to(attention_mask.dtype)
        positions = rearrange(gather_sequence(pos_seq, plan, 0), "b l c -> c b l")
        new_len = plan.valid.shape[1]
        real_max = positions.masked_fill(~plan.valid[None], -1).amax(dim=(0, 2)) if new_len else None
        rope_deltas = (
            torch.where(plan.valid.any(1), real_max + 1 - new_len, torch.zeros_like(real_max))[:, None]
            if new_len
            else torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=device)
        )
        return QwenVLPrepared(
            inputs_embeds=gather_sequence(embeds, plan, pad_embed.detach()),
            attention_mask=new_mask,
            position_ids=positions,
            rope_deltas=rope_deltas,
            visual_mask=gather_sequence(visual, plan, False),
            source=gather_sequence(source, plan, -1),
            deepstack=[gather_sequence(x, plan, 0) for x in deep_seq] if deep_seq is not None else None,
            kept=torch.tensor([t.shape[0] for t in kept_tokens], dtype=torch.long, device=device),
            image_rows=rows,
            allocations=list(zip(kept_idx, kept_pos)),
            padding_side=padding_side,
            question=gather_sequence(qmask, plan, False),
            llm_budget=torch.zeros(input_ids.shape[0], dtype=torch.long, device=device).index_add(
                0, rows, torch.minimum(budgets, sizes)) if len(feats) else
            torch.zeros(input_ids.shape[0], dtype=torch.long, device=device),
        )

    # ------------------------------------------------------------------ forward
    def _lm_kwargs(self, prep: QwenVLPrepared, upto: int | None = None) -> dict[str, Any]:
        """DeepStack arguments of the language model (Qwen3-VL), for the first ``upto`` slots."""
        if prep.deepstack is None:
            return {}
        vis = prep.visual_mask if upto is None else prep.visual_mask[:, :upto]
        ds = prep.deepstack if upto is None else [x[:, :upto] for x in prep.deepstack]
        return {"visual_pos_masks": vis, "deepstack_visual_embeds": [x[vis] for x in ds]}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        budget=None,
        query_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> QwenVLOutput:
        """Prefill the shortened sequence. Returns :class:`QwenVLOutput` (logits [B, L', V]).

        ``labels`` [B, L] follow the compaction (image slots and pads get -100). Other
        keyword arguments (``output_hidden_states``...) go to the language model;
        ``position_ids`` and ``past_key_values`` from a previous step are not accepted.
        """
        extra = {k: kwargs.pop(k) for k in _NOT_ACCEPTED if k in kwargs}
        prep = self.prepare(
            input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, budget=budget,
            query_mask=query_mask, **extra
        )
        lm = self.model.get_decoder()
        lm_inputs = dict(
            inputs_embeds=prep.inputs_embeds,
            attention_mask=prep.attention_mask,
            position_ids=prep.position_ids,
            use_cache=use_cache,
            return_dict=True,
            **self._lm_kwargs(prep),
            **kwargs,
        )
        if self._prunes_in_llm(prep):
            if labels is not None:
                raise ValueError("labels: not supported with an in-LLM allocator (the sequence shrinks inside the LLM)")
            with self._in_llm_run(prep) as run:
                out = lm(**lm_inputs)
            self.last_in_llm = run
        else:
            out = lm(**lm_inputs)
        hidden = out.last_hidden_state
        logits = self.model.get_output_embeddings()(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels: expected shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
            new_labels = torch.where(
                prep.visual_mask | (prep.source < 0), torch.full_like(prep.source, -100), labels.gather(1, prep.source.clamp(min=0))
            )
            loss = self.model.loss_function(
                logits=logits, labels=new_labels, vocab_size=self.model.config.get_text_config().vocab_size
            )
        extras = {k: v for k, v in out.items() if k not in ("last_hidden_state", "past_key_values")}
        return QwenVLOutput(logits=logits, loss=loss, past_key_values=out.past_key_values, prepared=prep, extras=extras)

    __call__ = forward

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        *,
        budget=None,
        query_mask: torch.Tensor | None = None,
        **generation_kwargs: Any,
    ):
        """``model.generate`` on the shortened prompt; returns ``input_ids`` + new tokens.

        ``max_length`` / ``min_length`` count the prompt as given (``input_ids``), like
        ``model.generate``; they are turned into ``max_new_tokens`` / ``min_new_tokens``
        (:func:`~arr_coc.integrations._common.generation_lengths`). Beam search and ``num_return_sequences`` work for
        Qwen2-VL and Qwen2.5-VL (each prompt repeated in the result), not for Qwen3-VL.

        With ``return_dict_in_generate=True`` the output object is returned with its
        ``sequences`` prefixed by ``input_ids`` likewise (its ``past_key_values`` hold the
        shortened sequence).
        """
        extra = {k: generation_kwargs.pop(k) for k in _NOT_ACCEPTED if k in generation_kwargs}
        prep = self.prepare(
            input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, budget=budget,
            padding_side="left", query_mask=query_mask, **extra,
        )
        pos4 = torch.cat([prep.text_position_ids()[None], prep.position_ids], dim=0)  # [4, B, L']
        gen_inputs: dict[str, Any] = {
            "inputs_embeds": prep.inputs_embeds,
            "attention_mask": prep.attention_mask,
            "position_ids": pos4,
        }
        # max_length / min_length count the prompt as the caller sent it, not the shortened one
        generation_kwargs = generation_lengths(self.model, generation_kwargs, input_ids.shape[1])
        if self._prunes_in_llm(prep):
            if prep.deepstack is not None:
                raise NotImplementedError(
                    "allocator: in-LLM pruning inside Qwen3-VL generate is not implemented (its DeepStack prompt is "
                    "prefilled separately, so the readout token would not be the prompt's last); forward works"
                )
            with self._in_llm_run(prep) as run:
                out = self.model.generate(**gen_inputs, **generation_kwargs)
            self.last_in_llm = run
        else:
            if prep.deepstack is not None and bool(prep.visual_mask.any()):
                gen_inputs["past_key_values"] = self._prefill_deepstack(prep, generation_kwargs)
            out = self.model.generate(**gen_inputs, **generation_kwargs)
        seq = out if isinstance(out, torch.Tensor) else out.sequences
        prompt = input_ids.repeat_interleave(seq.shape[0] // input_ids.shape[0], dim=0)
        seq = torch.cat([prompt, seq.to(input_ids.device)], dim=1)
        if isinstance(out, torch.Tensor):
            return seq
        out.sequences = seq
        return out

    def _signals(self, input_ids, attention_mask, qmask, embeds, feats, runs, rows, full_pos, deep) -> PluginSignals:
        """Host signals of the batch: the LLM's hidden states / attention on the full prompt (no vision ones)."""
        model = self.model

        def llm(layer: int, attention: bool):
            full = embeds.clone()
            for i, run in enumerate(runs):
                full[int(rows[i]), run] = feats[i].to(full.dtype)
            extra = {}
            if deep is not None:
                extra = {"visual_pos_masks": (input_ids == self.image_token_id) & attention_mask.bool(),
                         "deepstack_visual_embeds": [d.to(full.dtype) for d in deep]}

            def run_lm():
                return model.get_decoder()(inputs_embeds=full, attention_mask=attention_mask, position_ids=full_pos,
                                           use_cache=False, return_dict=True, **extra)

            return llm_layer_states(model, layer, run_lm, attention_mask, attention=attention)

        return PluginSignals(input_ids=input_ids, question=qmask, image_rows=rows, image_slots=list(runs), llm=llm)

    def _prunes_in_llm(self, prep: QwenVLPrepared) -> bool:
        return self.in_llm and bool(prep.visual_mask.any())

    def _in_llm_run(self, prep: QwenVLPrepared) -> InLLMPruning:
        """The hooks that run the in-LLM allocator between the decoder layers (see ``_llm``)."""
        return InLLMPruning(
            self.model, self.allocator, attention_mask=prep.attention_mask, visual=prep.visual_mask,
            question=prep.question, budget=prep.llm_budget,
            num_deepstack=len(prep.deepstack) if prep.deepstack is not None else 0,
        )

    def _prefill_deepstack(self, prep: QwenVLPrepared, generation_kwargs: dict[str, Any]):
        """Qwen3-VL: run the prompt minus its last slot through the language model with DeepStack."""
        cfg = self.model.generation_config
        beams = generation_kwargs.get("num_beams", getattr(cfg, "num_beams", 1)) or 1
        seqs = generation_kwargs.get("num_return_sequences", getattr(cfg, "num_return_sequences", 1)) or 1
        if beams > 1 or seqs > 1:
            raise ValueError(
                "num_beams: Qwen3-VL with DeepStack is generated from a prefilled cache; beam search and "
                "num_return_sequences > 1 are not supported (repeat the inputs instead)"
            )
        if generation_kwargs.get("use_cache") is False:
            raise ValueError("use_cache: Qwen3-VL generation through the plug-in needs the KV cache")
        if bool(prep.visual_mask[:, -1].any()):
            raise ValueError("input_ids: with Qwen3-VL the prompt must end with a text token after the image")
        n = prep.inputs_embeds.shape[1] - 1
        out = self.model.get_decoder()(
            inputs_embeds=prep.inputs_embeds[:, :n],
            attention_mask=prep.attention_mask[:, :n],
            position_ids=prep.position_ids[:, :, :n],
            use_cache=True,
            return_dict=True,
            **self._lm_kwargs(prep, upto=n),
        )
        return out.past_key_values


def wrap(
    model: nn.Module,
    allocator: Allocator | str,
    *,
    budget=None,
    query: Any = None,
    processor: Any = None,
    relevance: Any = None,
) -> QwenVLAllocation:
    """Put ``allocator`` between the vision tower and the language model of a Qwen-VL model.

    model:     ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` or
               ``Qwen3VLForConditionalGeneration`` (or a subclass); anything else -> ValueError.
    allocator: an :class:`~arr_coc.allocators.base.Allocator` or a registered name.
    budget:    merged visual tokens per image: ``None`` (all), an int cap, a fraction in
               (0, 1], or one int per image (``image_grid_thw`` order). Calls may override it.
    query:     which prompt tokens form the query: ``"question"`` (default when ``processor``
               is given: the user's last question, found from the chat template), ``"prompt"``
               (every real text token; the default, with a warning, without a processor), a
               :class:`~arr_coc.integrations.query.QuestionFinder` or a callable
               ``(input_ids, attention_mask) -> [B, L] bool``. A per-call ``query_mask=`` wins.
    processor: the model's processor (or its tokenizer with the chat template).
    relevance: the space the allocator scores in: ``"embeddings"`` (default) or
               :class:`~arr_coc.integrations.signals.LLMLayer` ``(l)`` (the LLM's hidden states
               after layer ``l`` on the full prompt); Qwen-VL has no paired text tower. Host
               signals for ``reads_host`` allocators: ``llm_hidden`` / ``llm_attention`` (see
               :mod:`arr_coc.integrations.signals`, which tabulates the costs).
    """
    return QwenVLAllocation(model, allocator, budget, query=query, processor=processor, relevance=relevance)
