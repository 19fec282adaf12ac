"""What an allocator may ask of the model it runs in: the host-signal interface.

Published pruners read signals of the host VLM that plain tokens do not carry: the vision
tower's own [CLS] attention (FasterVLM, VisionZip), its attention keys (ToMe, VisionZip's
merging), the paired CLIP text tower's embedding of the instruction (CDPruner), or the
LLM's attention at an early layer (FastV, SparseVLM). A host (the embedded base VLM:
:class:`arr_coc.training.base_host.BaseVLMHost`; the LLaVA / Qwen-VL plug-ins later) hands
them over on demand:

```python
out = allocator(tokens, query=..., budget=64, grid=(16, 16), num_prefix_tokens=1, host=host)
host.vision_attention(-2)   # [B, heads, P+N, P+N] softmax attention of the vision tower's block -2
host.vision_keys(-2)        # [B, P+N, Dh] that block's attention keys, averaged over heads
host.text_features()        # ([B, T, Dj], [B, T] bool): the text tower's per-token instruction features
host.text_embedding()       # [B, Dj]: the text tower's pooled (eos) embedding of the instruction
host.patch_features()       # [B, N, Dj]: the patch tokens in the same joint (CLIP) space
host.vision_output()        # [B, P+N, Dv] the tower's output tokens; host.to_token_space(x) maps them
                            # into the space of the allocator's patch tokens (e.g. through the projector)
host.vision_merge(r)        # VisionMerge: the tower re-run with ToMe merging r[b, l] tokens in block l
```

Layers count from 0; a negative layer counts from the end (``-1`` the last block, ``-2``
the penultimate one, the layer LLaVA reads and VisionZip / FasterVLM take attention from).
Every signal is computed lazily, once per batch, and cached by the host. Token order is
the host's: P prefix tokens (CLS, registers) first, then the N patches in raster order,
the same order as the ``patch_tokens`` the allocator receives. Keys are averaged over heads
(``k.mean(heads)``), as ToMe's ``metric`` and VisionZip's ``raw_key_states.mean(1)`` are.
``text_features`` / ``text_embedding`` / ``patch_features`` are L2-normalised and live in the
joint (CLIP) space; ``text_embedding`` is the pooled CLIP text embedding (what
``CLIPTextModelWithProjection.text_embeds`` is, and what CDPruner's release reads); it is
optional in the protocol (hosts without it raise :class:`SignalUnavailable`).

A host that cannot give a signal raises :class:`SignalUnavailable` (a ``ValueError``)
naming it; allocators ask through :func:`request_signal`, which also turns a missing method
into that error, so "this method needs X, the host has no X" is always one clear message.

In-LLM methods (FastV, SparseVLM) cannot choose before the LLM runs. They set the class
attribute ``in_llm = True`` and implement the :class:`InLLMPruner` protocol; a host that
can run its LLM layer by layer (:class:`InLLMHost`) calls them between layers:

```python
logits = host.answer_in_llm(pruner, visual, visual_mask, visual_positions,
                            question_ids, question_mask, budget)          # [B, V]
logits, trace = host.answer_in_llm(..., return_trace=True)                # + InLLMTrace
```

The host's sequence is always ``[Kc visual slots] [text tokens]`` (the visual slots first,
padded per row with ``visual_mask``; the text is the question plus the readout token, the
readout last). After each layer ``l`` in ``pruner.prune_layers(num_layers)`` has run, the
host calls ``pruner.prune(state)`` with an :class:`LLMLayerState` (that layer's output
hidden states and its softmax attention), and the pruner answers a :class:`PruneDecision`:
which visual slots survive (indices into the current Kc slots) and, optionally, new visual
tokens appended after them (SparseVLM's recycled tokens). The host drops the others from
the hidden states, the attention mask and the position ids (the survivors keep their
position ids) and runs the next layers on the shorter sequence. "Prune after layer K-1"
is FastV's "prune at layer K with the attention of layer K-1".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

__all__ = [
    "HostSignals",
    "InLLMHost",
    "InLLMPruner",
    "InLLMTrace",
    "LLMLayerState",
    "PruneDecision",
    "SignalUnavailable",
    "VisionMerge",
    "request_signal",
    "resolve_layer",
]


class SignalUnavailable(ValueError):
    """The host cannot give a signal an allocator needs (the message names the signal)."""


@runtime_checkable
class HostSignals(Protocol):
    """The per-batch signals of a host model (see the module docstring)."""

    def vision_attention(self, layer: int) -> torch.Tensor:
        """[B, heads, P+N, P+N] softmax attention of the vision tower's block ``layer``."""
        ...

    def vision_keys(self, layer: int) -> torch.Tensor:
        """[B, P+N, Dh] attention keys of block ``layer``, averaged over heads."""
        ...

    def text_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, T, Dj] L2-normalised per-token text-tower features of the instruction, [B, T] bool mask)."""
        ...

    def patch_features(self) -> torch.Tensor:
        """[B, N, Dj] L2-normalised patch tokens in the joint (CLIP) space."""
        ...

    # optional: def text_embedding(self) -> torch.Tensor  ([B, Dj] pooled, L2-normalised)
    # optional: def vision_output(self) -> torch.Tensor  ([B, P+N, Dv] the tower's output tokens) and
    #           def to_token_space(self, x: torch.Tensor) -> torch.Tensor  ([B, K, Dv] -> the allocator's space)
    # optional: def vision_blocks(self) -> int  and
    #           def vision_merge(self, r: torch.Tensor) -> VisionMerge  (ToMe inside the tower)


@dataclass
class VisionMerge:
    """The vision tower's output with ToMe merging inside it (``host.vision_merge(r)``).

    tokens: [B, K, D] the merged patch tokens in the space of the allocator's patch tokens
            (the prefix tokens are not included); sizes [B, K] how many patches each stands
            for; origin [B, K] long the patch each token started as (its ToMe "B" chain);
            mask [B, K] bool (rows are left-packed, padded where a row merged more).
    """

    tokens: torch.Tensor
    sizes: torch.Tensor
    origin: torch.Tensor
    mask: torch.Tensor


def request_signal(host: Any, name: str, *args: Any, requester: str = "this allocator") -> Any:
    """``host.<name>(*args)``, or a :class:`SignalUnavailable` naming the signal and who needs it.

    ``host=None`` (no host given) and a host without the method both raise; a host method
    that raises :class:`SignalUnavailable` itself passes through unchanged.
    """
    if host is None:
        raise SignalUnavailable(f"host: {requester} needs the host signal {name!r}, but no host was given")
    fn = getattr(host, name, None)
    if fn is None or not callable(fn):
        raise SignalUnavailable(
            f"host: {requester} needs the host signal {name!r}, which {type(host).__name__} does not provide"
        )
    return fn(*args)


def resolve_layer(layer: int, num_layers: int, *, name: str = "layer") -> int:
    """A layer index in ``[-num_layers, num_layers)`` -> ``[0, num_layers)`` (ValueError otherwise)."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not -num_layers <= layer < num_layers:
        raise ValueError(f"{name}: expected an int in [-{num_layers}, {num_layers}), got {layer!r}")
    return layer % num_layers


# ---------------------------------------------------------------------------- in-LLM pruning
@dataclass
class LLMLayerState:
    """What an in-LLM pruner sees after layer ``layer`` ran (L = Kc + Tt, current lengths).

    layer:       index of the layer that just ran (0-based).
    num_layers:  layers of the LLM.
    hidden:      [B, L, D] that layer's output hidden states (the next layer's input).
    attention:   [B, H, L, L] that layer's softmax attention (eager: softmax(QK^T / sqrt(d) + mask),
                 RoPE applied, in float32); rows of padded tokens are meaningless.
    visual_mask: [B, Kc] bool, which of the first Kc slots hold a real visual token.
    text_mask:   [B, Tt] bool, which of the last Tt slots hold a real text token (question
                 tokens, then the readout, always real, last).
    inputs_embeds: [B, L0, D] the LLM's input sequence before layer 0 and before any pruning
                 (SparseVLM chooses its text raters from it; at stage 0 its layout is hidden's).
    budget:      [B] long, the number of visual tokens that must remain at the end.
    origin:      [B, Kc] long, for each visual slot the index of the input visual token it
                 stands for (a recycled token: its cluster centre's), -1 where padded.
    stage:       0 for the first call of a forward, 1 for the next...
    memory:      a dict the pruner may use to carry state between the calls of one forward.
    """

    layer: int
    num_layers: int
    hidden: torch.Tensor
    attention: torch.Tensor
    visual_mask: torch.Tensor
    text_mask: torch.Tensor
    inputs_embeds: torch.Tensor
    budget: torch.Tensor
    origin: torch.Tensor
    stage: int = 0
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def num_visual_slots(self) -> int:
        return self.visual_mask.shape[1]

    @property
    def text_slice(self) -> slice:
        return slice(self.num_visual_slots, self.hidden.shape[1])

    @property
    def visual_slice(self) -> slice:
        return slice(0, self.num_visual_slots)


@dataclass
class PruneDecision:
    """An in-LLM pruner's answer.

    keep:       [B, K'] long indices into the current Kc visual slots (any order), -1 padded.
    new_tokens: optional [B, C, D] hidden states appended after the kept visual slots
                (SparseVLM's recycled tokens); new_mask [B, C] bool marks the real ones and
                new_origin [B, C] long the input visual index each is reported at.
    extras:     anything worth reporting (scores, raters...).
    """

    keep: torch.Tensor
    new_tokens: torch.Tensor | None = None
    new_mask: torch.Tensor | None = None
    new_origin: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class InLLMTrace:
    """What remained at the end of an in-LLM forward.

    kept:       [B, K] long, indices into the input visual tokens of the visual tokens the
                last layers saw (a recycled token at its cluster centre), -1 padded.
    mask:       [B, K] bool.
    counts:     per pruning call, [B] visual tokens left after it.
    extras:     the pruner's extras, per call.
    """

    kept: torch.Tensor
    mask: torch.Tensor
    counts: list[torch.Tensor] = field(default_factory=list)
    extras: list[dict[str, Any]] = field(default_factory=list)


@runtime_checkable
class InLLMPruner(Protocol):
    """An allocator that prunes inside the LLM (class attribute ``in_llm = True``)."""

    in_llm: ClassVar[bool]

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers (0-based, increasing) after which ``prune`` is called."""
        ...

    def prune(self, state: LLMLayerState) -> PruneDecision:
        """Which visual slots survive layer ``state.layer`` (see :class:`LLMLayerState`)."""
        ...


@runtime_checkable
class InLLMHost(Protocol):
    """A host that can run its LLM layer by layer and let a pruner act between layers."""

    def answer_in_llm(
        self,
        pruner: InLLMPruner,
        visual: torch.Tensor,
        visual_mask: torch.Tensor | None,
        visual_positions: torch.Tensor | None,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor | None,
        budget: int | torch.Tensor,
        *,
        return_trace: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, InLLMTrace]:
        """Answer logits [B, V] with ``pruner`` pruning the K visual tokens inside the LLM."""
        ...
