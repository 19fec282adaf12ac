"""Frozen host VLMs for stage 2: one small interface over the embedded base VLM, LLaVA and Qwen-VL.

``ARRCOCModule`` trains an allocator between a host's vision side and its language model,
with the host frozen. Every host offers the same five things (:class:`Host`):

```python
enc = host.encode_image(batch)            # VisionTokens: tokens [B, P + N, Dv], grid (H, W), P
projected = host.project(enc.tokens)      # [B, K, Dv] -> [B, K, Dl] (the host's projector)
query, query_mask = host.query(batch)     # [B, T, Dl], [B, T] bool: the question's own embeddings
ans = host.answer(visual, visual_mask, visual_positions, batch)
ans.loss                                  # scalar: teacher-forced answer cross-entropy (nats / token)
ans.correct                               # [B] bool: every answer token is the argmax
```

``visual`` [B, K, Dl] are the kept tokens (the allocator's ``out.tokens``, in the LLM's
space), ``visual_mask`` [B, K] bool the real ones, ``visual_positions`` [B, K, 3] their
(row, col, level) on the grid (or None: the N fine tokens in raster order).

Implementations:

- :class:`EmbeddedHost` wraps the embedded :class:`~arr_coc.training.base_vlm.BaseVLM`
  (one-word answers: the batch of ``arr_coc.training.datamodule``); its calls are exactly
  those ``ARRCOCModule`` always made, so training on it is unchanged bit for bit.
- :class:`LlavaHost`: ``transformers`` ``LlavaForConditionalGeneration``. ``encode_image`` is
  the vision tower's hidden state at ``vision_feature_layer`` with the select strategy
  (``default`` drops the CLS: P = 0; ``full`` keeps it: P = 1), ``project`` the model's
  ``multi_modal_projector``; together they are the model's own ``get_image_features``.
- :class:`QwenVLHost`: ``Qwen2VLForConditionalGeneration`` and
  ``Qwen2_5_VLForConditionalGeneration``. ``encode_image`` returns the *merged* tokens of the
  vision tower (its 2x2 patch merger is the projector, so they already live in the LLM's
  space and ``project`` is the identity) on the merged grid ``(h / m, w / m)``, P = 0.

Both transformers hosts read the batch of :class:`arr_coc.training.llava_data.ChatCollator`:
``input_ids`` / ``attention_mask`` / ``labels`` [B, L] of whole conversations (right-padded;
one image placeholder run per example, as the host's processor expands it; ``labels`` -100
everywhere but on the assistant answers), the processor's pixel inputs (``pixel_values``,
and ``image_grid_thw`` for Qwen-VL) and ``question_ids`` / ``question_mask`` [B, T] (the
user's questions only: the allocator's query). ``answer`` puts the kept tokens into the first
K slots of the image run, drops the rest of the run and the pads
(:mod:`arr_coc.integrations._common`, as the plug-ins do at inference), and runs the frozen
language model with teacher forcing. LLaVA gets contiguous positions (``cumsum - 1``); a
Qwen-VL kept token keeps the M-RoPE position of its grid cell (a pooled token that of its
region's top-left cell) from the model's public ``get_rope_index`` on the full sequence, and
every text token its original position, as :mod:`arr_coc.integrations.qwen_vl` does. With
the ``full`` allocator the language model therefore sees exactly the unmodified model's
sequence, and the loss equals the model's own loss on the batch (tested).

Hosts are plain objects, not modules: ``host.model`` is the ``nn.Module`` to register (and
freeze) in the Lightning module, so that its weights sit under one prefix (``vlm.``) that
checkpoints drop. Features come out in float32 whatever the host's dtype (the allocator's
dtype); the kept tokens go back to the language model in its own dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from arr_coc.integrations._common import (
    compaction_plan,
    gather_sequence,
    image_runs,
    position_ids_from_mask,
    splice_runs,
)

__all__ = [
    "EmbeddedHost",
    "Host",
    "HostAnswer",
    "LlavaHost",
    "QwenVLHost",
    "VisionTokens",
    "as_host",
    "teacher_forced_accuracy",
]


# ---------------------------------------------------------------------------- contract
@dataclass
class VisionTokens:
    """Candidate vision tokens of a batch: ``tokens`` [B, P + N, Dv] (prefix first, then the
    N = H x W grid in raster order), ``grid`` (H, W), ``num_prefix_tokens`` P."""

    tokens: torch.Tensor
    grid: tuple[int, int]
    num_prefix_tokens: int


@dataclass
class HostAnswer:
    """What :meth:`Host.answer` returns.

    loss:    scalar, the answer cross-entropy (nats per answer token, teacher forcing).
    correct: [B] bool, every answer token of the example is the language model's argmax.
    logits:  the logits the loss was computed from ([B, V] for the embedded host, [B, L', V]
             for a transformers host).
    """

    loss: torch.Tensor
    correct: torch.Tensor
    logits: torch.Tensor


@runtime_checkable
class Host(Protocol):
    """A frozen VLM that an allocator is trained on (see the module docstring)."""

    model: nn.Module
    num_prefix_tokens: int
    vision_dim: int
    llm_dim: int
    #: pooled candidates reach the LLM as project(mean of vision tokens) (the embedded base
    #: VLM was trained so); False: as the mean of projected tokens, as the plug-ins feed them
    pooled_in_vision_space: bool

    @property
    def grid(self) -> tuple[int, int]: ...

    def encode_image(self, batch: Mapping[str, Any]) -> VisionTokens: ...

    def project(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def query(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def answer(
        self,
        visual: torch.Tensor,
        visual_mask: torch.Tensor,
        visual_positions: torch.Tensor | None,
        batch: Mapping[str, Any],
        *,
        prefix: torch.Tensor | None = None,
    ) -> HostAnswer: ...


def as_host(vlm: Any) -> Host:
    """A :class:`Host` for ``vlm``: hosts pass through, a ``BaseVLM`` (or any module with its
    interface) is wrapped in :class:`EmbeddedHost`, a transformers LLaVA or Qwen-VL model in
    :class:`LlavaHost` / :class:`QwenVLHost`."""
    if isinstance(vlm, (EmbeddedHost, LlavaHost, QwenVLHost)):
        return vlm
    if isinstance(vlm, nn.Module):
        if all(hasattr(vlm, a) for a in ("encode_image", "project", "query_embeddings", "answer_logits")):
            return EmbeddedHost(vlm)
        if _qwen_family(vlm) is not None:
            return QwenVLHost(vlm)
        if all(hasattr(vlm, a) for a in ("get_image_features", "get_input_embeddings")) and hasattr(
            getattr(vlm, "model", None), "multi_modal_projector"
        ):
            return LlavaHost(vlm)
    if isinstance(vlm, Host):
        return vlm
    raise ValueError(
        f"vlm: expected a Host, a BaseVLM, a transformers LlavaForConditionalGeneration or a Qwen2-VL / "
        f"Qwen2.5-VL model, got {type(vlm).__name__}"
    )


def teacher_forced_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] bool: every labelled token is the argmax of the previous position's logits.

    logits [B, L, V], labels [B, L] (-100 = not a target; targets are shifted by one, as in
    causal-LM training). An example without any target counts as not correct.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits/labels: expected [B, L, V] and [B, L], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    scored = target != -100
    return ((pred == target) | ~scored).all(1) & scored.any(1)


def _check_batch(batch: Mapping[str, Any], keys: tuple[str, ...], host: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(
            f"batch: {host} needs {list(keys)}; missing {missing} (build batches with "
            "arr_coc.training.llava_data.ChatCollator)"
        )


def _query_embeddings(model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    _check_batch(batch, ("question_ids", "question_mask"), type(model).__name__)
    ids = batch["question_ids"]
    if ids.dim() != 2 or batch["question_mask"].shape != ids.shape:
        raise ValueError(f"question_ids/question_mask: expected two [B, T] tensors, got {tuple(ids.shape)}")
    return model.get_input_embeddings()(ids).float(), batch["question_mask"].bool()


def _check_visual(visual: torch.Tensor, visual_mask: torch.Tensor, dim: int, batch_size: int) -> torch.Tensor:
    if visual.dim() != 3 or visual.shape[0] != batch_size or visual.shape[-1] != dim:
        raise ValueError(f"visual: expected [{batch_size}, K, {dim}], got {tuple(visual.shape)}")
    if visual_mask is None:
        return torch.ones(visual.shape[:2], dtype=torch.bool, device=visual.device)
    if visual_mask.shape != visual.shape[:2]:
        raise ValueError(f"visual_mask: expected {tuple(visual.shape[:2])}, got {tuple(visual_mask.shape)}")
    return visual_mask.bool()


def _fine_positions(grid: tuple[int, int], batch_size: int, device: torch.device) -> torch.Tensor:
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten(), torch.zeros(h * w, dtype=torch.long, device=device)], -1)
    return pos[None].expand(batch_size, -1, -1)


def _real_first(visual: torch.Tensor, mask: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Reorder the K axis so that real tokens come first, their order kept."""
    order = (~mask).to(torch.int8).argsort(dim=1, stable=True)  # [B, K]
    out = [visual.gather(1, order[..., None].expand(-1, -1, visual.shape[-1])), mask.gather(1, order)]
    for t in others:
        out.append(t.gather(1, order[..., None].expand(-1, -1, t.shape[-1])) if t.dim() == 3 else t.gather(1, order))
    return tuple(out)


# ---------------------------------------------------------------------------- embedded
class EmbeddedHost:
    """The embedded :class:`~arr_coc.training.base_vlm.BaseVLM` (one-word answers).

    Batch: ``pixels`` [B, 3, H, W], ``question_ids`` / ``question_mask`` [B, T], ``answer`` [B]
    (the answer's token id). The loss is the cross-entropy of the answer word at ``[READ]``.
    """

    pooled_in_vision_space = True

    def __init__(self, vlm: nn.Module) -> None:
        self.model = vlm

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def vision_dim(self) -> int:
        return int(self.model.vision_dim)

    @property
    def llm_dim(self) -> int:
        return int(self.model.llm_dim)

    @property
    def grid(self) -> tuple[int, int]:
        g = self.model.grid
        return (int(g), int(g)) if isinstance(g, int) else (int(g[0]), int(g[1]))

    def encode_image(self, batch: Mapping[str, Any]) -> VisionTokens:
        return VisionTokens(self.model.encode_image(batch["pixels"]), self.grid, self.num_prefix_tokens)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.project(tokens)

    def query(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.query_embeddings(batch["question_ids"]), batch["question_mask"]

    def answer(self, visual, visual_mask, visual_positions, batch, *, prefix=None) -> HostAnswer:
        # the prefix (CLS) is never given to the base VLM's LLM (see base_vlm)
        logits = self.model.answer_logits(
            visual, visual_mask, visual_positions, batch["question_ids"], batch["question_mask"]
        )  # [B, vocab]
        loss = F.cross_entropy(logits.float(), batch["answer"])
        return HostAnswer(loss=loss, correct=logits.argmax(-1) == batch["answer"], logits=logits)


# ---------------------------------------------------------------------------- transformers
class _HFHost:
    """What the transformers hosts share: the frozen model, the query, the loss."""

    pooled_in_vision_space = False

    def __init__(self, model: nn.Module, image_size: int | tuple[int, int] | None = None) -> None:
        self.model = model
        self.image_token_id = _config_get(model.config, "image_token_id", "image_token_index")
        if self.image_token_id is None:
            raise ValueError(f"model: {type(model).__name__}'s config has no image_token_id / image_token_index")
        self.image_token_id = int(self.image_token_id)
        if image_size is not None:
            image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        self.image_size = image_size

    @property
    def llm_dim(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def query(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return _query_embeddings(self.model, batch)

    def _batch_text(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_batch(batch, ("input_ids", "attention_mask", "labels"), type(self).__name__)
        ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        if ids.dim() != 2 or attn.shape != ids.shape or labels.shape != ids.shape:
            raise ValueError(
                f"input_ids/attention_mask/labels: expected three [B, L] tensors, got {tuple(ids.shape)}, "
                f"{tuple(attn.shape)}, {tuple(labels.shape)}"
            )
        return ids, attn, labels

    def _image_columns(self, ids: torch.Tensor, attn: torch.Tensor, n: int) -> torch.Tensor:
        """[B, n] sequence columns of each example's one image run."""
        image_mask = (ids == self.image_token_id) & attn.bool()
        cols, rows = image_runs(image_mask, n, ids.shape[0])
        if not torch.equal(rows, torch.arange(ids.shape[0], device=ids.device)):
            raise ValueError("input_ids: expected exactly one image placeholder run per example")
        return cols

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> HostAnswer:
        vocab = self.model.config.get_text_config().vocab_size
        loss = self.model.loss_function(logits=logits, labels=labels, vocab_size=vocab)
        return HostAnswer(loss=loss, correct=teacher_forced_accuracy(logits, labels), logits=logits)


class LlavaHost(_HFHost):
    """A frozen ``transformers`` ``LlavaForConditionalGeneration`` (see the module docstring).

    Args:
        model: the model (its weights are not modified; ``ARRCOCModule`` freezes it).
        image_size: the pixel size the processor produces (default: the vision config's
            ``image_size``); the grid is ``image_size // patch_size``.
        keep_prefix: give the prefix tokens (the CLS under ``vision_feature_select_strategy=
            "full"``) to the language model in front of the kept tokens, as the model was
            trained; they do not count against the budget.
    """

    def __init__(self, model: nn.Module, *, image_size: int | tuple[int, int] | None = None, keep_prefix: bool = True):
        for attr in ("get_input_embeddings", "get_image_features", "config"):
            if not hasattr(model, attr):
                raise ValueError(f"model: expected a LlavaForConditionalGeneration, got {type(model).__name__}")
        vcfg = model.config.vision_config
        super().__init__(model, image_size if image_size is not None else getattr(vcfg, "image_size", None))
        patch = vcfg.patch_size
        self.patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        self.feature_layer = model.config.vision_feature_layer
        self.strategy = model.config.vision_feature_select_strategy
        if self.strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy: expected 'default' or 'full', got {self.strategy!r}")
        self.keep_prefix = keep_prefix

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str | torch.dtype | None = None, image_size=None,
                        keep_prefix: bool = True, **kwargs: Any) -> LlavaHost:
        """Load ``LlavaForConditionalGeneration`` from a folder or Hub id (``dtype``: e.g. "bfloat16")."""
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=_dtype(dtype), **kwargs)
        return cls(model, image_size=image_size, keep_prefix=keep_prefix)

    @property
    def grid(self) -> tuple[int, int]:
        if self.image_size is None:
            raise ValueError("image_size: the vision config has none; pass image_size= to LlavaHost")
        return (self.image_size[0] // self.patch[0], self.image_size[1] // self.patch[1])

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.strategy == "full" and self._has_cls() else 0

    def _has_cls(self) -> bool:
        return hasattr(getattr(self.model.model.vision_tower, "vision_model", None), "embeddings") and hasattr(
            self.model.model.vision_tower.vision_model.embeddings, "class_embedding"
        )

    @property
    def vision_dim(self) -> int:
        layers = self.feature_layer if isinstance(self.feature_layer, (list, tuple)) else [self.feature_layer]
        return int(self.model.config.vision_config.hidden_size) * len(layers)

    def encode_image(self, batch: Mapping[str, Any]) -> VisionTokens:
        """The vision tower's features at ``vision_feature_layer`` after the select strategy."""
        _check_batch(batch, ("pixel_values",), "LlavaHost")
        pixels = batch["pixel_values"]
        if pixels.dim() != 4:
            raise ValueError(f"pixel_values: expected [B, C, H, W], got {tuple(pixels.shape)}")
        tower = self.model.model.vision_tower
        out = tower(pixels.to(self.dtype), output_hidden_states=True, return_dict=True)
        layers = self.feature_layer if isinstance(self.feature_layer, (list, tuple)) else [self.feature_layer]
        feats = [out.hidden_states[i] for i in layers]
        if self.strategy == "default":
            feats = [f[:, 1:] for f in feats]
        tokens = torch.cat(feats, dim=-1).float()  # [B, P + N, Dv]
        grid = (pixels.shape[-2] // self.patch[0], pixels.shape[-1] // self.patch[1])
        p = tokens.shape[1] - grid[0] * grid[1]
        if p < 0:
            raise ValueError(f"pixel_values: {tokens.shape[1]} features do not cover the grid {grid}")
        return VisionTokens(tokens, grid, p)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's ``multi_modal_projector``: [B, K, Dv] -> [B, K, Dl] (float32 out)."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.vision_dim:
            raise ValueError(f"tokens: expected [B, K, {self.vision_dim}], got {tuple(tokens.shape)}")
        return self.model.model.multi_modal_projector(tokens.to(self.dtype)).float()

    def answer(self, visual, visual_mask, visual_positions, batch, *, prefix=None) -> HostAnswer:
        ids, attn, labels = self._batch_text(batch)
        b = ids.shape[0]
        visual_mask = _check_visual(visual, visual_mask, self.llm_dim, b)
        embed = self.model.get_input_embeddings()
        embeds = embed(ids)  # [B, L, D]
        tokens, mask = visual.to(embeds.dtype), visual_mask
        if prefix is not None and prefix.shape[1] and self.keep_prefix:
            tokens = torch.cat([prefix.to(embeds.dtype), tokens], dim=1)
            mask = torch.cat([mask.new_ones(b, prefix.shape[1]), mask], dim=1)
        n_run = int(((ids == self.image_token_id) & attn.bool()).sum()) // max(b, 1)
        cols = self._image_columns(ids, attn, max(n_run, 1))  # [B, P + N]
        embeds, keep = splice_runs(embeds, attn.bool(), cols, torch.arange(b, device=ids.device), tokens, mask)
        plan = compaction_plan(keep, padding_side="right")
        new_mask = plan.valid.long()
        out = self.model(
            inputs_embeds=gather_sequence(embeds, plan, 0),
            attention_mask=new_mask,
            position_ids=position_ids_from_mask(new_mask),
            use_cache=False,
        )
        return self._loss(out.logits, gather_sequence(labels, plan, -100))


def _qwen_family(model: nn.Module) -> str | None:
    """The Qwen-VL family tag of ``model`` (the plug-in's ``SUPPORTED_MODELS``), or None."""
    import transformers

    from arr_coc.integrations.qwen_vl import SUPPORTED_MODELS

    for name, tag in SUPPORTED_MODELS.items():
        cls = getattr(transformers, name, None)
        if cls is not None and isinstance(model, cls):
            return tag
    return None


class QwenVLHost(_HFHost):
    """A frozen Qwen2-VL / Qwen2.5-VL model (see the module docstring).

    The candidates are each image's merged tokens on the merged grid; ``image_size`` (the
    pixel size the processor produces, a multiple of ``patch_size * merge_size``) gives the
    default grid (before the first batch is seen). One image per example, one grid per batch
    (the collator resizes every image to one size).
    """

    def __init__(self, model: nn.Module, *, image_size: int | tuple[int, int] | None = None):
        family = _qwen_family(model)
        if family is None or family == "qwen3_vl":
            raise ValueError(
                f"model: expected a Qwen2VLForConditionalGeneration or Qwen2_5_VLForConditionalGeneration, "
                f"got {type(model).__name__}"
            )
        super().__init__(model, image_size)
        self.family = family
        vcfg = model.config.vision_config
        self.merge = int(vcfg.spatial_merge_size)
        self.patch = int(vcfg.patch_size)
        self._grid: tuple[int, int] | None = None
        if self.image_size is not None:
            unit = self.patch * self.merge
            if self.image_size[0] % unit or self.image_size[1] % unit:
                raise ValueError(f"image_size: expected multiples of patch_size * merge_size = {unit}, got {self.image_size}")
            self._grid = (self.image_size[0] // unit, self.image_size[1] // unit)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str | torch.dtype | None = None, image_size=None,
                        **kwargs: Any) -> QwenVLHost:
        """Load a Qwen2-VL / Qwen2.5-VL model from a folder or Hub id."""
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(path, dtype=_dtype(dtype), **kwargs)
        return cls(model, image_size=image_size)

    num_prefix_tokens = 0

    @property
    def grid(self) -> tuple[int, int]:
        if self._grid is None:
            raise ValueError("image_size: unknown until the first batch; pass image_size= to QwenVLHost")
        return self._grid

    @property
    def vision_dim(self) -> int:
        return self.llm_dim  # merged tokens are already in the LLM's space

    def _merged_grid(self, batch: Mapping[str, Any]) -> tuple[int, int]:
        _check_batch(batch, ("pixel_values", "image_grid_thw"), "QwenVLHost")
        thw = torch.as_tensor(batch["image_grid_thw"]).long()
        if thw.dim() != 2 or thw.shape[1] != 3 or (thw[:, 0] != 1).any():
            raise ValueError(f"image_grid_thw: expected [B, 3] rows (1, h, w), got {thw.tolist()}")
        if not (thw == thw[:1]).all():
            raise ValueError(f"image_grid_thw: expected one image size per batch (resize the images), got {thw.tolist()}")
        return (int(thw[0, 1]) // self.merge, int(thw[0, 2]) // self.merge)

    def encode_image(self, batch: Mapping[str, Any]) -> VisionTokens:
        """The vision tower's merged tokens: [B, h/m * w/m, Dl] on the merged grid, P = 0."""
        grid = self._merged_grid(batch)
        thw = torch.as_tensor(batch["image_grid_thw"], device=batch["pixel_values"].device).long()
        vis = self.model.get_image_features(pixel_values=batch["pixel_values"], image_grid_thw=thw, return_dict=True)
        tokens = torch.stack(list(vis.pooler_output)).float()  # [B, N, Dl]
        if self._grid is None:
            self._grid = grid
        return VisionTokens(tokens, grid, 0)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """The identity: the merger already projected the tokens."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.llm_dim:
            raise ValueError(f"tokens: expected [B, K, {self.llm_dim}], got {tuple(tokens.shape)}")
        return tokens

    def answer(self, visual, visual_mask, visual_positions, batch, *, prefix=None) -> HostAnswer:
        ids, attn, labels = self._batch_text(batch)
        b = ids.shape[0]
        device = ids.device
        visual_mask = _check_visual(visual, visual_mask, self.llm_dim, b)
        h, w = self._merged_grid(batch)
        if visual_positions is None:
            if visual.shape[1] != h * w:
                raise ValueError(
                    f"visual_positions: None means the {h * w} fine tokens, got K={visual.shape[1]}; Qwen-VL needs "
                    "each kept token's grid cell for its M-RoPE position (ARRCOCModule(use_positions=True))"
                )
            visual_positions = _fine_positions((h, w), b, device)
        if visual_positions.shape != (*visual.shape[:2], 3):
            raise ValueError(f"visual_positions: expected {(*visual.shape[:2], 3)}, got {tuple(visual_positions.shape)}")
        thw = torch.as_tensor(batch["image_grid_thw"], device=device).long()
        embed = self.model.get_input_embeddings()
        embeds = embed(ids)  # [B, L, D]
        full_pos, _ = self.model.model.get_rope_index(input_ids=ids, image_grid_thw=thw, attention_mask=attn)
        pos_seq = rearrange(full_pos.to(device), "c b l -> b l c")  # [B, L, 3]
        cols = self._image_columns(ids, attn, h * w)  # [B, n]
        if visual.shape[1] > cols.shape[1]:
            raise ValueError(f"visual: {visual.shape[1]} tokens for an image of {cols.shape[1]} merged tokens")
        tokens, mask, where = _real_first(visual.to(embeds.dtype), visual_mask, visual_positions.long())
        # the source column of each kept token: its grid cell (a pooled token: the top-left one)
        cell = cols[:, :1] + where[..., 0].clamp(0, h - 1) * w + where[..., 1].clamp(0, w - 1)  # [B, K]
        slots = cols[:, : tokens.shape[1]]  # [B, K]: the run's first K columns take the kept tokens
        cell_pos = pos_seq.gather(1, cell[..., None].expand(-1, -1, 3))
        slot_pos = pos_seq.gather(1, slots[..., None].expand(-1, -1, 3))
        pos_seq = pos_seq.scatter(1, slots[..., None].expand(-1, -1, 3), torch.where(mask[..., None], cell_pos, slot_pos))
        embeds, keep = splice_runs(embeds, attn.bool(), cols, torch.arange(b, device=device), tokens, mask)
        plan = compaction_plan(keep, padding_side="right")
        out = self.model.get_decoder()(
            inputs_embeds=gather_sequence(embeds, plan, 0),
            attention_mask=plan.valid.long(),
            position_ids=rearrange(gather_sequence(pos_seq, plan, 0), "b l c -> c b l"),
            use_cache=False,
            return_dict=True,
        )
        logits = self.model.get_output_embeddings()(out.last_hidden_state)
        return self._loss(logits, gather_sequence(labels, plan, -100))


# ---------------------------------------------------------------------------- helpers
def _config_get(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype: expected a torch dtype name such as 'bfloat16', got {dtype!r}")
    return value
