"""Any registered allocator inside a ``transformers`` LLaVA model, batched, with ``generate``.

```python
from arr_coc.integrations import llava

vlm = llava.wrap(model, "arr_coc", budget=64)        # model: LlavaForConditionalGeneration
inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
logits = vlm(**inputs).logits                         # [B, L', V] over the shortened sequence
ids = vlm.generate(**inputs, max_new_tokens=32)       # [B, L + new]: the prompt ids, then new tokens
model = vlm.unwrap()                                  # the very object passed in, never modified
```

What happens on each call (public methods of the host model only, no patching):

1. ``model.get_input_embeddings()(input_ids)`` gives the prompt's token embeddings.
2. ``model.get_image_features(pixel_values, ...)`` runs the vision tower and the projector:
   features ``[I, P + N, D]`` in the language model's space (I images, N = H x W patches,
   P prefix tokens). **The allocator runs here, after the projector**, on LLM-space
   features, with the text query in the same space.
3. The grid is ``pixel_values`` height and width divided by the vision tower's
   ``patch_size``; ``P`` is whatever the select strategy left beyond the grid: 0 for
   ``vision_feature_select_strategy="default"`` (CLS dropped), 1 for ``"full"`` on a CLIP
   tower (the CLS), 0 for ``"full"`` on a tower without CLS. Pass ``grid=`` /
   ``num_prefix_tokens=`` to override (a ``grid`` given alone means P = 0). Prefix tokens are handed to the allocator as
   prefix (``cls_attention``-style methods may use them) and, with ``keep_prefix=True``
   (default), always given to the language model first in the image run, as the model
   was trained; they do not count against the budget.
4. The query is the input embedding of the **user's question** (``query [B, T, D]``,
   ``query_mask [B, T]``): with ``processor=`` given to :func:`wrap`, the tokens the
   chat template leaves for the user's last question (no system prompt, role headers,
   image placeholders or generation prompt; :class:`~arr_coc.integrations.query.QuestionFinder`).
   ``query=`` chooses otherwise: ``"prompt"`` (every real non-image token, the rule
   without a processor, with a warning), a ``QuestionFinder``, or a callable
   ``(input_ids, attention_mask) -> [B, L] bool``; a per-call ``query_mask=`` [B, L] wins.
5. Budget: per image, an int or one value per prompt (``[B]`` tensor or list), applied
   to every image of that prompt. ``budget >= N`` keeps every patch (the allocator
   contract); adaptive allocators may keep fewer.
6. Each image's placeholder run is replaced by its kept tokens (in the allocator's
   raster order) and the rest of the run is removed, then the sequence is compacted:
   every kept token keeps its original order, pads are re-added on the tokenizer's
   padding side (inferred from ``attention_mask``: right when a row ends with a pad,
   else left; or ``padding_side=``).
7. Position ids are **contiguous after compaction**: ``attention_mask.cumsum(-1) - 1``
   (pads 0), the rule ``transformers`` generation uses, so decoding continues right
   after the shortened prompt and, with nothing dropped (``full``), the model sees
   exactly the sequence, mask and positions it would have seen unwrapped.
8. The model is called with ``inputs_embeds`` (``pixel_values=None``), so its own
   ``forward`` / ``generate`` run unchanged and the KV cache holds the shortened sequence.

In-LLM allocators (``allocator.in_llm``, e.g. ``fastv``, ``sparsevlm``): every image token
enters the language model and the allocator prunes between its decoder layers (see
:mod:`arr_coc.integrations._llm`: forward pre-hooks for the call only, nothing patched),
in ``forward`` and ``generate``, batched; the budget per image, summed over the prompt's
images (a CLS prefix counts as an image token there), is what remains after the last
pruning layer; ``logits`` are over the final, shorter sequence and ``last_in_llm`` holds
the run (``.trace``: the kept image tokens, ``.final``: the prompt slot of each logit).
Keeping every token reproduces the plain model. ``labels`` are refused with them.

Relevance sources and host signals (:mod:`arr_coc.integrations.signals`, with a table of
their costs): ``relevance="embeddings"`` (default: question word embeddings vs projected
patches), ``relevance=TextTower(clip_model, clip_tokenizer, host_tokenizer)`` (the CLIP /
SigLIP joint space, CDPruner's) or ``relevance=LLMLayer(l)`` (the LLM's hidden states after
layer ``l`` on the unpruned prompt). Allocators that read host signals (``reads_host``) get
``host=``: the vision tower's attention / keys of any block, the text tower's features
when ``text_tower=`` is given, the LLM's hidden states / attention of any layer.

Prompts without an ``<image>`` token are allowed in a batch (their text passes through);
a mismatch between the number of images and placeholder runs, a run whose length is not
the number of features, or a budget of the wrong shape raise ``ValueError``.
Continuing from a filled cache, explicit ``position_ids`` / ``inputs_embeds`` /
``cache_position`` and variable-size images (``image_sizes``) are not supported (error).

For a haotian-liu-style LLaVA fork, which splices image features by their length,
:func:`hook_projector` (a forward hook on ``mm_projector`` with an ``eject``) suffices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from arr_coc.allocators import Allocator, AllocationOutput, create_allocator
from arr_coc.allocators.host import SignalUnavailable, resolve_layer
from arr_coc.integrations._common import (
    compaction_plan,
    gather_sequence,
    generation_lengths,
    image_runs,
    infer_padding_side,
    normalize_budget,
    position_ids_from_mask,
    splice_runs,
    text_query,
)
from arr_coc.integrations._llm import InLLMPruning
from arr_coc.integrations.query import resolve_query_mask, resolve_query_mode
from arr_coc.integrations.signals import (
    LLMLayer,
    PluginSignals,
    TextTower,
    check_relevance,
    llm_layer_states,
    run_allocator,
)

__all__ = ["LlavaAllocation", "ProjectorHook", "ShortenedInputs", "hook_projector", "wrap"]

_UNSUPPORTED = ("inputs_embeds", "position_ids", "cache_position")


@dataclass
class ShortenedInputs:
    """The shortened prompt handed to the language model (L' <= L).

    inputs_embeds:  [B, L', D] text embeddings + kept image tokens, pads on ``padding_side``.
    attention_mask: [B, L'] (dtype of the input mask), 0 at pads.
    position_ids:   [B, L'] long, contiguous over the real tokens, 0 at pads.
    input_ids:      [B, L'] long, the kept ids (the image token id at image slots, the pad
                    id at pads) - what ``generate`` prepends to the new tokens.
    labels:         [B, L'] long or None, the kept labels (-100 at pads).
    source:         [B, L'] long, original position of each slot (-1 at pads); image
                    slots report the placeholder position they occupy, not the patch
                    (see ``allocation.positions`` for the patch).
    image_counts:   [B] long, image positions the language model receives per prompt
                    (prefix tokens included).
    allocation:     the allocator's output over all images [I, K], or None.
    image_rows:     [I] long, the prompt each image belongs to.
    question:       [B, L'] bool, the query (question) tokens of each prompt.
    visual:         [B, L'] bool, the image slots.
    llm_budget:     [B] long, image tokens an in-LLM allocator must leave per prompt (the
                    per-image budget times the prompt's images, capped by its image slots).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    input_ids: torch.Tensor
    labels: torch.Tensor | None
    source: torch.Tensor
    image_counts: torch.Tensor
    allocation: AllocationOutput | None
    image_rows: torch.Tensor
    question: torch.Tensor | None = None
    visual: torch.Tensor | None = None
    llm_budget: torch.Tensor | None = None

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the host model's ``forward``."""
        return {
            "inputs_embeds": self.inputs_embeds,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }


def _config_get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


class LlavaAllocation:
    """A LLaVA-structured model with an allocator between projector and language model.

    Not an ``nn.Module``: it holds references to the model and the allocator, never
    registers one inside the other, and adds nothing to any ``state_dict``. The host model
    must offer ``get_input_embeddings()``, ``get_image_features(pixel_values,
    vision_feature_layer, vision_feature_select_strategy)``, a config with
    ``image_token_id`` (or ``image_token_index``) and ``vision_config.patch_size``, and a
    ``forward`` / ``generate`` accepting ``inputs_embeds`` - as
    ``transformers.LlavaForConditionalGeneration`` does.
    """

    def __init__(
        self,
        model: nn.Module,
        allocator: Allocator | str,
        budget: int | Sequence[int] | torch.Tensor = 64,
        *,
        grid: tuple[int, int] | None = None,
        num_prefix_tokens: int | None = None,
        keep_prefix: bool = True,
        padding_side: str | None = None,
        allocator_dtype: torch.dtype | None = torch.float32,
        query: Any = None,
        processor: Any = None,
        relevance: Any = None,
        text_tower: TextTower | None = None,
    ) -> None:
        for attr in ("get_input_embeddings", "get_image_features", "generate", "config"):
            if not hasattr(model, attr):
                raise ValueError(
                    f"model: expected a LLaVA-structured model with `{attr}` "
                    f"(e.g. transformers.LlavaForConditionalGeneration), got {type(model).__name__}"
                )
        if isinstance(allocator, str):
            allocator = create_allocator(allocator)
        if not callable(allocator):
            raise ValueError(f"allocator: expected an Allocator or a registered name, got {allocator!r}")
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side: expected None, 'left' or 'right', got {padding_side!r}")
        if grid is not None and (len(grid) != 2 or min(int(g) for g in grid) <= 0):
            raise ValueError(f"grid: expected (H, W) with positive sides, got {grid!r}")
        if num_prefix_tokens is not None and (not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0):
            raise ValueError(f"num_prefix_tokens: expected an int >= 0 or None, got {num_prefix_tokens!r}")
        config = model.config
        self.image_token_id = _config_get(config, "image_token_id", "image_token_index")
        if self.image_token_id is None:
            raise ValueError("model: its config has no image_token_id / image_token_index")
        self._model = model
        self.allocator = allocator
        self.budget = budget
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.num_prefix_tokens = num_prefix_tokens
        self.keep_prefix = keep_prefix
        self.padding_side = padding_side
        self.allocator_dtype = allocator_dtype
        self.query_mode = resolve_query_mode(query, processor)
        if relevance == "text_tower":
            if text_tower is None:
                raise ValueError("relevance: 'text_tower' needs text_tower=TextTower(...)")
            relevance = text_tower
        if isinstance(relevance, TextTower):
            text_tower = text_tower or relevance
        self.relevance = check_relevance(relevance, text_tower_ok=True)
        self.text_tower = text_tower
        self._keep_all = create_allocator("full")
        self.last_in_llm: InLLMPruning | None = None
        self._vision_layer: Any = None

    # ------------------------------------------------------------------ access
    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def in_llm(self) -> bool:
        """Whether the allocator prunes inside the language model (FastV, SparseVLM)."""
        return bool(getattr(self.allocator, "in_llm", False))

    def unwrap(self) -> nn.Module:
        """The model passed to :func:`wrap`, the same object, untouched."""
        return self._model

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={type(self._model).__name__}, "
            f"allocator={type(self.allocator).__name__}, budget={self.budget!r})"
        )

    # ------------------------------------------------------------------ helpers
    def _pad_token_id(self) -> int:
        model = self._model
        for cfg in (getattr(model, "generation_config", None), model.config, getattr(model.config, "text_config", None)):
            pad = getattr(cfg, "pad_token_id", None) if cfg is not None else None
            if isinstance(pad, (list, tuple)):
                pad = pad[0] if pad else None
            if pad is not None:
                return int(pad)
        return 0

    def _image_features(
        self, pixel_values: torch.Tensor, layer: Any, strategy: str | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """Vision tower + projector through the model's public method -> [I, P + N, D]."""
        out = self._model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=layer,
            vision_feature_select_strategy=strategy,
            return_dict=True,
        )
        feats = getattr(out, "pooler_output", out)
        if isinstance(feats, (list, tuple)):
            sizes = {f.shape for f in feats}
            if len(sizes) != 1:
                raise ValueError(f"pixel_values: images gave features of different shapes {sorted(sizes)}")
            feats = torch.stack(list(feats))
        if feats.dim() != 3:
            raise ValueError(f"model: get_image_features gave shape {tuple(feats.shape)}, expected [I, P + N, D]")
        return feats.to(dtype)

    def _layout(self, pixel_values: torch.Tensor, num_features: int) -> tuple[tuple[int, int], int]:
        """(grid, number of prefix tokens) of the feature sequence."""
        if self.grid is not None:
            grid = self.grid
        else:
            vcfg = getattr(self._model.config, "vision_config", None)
            patch = getattr(vcfg, "patch_size", None)
            if patch is None:
                raise ValueError("grid: the model's vision_config has no patch_size; pass grid=(H, W) to wrap()")
            patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
            grid = (pixel_values.shape[-2] // patch[0], pixel_values.shape[-1] // patch[1])
        n = grid[0] * grid[1]
        if self.num_prefix_tokens is not None:
            prefix = self.num_prefix_tokens
        elif self.grid is not None:
            prefix = 0  # an explicit grid without an explicit prefix means no prefix
        else:
            prefix = num_features - n  # what the select strategy left beyond the grid
        if prefix < 0 or prefix + n != num_features:
            raise ValueError(
                f"grid: {num_features} image features per image do not match grid {grid} "
                f"({n} patches) + {prefix} prefix tokens; pass grid= / num_prefix_tokens= to wrap()"
            )
        return grid, prefix

    # ------------------------------------------------------------------ the work
    def prepare(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        budget: int | Sequence[int] | torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> ShortenedInputs:
        """Vision, allocation and the shortened sequence, without calling the language model.

        input_ids [B, L], attention_mask [B, L] or None, pixel_values [I, C, H, W] or None
        (I images in reading order), labels [B, L] or None; ``budget`` overrides the one
        given to :func:`wrap` for this call; ``query_mask`` [B, L] bool over ``input_ids``
        names the query tokens for this call (default: the ``query`` rule of :func:`wrap`).
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids
            raise ValueError(f"input_ids: expected a [B, L] tensor, got {shape!r}")
        if image_sizes is not None:
            raise ValueError("image_sizes: variable-size images are not supported by this integration")
        b, seq = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask: expected shape {tuple(input_ids.shape)} like input_ids, got {tuple(attention_mask.shape)}"
            )
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels: expected shape {tuple(input_ids.shape)} like input_ids, got {tuple(labels.shape)}")
        budget_b = normalize_budget(self.budget if budget is None else budget, b, device)
        real = attention_mask.bool()
        image_mask = (input_ids == self.image_token_id) & real
        embed = self._model.get_input_embeddings()
        embeds = embed(input_ids)  # [B, L, D]
        keep = real.clone()
        counts = torch.zeros(b, dtype=torch.long, device=device)
        allocation = None
        rows = torch.empty(0, dtype=torch.long, device=device)
        qmask = torch.zeros_like(real)
        llm_budget = torch.zeros(b, dtype=torch.long, device=device)
        if pixel_values is None:
            if image_mask.any():
                raise ValueError("pixel_values: input_ids hold image placeholder tokens but no pixel_values were given")
        else:
            if pixel_values.dim() != 4:
                raise ValueError(f"pixel_values: expected [I, C, H, W], got shape {tuple(pixel_values.shape)}")
            cfg = self._model.config
            layer = vision_feature_layer if vision_feature_layer is not None else getattr(cfg, "vision_feature_layer", None)
            strategy = vision_feature_select_strategy or getattr(cfg, "vision_feature_select_strategy", None)
            feats = self._image_features(pixel_values, layer, strategy, embeds.dtype)  # [I, P + N, D]
            self._vision_layer = layer
            num_images, n_feat, _ = feats.shape
            grid, prefix = self._layout(pixel_values, n_feat)
            positions, rows = image_runs(image_mask, n_feat, num_images)  # [I, P + N], [I]
            text_mask = real & ~image_mask
            qmask = resolve_query_mask(self.query_mode, input_ids, attention_mask, text_mask, explicit=query_mask)
            query, query_mask = text_query(embeds, qmask)  # [B, T, D], [B, T]
            adt = self.allocator_dtype or feats.dtype
            # an in-LLM allocator prunes inside the language model: every image token goes in
            allocator = self._keep_all if self.in_llm else self.allocator
            signals = self._signals(input_ids, attention_mask, qmask, embeds, feats, positions, rows, pixel_values,
                                    grid, prefix)
            scoring = None
            if self.relevance != "embeddings" and allocator is not self._keep_all:
                score, s_query, s_mask = self._scoring_space(signals, prefix)
                scoring = (score.to(adt), s_query.to(adt), s_mask)
            allocation = run_allocator(
                allocator, feats.to(adt), query[rows].to(adt), query_mask[rows], host=signals, scoring=scoring,
                budget=budget_b[rows], grid=grid, num_prefix_tokens=prefix,
            )
            tokens = allocation.tokens.to(embeds.dtype)  # [I, K, D]
            token_mask = allocation.mask
            if prefix and self.keep_prefix:
                tokens = torch.cat([feats[:, :prefix], tokens], dim=1)
                token_mask = torch.cat([token_mask.new_ones(num_images, prefix), token_mask], dim=1)
            embeds, keep = splice_runs(embeds, keep, positions, rows, tokens, token_mask)
            counts = counts.index_add(0, rows, token_mask.sum(dim=1).long())
            per_image = torch.minimum(budget_b[rows], torch.full_like(rows, n_feat))
            llm_budget = llm_budget.index_add(0, rows, per_image)
        side = self.padding_side or infer_padding_side(attention_mask)
        plan = compaction_plan(keep, padding_side=side)
        pad_id = self._pad_token_id()
        n_emb = getattr(embed, "num_embeddings", None)
        pad_embed = embed(torch.tensor(pad_id, device=device)) if n_emb is not None and 0 <= pad_id < n_emb else 0
        new_mask = plan.valid.to(attention_mask.dtype)
        return ShortenedInputs(
            inputs_embeds=gather_sequence(embeds, plan, fill=pad_embed),
            attention_mask=new_mask,
            position_ids=position_ids_from_mask(new_mask),
            input_ids=gather_sequence(input_ids, plan, fill=pad_id),
            labels=None if labels is None else gather_sequence(labels, plan, fill=-100),
            source=torch.where(plan.valid, plan.source, torch.full_like(plan.source, -1)),
            image_counts=counts,
            allocation=allocation,
            image_rows=rows,
            question=gather_sequence(qmask, plan, fill=False),
            visual=gather_sequence(image_mask, plan, fill=False),
            llm_budget=torch.minimum(llm_budget, counts),
        )

    def _signals(self, input_ids, attention_mask, qmask, embeds, feats, positions, rows, pixel_values, grid, prefix):
        """The batch's host signals (:class:`~arr_coc.integrations.signals.PluginSignals`), computed on demand."""
        model = self._model
        real = attention_mask.bool()

        def vision(layer: int):
            tower = model.model.vision_tower if hasattr(model, "model") else model.vision_tower
            blocks = tower.vision_model.encoder.layers if hasattr(tower, "vision_model") else tower.encoder.layers
            idx = resolve_layer(layer, len(blocks), name="layer")
            got = {}

            def grab(module, args, kwargs):
                got["x"] = kwargs.get("hidden_states", args[0] if args else None)

            handle = blocks[idx].self_attn.register_forward_pre_hook(grab, with_kwargs=True)
            try:
                with torch.no_grad():
                    tower(pixel_values=pixel_values.to(next(tower.parameters()).dtype))
            finally:
                handle.remove()
            return got["x"], blocks[idx].self_attn

        def llm(layer: int, attention: bool):
            full, _ = splice_runs(embeds, real, positions, rows, feats.to(embeds.dtype),
                                  torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device))
            lm = model.model.language_model

            def run():
                return lm(inputs_embeds=full, attention_mask=attention_mask,
                          position_ids=position_ids_from_mask(attention_mask), use_cache=False)

            return llm_layer_states(model, layer, run, attention_mask, attention=attention)

        def vision_output():
            layer = self._vision_layer if self._vision_layer is not None else model.config.vision_feature_layer
            if not isinstance(layer, int):
                raise SignalUnavailable(f"host: vision_output for several feature layers {layer} is not available")
            tower = model.model.vision_tower if hasattr(model, "model") else model.vision_tower
            with torch.no_grad():
                hs = tower(pixel_values=pixel_values.to(next(tower.parameters()).dtype), output_hidden_states=True)
            h = hs.hidden_states[layer]
            return h[:, h.shape[1] - feats.shape[1] :]  # the prefix the select strategy kept, then the patches

        projector = getattr(getattr(model, "model", model), "multi_modal_projector", None)
        return PluginSignals(
            input_ids=input_ids, question=qmask, image_rows=rows, image_slots=list(positions), vision=vision,
            num_tokens=feats.shape[1], text_tower=self.text_tower, pixel_values=pixel_values,
            num_patches=grid[0] * grid[1], llm=llm, vision_output=vision_output, to_token_space=projector,
        )

    def _scoring_space(self, signals: PluginSignals, prefix: int):
        """(tokens [I, P+N, Dr], query [I, T, Dr], mask) in the space of ``relevance``."""
        if isinstance(self.relevance, LLMLayer):
            return signals.llm_hidden(self.relevance.layer)
        patches = signals.patch_features()
        tokens = torch.cat([patches.new_zeros(patches.shape[0], prefix, patches.shape[2]), patches], dim=1)
        query, mask = signals.text_features()
        return tokens, query, mask

    @staticmethod
    def _check_kwargs(kwargs: dict[str, Any]) -> None:
        for name in _UNSUPPORTED:
            if kwargs.get(name) is not None:
                raise ValueError(f"{name}: not supported; the integration builds it from input_ids")
        cache = kwargs.get("past_key_values")
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            raise ValueError("past_key_values: continuing from a filled cache is not supported; pass an empty cache")

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        budget: int | Sequence[int] | torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The host model's forward on the shortened sequence; logits are ``[B, L', V]``.

        Takes what the model takes; other keyword arguments (``use_cache``,
        ``logits_to_keep``, ...) go to the model unchanged. Labels are compacted with the
        sequence (see :meth:`prepare` to map slots back to the prompt).
        """
        self._check_kwargs(kwargs)
        s = self.prepare(
            input_ids,
            attention_mask,
            pixel_values,
            labels=labels,
            budget=budget,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            query_mask=query_mask,
        )
        if s.labels is not None:
            if self._prunes_in_llm(s):
                raise ValueError("labels: not supported with an in-LLM allocator (the sequence shrinks inside the LLM)")
            kwargs["labels"] = s.labels
        if not self._prunes_in_llm(s):
            return self._model(**s.model_kwargs(), **kwargs)
        with self._in_llm_run(s) as run:
            out = self._model(**s.model_kwargs(), **kwargs)
        self.last_in_llm = run
        return out

    def _prunes_in_llm(self, s: ShortenedInputs) -> bool:
        return self.in_llm and s.visual is not None and bool(s.visual.any())

    def _in_llm_run(self, s: ShortenedInputs) -> InLLMPruning:
        """The hooks that run the in-LLM allocator between the decoder layers (see ``_llm``)."""
        return InLLMPruning(
            self._model, self.allocator, attention_mask=s.attention_mask, visual=s.visual, question=s.question,
            budget=s.llm_budget,
        )

    __call__ = forward

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        budget: int | Sequence[int] | torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        **generation_kwargs: Any,
    ) -> Any:
        """The host model's ``generate`` from the shortened prompt.

        Returns what ``model.generate`` returns, with the sequences rebuilt as
        ``[original input_ids, new tokens]`` (``[B, L + new]``) so callers decode exactly
        as with the unwrapped model. With ``return_dict_in_generate=True`` the returned
        ``past_key_values`` holds the shortened prompt (``L'`` positions) plus the new tokens.
        Position ids come from the shortened attention mask (``cumsum - 1``), the same
        rule :meth:`prepare` documents.

        ``max_length`` / ``min_length`` (keywords, ``generation_config`` or the model's
        default) count the prompt as given, ``input_ids``, exactly as for the unwrapped
        model: they are turned into ``max_new_tokens`` / ``min_new_tokens``
        (:func:`~arr_coc.integrations._common.generation_lengths`). With
        ``num_return_sequences > 1`` (beam search or sampling) each prompt is repeated as
        ``model.generate`` repeats it: rows ``b * n ... b * n + n - 1`` belong to prompt ``b``.
        """
        self._check_kwargs(generation_kwargs)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids
            raise ValueError(f"input_ids: expected a [B, L] tensor, got {shape!r}")
        generation_kwargs = generation_lengths(self._model, generation_kwargs, input_ids.shape[1])
        with torch.no_grad():
            s = self.prepare(
                input_ids,
                attention_mask,
                pixel_values,
                budget=budget,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                image_sizes=image_sizes,
                query_mask=query_mask,
            )
        gen_inputs = {"input_ids": s.input_ids, "inputs_embeds": s.inputs_embeds, "attention_mask": s.attention_mask}
        if self._prunes_in_llm(s):
            with self._in_llm_run(s) as run:
                out = self._model.generate(**gen_inputs, **generation_kwargs)
            self.last_in_llm = run
        else:
            out = self._model.generate(**gen_inputs, **generation_kwargs)
        short_len = s.input_ids.shape[1]
        seq = out if isinstance(out, torch.Tensor) else out.sequences
        if seq.shape[0] % input_ids.shape[0]:
            raise ValueError(f"generate returned {seq.shape[0]} sequences for {input_ids.shape[0]} prompts")
        prompt = input_ids.repeat_interleave(seq.shape[0] // input_ids.shape[0], dim=0).to(seq.device)
        seq = torch.cat([prompt, seq[:, short_len:]], dim=1)
        if isinstance(out, torch.Tensor):
            return seq
        out.sequences = seq
        return out


def wrap(
    model: nn.Module,
    allocator: Allocator | str,
    budget: int | Sequence[int] | torch.Tensor = 64,
    **options: Any,
) -> LlavaAllocation:
    """Put ``allocator`` (an instance or a registered name) between projector and LLM.

    ``budget``: image tokens per image, an int or one per prompt. ``options``: ``grid``,
    ``num_prefix_tokens``, ``keep_prefix``, ``padding_side``, ``allocator_dtype``,
    ``query`` and ``processor`` (the query rule), ``relevance`` (``"embeddings"``,
    ``"text_tower"`` / a :class:`~arr_coc.integrations.signals.TextTower`, or an
    :class:`~arr_coc.integrations.signals.LLMLayer`) and ``text_tower`` (the paired CLIP /
    SigLIP for host signals); see the module docstring and :class:`LlavaAllocation`.
    The model is not modified; ``unwrap()`` returns it.
    """
    return LlavaAllocation(model, allocator, budget, **options)


# ---------------------------------------------------------------------- forks
class ProjectorHook:
    """A forward hook on a projector that returns only the allocated tokens.

    For haotian-liu-style LLaVA forks, whose ``prepare_inputs_labels_for_multimodal``
    splices each image's features by their length (``cur_image_features.shape[0]``), so a
    shorter projector output is all it takes. The projector output ``[I, P + N, D]`` is
    replaced by ``[I, K, D]`` (prefix tokens first when ``keep_prefix``). Every image must
    get the same K (a fixed budget; adaptive allocators that keep fewer raise). Call
    :meth:`set_query` before each forward/generate for query-aware allocators, and
    :meth:`eject` (or use ``with``) to remove the hook; the projector is never edited.

    A query is used **once**: the projector call that follows :meth:`set_query` consumes
    it. Once a query has been set, a later projector call without a fresh
    :meth:`set_query` raises ``ValueError`` instead of silently reusing the previous
    batch's query; ``set_query(None)`` switches back to query-agnostic calls. The query
    must have one row per image of the call (``[I, T, D]``).
    """

    def __init__(
        self,
        projector: nn.Module,
        allocator: Allocator | str,
        budget: int | Sequence[int] | torch.Tensor,
        *,
        grid: tuple[int, int] | None = None,
        num_prefix_tokens: int = 0,
        keep_prefix: bool = True,
    ) -> None:
        self.allocator = create_allocator(allocator) if isinstance(allocator, str) else allocator
        self.budget = budget
        self.grid = grid
        self.num_prefix_tokens = num_prefix_tokens
        self.keep_prefix = keep_prefix
        self.query: torch.Tensor | None = None
        self.query_mask: torch.Tensor | None = None
        self.last: AllocationOutput | None = None
        self._query_mode = False  # True once a query was set: every call then needs a fresh one
        self._handle = projector.register_forward_hook(self._hook)

    def set_query(self, query: torch.Tensor | None, query_mask: torch.Tensor | None = None) -> "ProjectorHook":
        """query [I, T, D] (one row per image the next projector call sees), mask [I, T] bool.

        Used by the next projector call only. ``None`` makes the following calls
        query-agnostic.
        """
        if query is not None and (not isinstance(query, torch.Tensor) or query.dim() != 3):
            raise ValueError(f"query: expected an [I, T, D] tensor or None, got {getattr(query, 'shape', query)!r}")
        if query is None and query_mask is not None:
            raise ValueError("query_mask: given without a query")
        self.query, self.query_mask = query, query_mask
        self._query_mode = query is not None
        return self

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.dim() != 3:
            raise ValueError(f"projector output: expected [I, P + N, D], got {tuple(output.shape)}")
        num = output.shape[0]
        query, query_mask = self.query, self.query_mask
        if query is None and self._query_mode:
            raise ValueError(
                "query: the query set for the previous projector call was used already; call set_query(...) "
                "before each forward / generate (or set_query(None) for query-agnostic calls)"
            )
        if query is not None and query.shape[0] != num:
            raise ValueError(
                f"query: expected one row per image of this projector call ({num}), got {tuple(query.shape)}"
            )
        self.query = self.query_mask = None  # consumed: never reused on a later batch
        budget = normalize_budget(self.budget, num, output.device)
        out = self.allocator(
            output,
            query=query,
            query_mask=query_mask,
            budget=budget,
            grid=self.grid,
            num_prefix_tokens=self.num_prefix_tokens,
        )
        if not bool(out.mask.all()):
            raise ValueError(
                f"budget: the fork splices one tensor, so every image needs the same number of tokens; "
                f"got {out.counts.tolist()}"
            )
        self.last = out
        tokens = out.tokens.to(output.dtype)
        p = self.num_prefix_tokens
        if p and self.keep_prefix:
            tokens = torch.cat([output[:, :p], tokens], dim=1)
        return tokens

    def eject(self) -> None:
        """Remove the hook; the projector behaves as before."""
        self._handle.remove()

    remove = eject

    def __enter__(self) -> "ProjectorHook":
        return self

    def __exit__(self, *exc: object) -> None:
        self.eject()


def hook_projector(
    projector: nn.Module,
    allocator: Allocator | str,
    budget: int | Sequence[int] | torch.Tensor = 64,
    **options: Any,
) -> ProjectorHook:
    """Attach an allocator to a fork's projector (``model.get_model().mm_projector``).

    ``options``: ``grid``, ``num_prefix_tokens``, ``keep_prefix``. See :class:`ProjectorHook`.
    """
    return ProjectorHook(projector, allocator, budget, **options)
