"""Inside a ``transformers`` decoder: attention probabilities and in-LLM pruning, by hooks.

Two things the plug-ins need from a Hugging Face language model that its public API does
not return with fused attention (sdpa, flash):

- :func:`attention_probs`: a layer's softmax attention ``[B, H, L, L]``, recomputed from
  the inputs its attention module received (``q_proj`` / ``k_proj``, the optional per-head
  ``q_norm`` / ``k_norm``, and the rotary function of the model's own modeling module:
  ``apply_rotary_pos_emb``, or ``apply_multimodal_rotary_pos_emb`` with the config's
  ``mrope_section`` for Qwen2-VL / Qwen2.5-VL). Equal to the eager attention weights.
- :class:`InLLMPruning`: runs an in-LLM pruner (:class:`arr_coc.allocators.host.InLLMPruner`,
  FastV / SparseVLM style) between decoder layers during ``forward`` and ``generate``,
  with **forward pre-hooks** (``with_kwargs=True``) on the decoder layers and their
  attention modules, registered for one call and removed afterwards; nothing of
  ``transformers`` is patched or subclassed and the model's weights and config are not
  touched.

How pruning after layer ``l`` works. The pre-hook of layer ``l + 1`` receives layer ``l``'s
output; it builds the pruner's :class:`~arr_coc.allocators.host.LLMLayerState` (a *view*
of the sequence: the row's visual slots first, then the question tokens and the readout
token, the last real token of the prompt, last; see the host protocol), asks the pruner
which visual slots survive, and hands layer ``l + 1`` the shortened hidden states with
matching position embeddings (gathered: every survivor keeps its RoPE position, a recycled
token takes its origin's), position ids and a 4-D attention mask it builds itself (causal
over the compacted order, pads masked, left-padded). Every later layer of that stage gets
the same mask. The KV cache is a ``DynamicCache`` whose layers hold their own lengths:
layers up to ``l`` keep the full prompt, later layers only the survivors. At each decoding
step the hooks give the pruned layers a mask over *their* cache (the survivors, then every
generated token); the position embeddings of new tokens are the model's own (they
continue after the full prompt, as the unpruned layers see them).

Supported: attention implementations that take a 4-D mask (``"sdpa"``, ``"eager"``);
``DynamicCache``; beam search and several sequences per prompt (the pruning decision of a
prompt is the same for all its copies, so the cache reordering of beam search keeps the
layouts valid). Not supported (ValueError): flash attention (2-D masks only), and for
Qwen3-VL a prune layer before the last DeepStack layer (DeepStack writes into the visual
positions of the full sequence after each of its layers).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from arr_coc.allocators.host import InLLMTrace, LLMLayerState, PruneDecision

__all__ = ["InLLMPruning", "attention_probs", "decoder_layers", "rotary_function"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a VLM's language model (``...language_model.layers``)."""
    for path in ("model.language_model", "language_model", "model.language_model.model", "model"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        layers = getattr(obj, "layers", None) if obj is not None else None
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attn"):
            return layers
    raise ValueError(f"model: cannot find the decoder layers of {type(model).__name__}'s language model")


def rotary_function(attn: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``(q, k, cos, sin) -> (q, k)``: the rotary embedding the attention module applies."""
    mod = sys.modules.get(type(attn).__module__)
    config = getattr(attn, "config", None)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    section = rope.get("mrope_section") if isinstance(rope, dict) else None
    multimodal = getattr(mod, "apply_multimodal_rotary_pos_emb", None)
    if multimodal is not None and section is not None:
        return lambda q, k, cos, sin: multimodal(q, k, cos, sin, section)
    plain = getattr(mod, "apply_rotary_pos_emb", None)
    if plain is None:
        raise ValueError(f"model: {type(attn).__name__} has no rotary function in {type(attn).__module__}")
    return plain


def attention_probs(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    allowed: torch.Tensor,
) -> torch.Tensor:
    """Softmax attention [B, H, L, L] (float32) of ``attn`` on its (normed) input.

    hidden_states: [B, L, D] what the attention module received; position_embeddings:
    its ``(cos, sin)``; allowed: [B, L, L] bool, which keys each query may see.
    """
    b, n, _ = hidden_states.shape
    head_dim = int(getattr(attn, "head_dim", attn.q_proj.out_features // attn.config.num_attention_heads))
    q = attn.q_proj(hidden_states).view(b, n, -1, head_dim)
    k = attn.k_proj(hidden_states).view(b, n, -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = position_embeddings
    q, k = rotary_function(attn)(q, k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    scaling = float(getattr(attn, "scaling", head_dim**-0.5))
    scores = (q.float() @ k.float().transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def _gather_seq(x: torch.Tensor | None, index: torch.Tensor, axis: int) -> torch.Tensor | None:
    """Gather ``x`` along its sequence ``axis`` (the batch axis is ``axis - 1``) with index [B, L']."""
    if x is None:
        return None
    b, n = index.shape
    shape = list(x.shape)
    shape[axis - 1] = b
    x = x.expand(*shape)
    view = [1] * x.dim()
    view[axis - 1], view[axis] = b, n
    out_shape = list(shape)
    out_shape[axis] = n
    return x.gather(axis, index.reshape(view).expand(*out_shape))


def _pack_left_pad(keys: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the kept entries of each row by ``keys`` and pack them right (pads first).

    keys [B, M] float, keep [B, M] bool -> (index [B, M'] into M, valid [B, M'] bool).
    """
    b, m = keys.shape
    order = torch.where(keep, keys, torch.full_like(keys, float("inf"))).argsort(dim=1, stable=True)
    counts = keep.sum(1)
    new_len = int(counts.max()) if b else 0
    slot = torch.arange(new_len, device=keys.device)[None]
    rank = slot - (new_len - counts)[:, None]
    valid = rank >= 0
    index = order.gather(1, rank.clamp(min=0)) if new_len else order[:, :0]
    return torch.where(valid, index, torch.zeros_like(index)), valid


class _Layout:
    """One stage's sequence: per slot its original slot, validity, visual origin, question flag."""

    def __init__(self, orig: torch.Tensor, valid: torch.Tensor, origin: torch.Tensor, question: torch.Tensor):
        self.orig, self.valid, self.origin, self.question = orig, valid, origin, question
        self.cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
        self.position_ids: torch.Tensor | None = None
        self.mask: Any = None

    @property
    def is_visual(self) -> torch.Tensor:
        return self.origin >= 0


class InLLMPruning:
    """Run ``pruner`` between the decoder layers of ``model`` for one forward or generate.

    ``with InLLMPruning(model, pruner, attention_mask=..., visual=..., question=..., budget=...) as run:
    model(...)`` (or ``model.generate(...)``); ``run.trace`` is the
    :class:`~arr_coc.allocators.host.InLLMTrace` afterwards and ``run.final`` the last
    layout (``orig [B, L'']``: the prompt slot each final slot comes from, -1 for a
    recycled token; ``valid [B, L'']``).

    attention_mask: [B, L] the prompt's mask (0 = pad) as the language model receives it.
    visual:         [B, L] bool, the visual token slots.
    question:       [B, L] bool, the question's tokens (the text raters' candidates).
    budget:         [B] long, visual tokens that must remain per prompt.
    num_deepstack:  DeepStack layers of a Qwen3-VL model (a prune layer must not precede the last).
    """

    def __init__(
        self,
        model: nn.Module,
        pruner: Any,
        *,
        attention_mask: torch.Tensor,
        visual: torch.Tensor,
        question: torch.Tensor,
        budget: torch.Tensor,
        num_deepstack: int = 0,
    ) -> None:
        self.layers = decoder_layers(model)
        n = len(self.layers)
        impl = getattr(self.layers[0].self_attn.config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise ValueError(
                f"model: in-LLM pruning needs an attention implementation that takes a 4-D mask "
                f"('sdpa' or 'eager'), got {impl!r}"
            )
        self.impl = impl
        layers = tuple(int(x) for x in pruner.prune_layers(n))
        if any(not 0 <= x < n for x in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(f"allocator: prune_layers({n}) gave {layers}, expected increasing layers in [0, {n})")
        self.prune_after = tuple(x for x in layers if x < n - 1)  # pruning after the last layer changes nothing
        if num_deepstack and self.prune_after and self.prune_after[0] < num_deepstack - 1:
            raise ValueError(
                f"allocator: Qwen3-VL injects DeepStack features after layers 0..{num_deepstack - 1}; in-LLM "
                f"pruning must start after layer {num_deepstack - 1} or later, got {self.prune_after[0]}"
            )
        self.pruner = pruner
        self.mask2d = attention_mask.bool()
        self.visual = visual.bool() & self.mask2d
        self.question = question.bool() & self.mask2d & ~self.visual
        self.budget = budget.long()
        self._handles: list[Any] = []
        self.trace: InLLMTrace | None = None
        self.final: _Layout | None = None

    # ------------------------------------------------------------------ set-up
    def __enter__(self) -> InLLMPruning:
        self._prefill_done = False
        self._stage_of = [sum(1 for p in self.prune_after if p < j) for j in range(len(self.layers))]
        self._layouts: list[_Layout] = []
        self._captured: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._memory: dict[str, Any] = {}
        self._counts: list[torch.Tensor] = []
        self._extras: list[dict[str, Any]] = []
        for j, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._make_layer_hook(j), with_kwargs=True))
            if j in self.prune_after:
                self._handles.append(
                    layer.self_attn.register_forward_pre_hook(self._make_attn_hook(j), with_kwargs=True)
                )
        self._handles.append(self.layers[-1].register_forward_hook(self._after_last))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._layouts:
            last = self._layouts[-1]
            m = last.valid & last.is_visual
            order = (~m).to(torch.int8).argsort(dim=1, stable=True)
            k = int(m.sum(1).max()) if m.numel() else 0
            kept = torch.where(m, last.origin, torch.full_like(last.origin, -1)).gather(1, order)[:, :k]
            self.trace = InLLMTrace(kept=kept, mask=m.gather(1, order)[:, :k], counts=self._counts,
                                    extras=self._extras)
            self.final = last

    def _after_last(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._prefill_done = True

    # ------------------------------------------------------------------ hooks
    def _make_attn_hook(self, j: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self._prefill_done:
                self._captured[j] = (kwargs["hidden_states"], kwargs["position_embeddings"])
        return hook

    def _make_layer_hook(self, j: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            hidden = args[0] if args else kwargs["hidden_states"]
            if not self._prefill_done:
                if j == 0:
                    self._start(hidden, kwargs)
                if j - 1 in self.prune_after:
                    hidden = self._prune(j - 1, hidden)
                stage = self._stage_of[j]
                if stage == 0:
                    return None
                lay = self._layouts[stage]
                kwargs = dict(kwargs)
                kwargs["attention_mask"] = lay.mask
                kwargs["position_embeddings"] = lay.cos_sin
                if "position_ids" in kwargs:
                    kwargs["position_ids"] = lay.position_ids
                if kwargs.get("cache_position") is not None:
                    kwargs["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
                args = (hidden, *args[1:]) if args else args
                if not args:
                    kwargs["hidden_states"] = hidden
                return args, kwargs
            stage = self._stage_of[j]
            if stage == 0:
                return None
            lay = self._layouts[stage]
            cache = kwargs.get("past_key_values")
            if cache is None:
                raise ValueError("past_key_values: decoding after in-LLM pruning needs the KV cache (use_cache=True)")
            past = cache.get_seq_length(j)
            q = hidden.shape[1]
            b, lc = lay.valid.shape
            if hidden.shape[0] != b:
                raise ValueError("in-LLM pruning: the batch changed between prefill and decoding")
            allowed = torch.cat(
                [lay.valid[:, None, :].expand(b, q, lc),
                 torch.ones(b, q, past - lc, dtype=torch.bool, device=hidden.device),
                 torch.ones(q, q, dtype=torch.bool, device=hidden.device).tril()[None].expand(b, q, q)],
                dim=2,
            )
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = self._mask_format(allowed, hidden.dtype)
            return args, kwargs
        return hook

    # ------------------------------------------------------------------ work
    def _mask_format(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, q, k] bool -> the 4-D mask the attention implementation takes."""
        if self.impl == "sdpa":
            return allowed[:, None]
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]

    @staticmethod
    def _allowed(valid: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, L, L] causal over valid keys; every query sees itself (no empty rows)."""
        n = valid.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=valid.device)
        return (causal[None] & valid[:, None, :]) | eye[None]

    def _start(self, hidden: torch.Tensor, kwargs: dict) -> None:
        b, n = hidden.shape[:2]
        if self.mask2d.shape != (b, n):
            reps = b // self.mask2d.shape[0] if self.mask2d.shape[0] and b % self.mask2d.shape[0] == 0 else 0
            if not reps or self.mask2d.shape[1] != n:
                raise ValueError(
                    f"in-LLM pruning: the language model got a [{b}, {n}] prompt, the plug-in prepared "
                    f"{tuple(self.mask2d.shape)}"
                )
            # beams / several sequences per prompt: generate repeats each prompt
            self.mask2d = self.mask2d.repeat_interleave(reps, 0)
            self.visual = self.visual.repeat_interleave(reps, 0)
            self.question = self.question.repeat_interleave(reps, 0)
            self.budget = self.budget.repeat_interleave(reps, 0)
        device = hidden.device
        origin = torch.where(self.visual, self.visual.long().cumsum(1) - 1, torch.full_like(self.mask2d, -1, dtype=torch.long))
        orig = torch.arange(n, device=device).expand(b, n)
        lay = _Layout(orig, self.mask2d, origin, self.question)
        lay.cos_sin = kwargs.get("position_embeddings")
        lay.position_ids = kwargs.get("position_ids")
        self._full = lay
        v_idx, _, t_idx, _ = self._view(lay)
        view = torch.cat([v_idx, t_idx], dim=1)
        self._embeds_view = hidden.gather(1, view[..., None].expand(-1, -1, hidden.shape[-1]))
        self._visual_slot = [torch.nonzero(r).flatten() for r in self.visual]  # origin -> original slot, per row
        self._layouts = [lay]

    def _view(self, lay: _Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(visual slot index [B, Kc], visual mask, text slot index [B, Tt], text mask) of a layout."""
        n = lay.valid.shape[1]
        pos = torch.arange(n, device=lay.valid.device).expand_as(lay.valid).float()
        vis_real = lay.valid & lay.is_visual
        order = torch.where(vis_real, pos, torch.full_like(pos, float("inf"))).argsort(dim=1, stable=True)
        kc = int(vis_real.sum(1).max()) if n else 0
        v_idx = order[:, :kc]
        v_mask = vis_real.gather(1, v_idx)
        last = torch.where(lay.valid, pos, torch.full_like(pos, -1.0)).argmax(1)  # readout: the last real slot
        readout = torch.zeros_like(lay.valid)
        readout[torch.arange(readout.shape[0]), last] = True
        text = lay.valid & ~lay.is_visual & (lay.question | readout)
        t_idx, t_mask = _pack_left_pad(pos, text)
        return v_idx, v_mask, t_idx, t_mask

    def _prune(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        lay = self._layouts[-1]
        b, n, d = hidden.shape
        normed, cos_sin = self._captured.pop(layer)
        probs = attention_probs(self.layers[layer].self_attn, normed, cos_sin, self._allowed(lay.valid))
        v_idx, v_mask, t_idx, t_mask = self._view(lay)
        view = torch.cat([v_idx, t_idx], dim=1)
        h_view = hidden.gather(1, view[..., None].expand(-1, -1, d))
        heads = probs.shape[1]
        a = probs.gather(2, view[:, None, :, None].expand(b, heads, view.shape[1], n))
        a = a.gather(3, view[:, None, None, :].expand(b, heads, view.shape[1], view.shape[1]))
        origin = torch.where(v_mask, lay.origin.gather(1, v_idx), torch.full_like(v_idx, -1))
        state = LLMLayerState(
            layer=layer, num_layers=len(self.layers), hidden=h_view, attention=a, visual_mask=v_mask,
            text_mask=t_mask, inputs_embeds=self._embeds_view, budget=self.budget, origin=origin,
            stage=len(self._layouts) - 1, memory=self._memory,
        )
        decision: PruneDecision = self.pruner.prune(state)
        keep = decision.keep.long()
        kc = v_idx.shape[1]
        if keep.dim() != 2 or keep.shape[0] != b or (keep >= kc).any():
            raise ValueError(f"allocator: prune() must return keep [B={b}, K'] indices < {kc}, got {tuple(keep.shape)}")
        real_keep = (keep >= 0) & v_mask.gather(1, keep.clamp(min=0)) if kc else keep >= 0
        drop = lay.valid & lay.is_visual
        slot = v_idx.gather(1, keep.clamp(min=0))
        kept_visual = torch.zeros_like(drop)
        kept_visual.scatter_(1, torch.where(real_keep, slot, torch.zeros_like(slot)), real_keep)
        keep_slot = lay.valid & (~lay.is_visual | kept_visual)
        pos = torch.arange(n, device=hidden.device).expand(b, n).float()
        keys = [pos * 2]
        keeps = [keep_slot]
        hiddens = [hidden]
        orig = [lay.orig]
        origins = [lay.origin]
        questions = [lay.question]
        if decision.new_tokens is not None:
            new = decision.new_tokens.to(hidden.dtype)
            c = new.shape[1]
            new_mask = decision.new_mask.bool() if decision.new_mask is not None else torch.ones(b, c, dtype=torch.bool, device=hidden.device)
            new_origin = decision.new_origin.long() if decision.new_origin is not None else torch.zeros(b, c, dtype=torch.long, device=hidden.device)
            last_vis = torch.where(lay.is_visual & lay.valid, pos, torch.full_like(pos, -1.0)).amax(1)  # [B]
            keys.append(last_vis[:, None] * 2 + 1 + torch.arange(c, device=hidden.device)[None] / (c + 1))
            keeps.append(new_mask)
            hiddens.append(new)
            slot_of = torch.stack([
                self._visual_slot[r][new_origin[r].clamp(0, max(len(self._visual_slot[r]) - 1, 0))]
                if len(self._visual_slot[r]) else torch.zeros(c, dtype=torch.long, device=hidden.device)
                for r in range(b)
            ])
            orig.append(torch.where(new_mask, slot_of, torch.zeros_like(slot_of)))
            origins.append(torch.where(new_mask, new_origin, torch.full_like(new_origin, -1)))
            questions.append(torch.zeros_like(new_mask))
        idx, valid = _pack_left_pad(torch.cat(keys, 1), torch.cat(keeps, 1))
        all_h = torch.cat(hiddens, 1)
        new_h = all_h.gather(1, idx[..., None].expand(-1, -1, d))
        new_orig = torch.cat(orig, 1).gather(1, idx)
        lay2 = _Layout(new_orig, valid, torch.where(valid, torch.cat(origins, 1).gather(1, idx), torch.full_like(idx, -1)),
                       torch.cat(questions, 1).gather(1, idx) & valid)
        full = self._full
        cos, sin = full.cos_sin
        lay2.cos_sin = (_gather_seq(cos, new_orig, cos.dim() - 2), _gather_seq(sin, new_orig, sin.dim() - 2))
        pid = full.position_ids
        lay2.position_ids = _gather_seq(pid, new_orig, pid.dim() - 1) if pid is not None else None
        lay2.mask = self._mask_format(self._allowed(valid), hidden.dtype)
        self._layouts.append(lay2)
        self._counts.append((lay2.valid & lay2.is_visual).sum(1))
        self._extras.append(dict(decision.extras))
        return new_h
