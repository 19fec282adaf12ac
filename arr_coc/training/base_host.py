"""The embedded base VLM as an allocator host: its signals, and its LLM run layer by layer.

```python
host = BaseVLMHost(vlm, pixels, vision_tokens, question_ids, question_mask)
out = allocator(projected, query=..., budget=64, grid=vlm.grid, num_prefix_tokens=1, host=host)
host.vision_attention(-2)      # [B, heads, P+N, P+N]
host.vision_keys(-2)           # [B, P+N, Dh], keys averaged over heads
host.text_features()           # ([B, T, Dj], [B, T] bool) from the stage-0 text tower
host.text_embedding()          # [B, Dj] its pooled (eos) embedding of the question
host.patch_features()          # [B, N, Dj]
host.vision_output(), host.to_token_space(x)   # the tower's tokens, and its map into the allocators' space
logits = host.answer_in_llm(fastv, visual, mask, positions, question_ids, question_mask, budget=64)
```

Signals (the contract is :mod:`arr_coc.allocators.host`):

- ``vision_attention`` / ``vision_keys``: the first request runs ``vlm.encode_image(pixels)``
  once with forward pre-hooks on every ViT block's attention module (``vlm.vision.blocks[i].attn``,
  timm's ``Attention``) that record the block's attention input (after ``norm1``); the hooks
  are removed right after that forward, and the model is never edited. q and k are then
  recomputed with the module's own ``qkv``, ``num_heads``, ``scale`` and ``q_norm`` /
  ``k_norm``: ``softmax(q k^T * scale)`` (float32) is exactly what the block's non-fused path
  computes. The re-encoded output is checked against ``vision_tokens``.
- ``text_features`` / ``text_embedding`` / ``patch_features``: the base VLM's paired text
  tower (``vlm.has_text_tower``, ``vlm.instruction_features``, ``vlm.instruction_embedding``,
  ``vlm.patch_features``); a base
  VLM without one raises :class:`~arr_coc.allocators.host.SignalUnavailable`.

``answer_in_llm`` builds the LLM input with ``vlm.llm_inputs`` (visual tokens first, the
readout last), then runs the transformers decoder layers itself (``vlm.llm.model.layers``,
``rotary_emb``, ``norm``, ``vlm.llm.lm_head``) with a 4-D additive causal + padding mask, the
same one ``LlamaModel`` builds for eager attention. After each layer the pruner asks for,
that layer's softmax attention is recomputed from its ``q_proj`` / ``k_proj`` with RoPE
(as ``eager_attention_forward`` does it), the pruner decides, and the dropped visual tokens
leave the hidden states, the mask and the position ids (kept tokens keep theirs). With a
pruner that keeps everything the logits are ``vlm.answer_logits``'s.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from arr_coc.allocators.host import (
    InLLMPruner,
    InLLMTrace,
    LLMLayerState,
    PruneDecision,
    SignalUnavailable,
    VisionMerge,
    resolve_layer,
)

__all__ = ["BaseVLMHost", "additive_causal_mask", "llm_layer_attention"]


def additive_causal_mask(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] bool (True = real token) -> [B, 1, L, L] additive mask: 0 where query i may read
    key j (j <= i and j real), the dtype's minimum elsewhere (as transformers' eager mask)."""
    b, n = key_mask.shape
    causal = torch.ones(n, n, dtype=torch.bool, device=key_mask.device).tril()
    allowed = causal[None] & key_mask[:, None, :].bool()
    mask = torch.zeros(b, n, n, dtype=dtype, device=key_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def llm_layer_attention(
    layer: nn.Module, hidden: torch.Tensor, mask4: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Softmax attention [B, H, L, L] (float32) of a transformers decoder layer on its input hidden [B, L, D].

    Recomputed from the layer's ``input_layernorm``, ``self_attn.q_proj`` / ``k_proj`` (and
    ``q_norm`` / ``k_norm`` where the family has them), RoPE with the given (cos, sin), the
    key heads repeated for grouped-query attention, ``* scaling`` and the additive ``mask4``.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    attn = getattr(layer, "self_attn", None)
    if attn is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "head_dim", "scaling")):
        raise ValueError(f"layer: expected a transformers decoder layer with self_attn.q_proj / k_proj, got {type(layer).__name__}")
    b, n, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling + mask4
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


class BaseVLMHost:
    """Host signals of an embedded :class:`arr_coc.training.base_vlm.BaseVLM` for one batch.

    vlm: the (frozen) base VLM; pixels [B, 3, H, W] in [0, 1]; vision_tokens [B, P+N, Dv]
    (``vlm.encode_image(pixels)``; computed when None); question_ids / question_mask [B, T].
    token_space: the space of the patch tokens the allocators get (``"projected"``: after
    ``vlm.project``, as ``evaluation.run_allocation`` gives them; ``"vision"``: the tower's
    tokens); signals that return new tokens (``vision_merge``) return them there.
    Every signal is computed on first use and cached.
    """

    def __init__(
        self,
        vlm: nn.Module,
        pixels: torch.Tensor | None,
        vision_tokens: torch.Tensor | None = None,
        question_ids: torch.Tensor | None = None,
        question_mask: torch.Tensor | None = None,
        *,
        token_space: str = "projected",
    ) -> None:
        if token_space not in ("projected", "vision"):
            raise ValueError(f"token_space: expected 'projected' or 'vision', got {token_space!r}")
        if pixels is None and vision_tokens is None:
            raise ValueError("pixels: expected [B, 3, H, W] pixels or vision_tokens, got neither")
        if pixels is not None and (pixels.ndim != 4 or pixels.shape[1] != 3):
            raise ValueError(f"pixels: expected [B, 3, H, W], got {tuple(pixels.shape)}")
        if question_mask is not None and question_ids is not None and question_mask.shape != question_ids.shape:
            raise ValueError(f"question_mask: expected {tuple(question_ids.shape)}, got {tuple(question_mask.shape)}")
        self.vlm = vlm
        self.token_space = token_space
        self.pixels = pixels
        self._vision_tokens = vision_tokens
        self.question_ids = question_ids
        self.question_mask = question_mask
        self._block_inputs: list[torch.Tensor] | None = None
        self._tower_input: torch.Tensor | None = None
        self._qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._attn: dict[int, torch.Tensor] = {}
        self._text: tuple[torch.Tensor, torch.Tensor] | None = None
        self._text_pooled: torch.Tensor | None = None
        self._patch: torch.Tensor | None = None

    # ------------------------------------------------------------------ vision tower
    @property
    def vision_tokens(self) -> torch.Tensor:
        """[B, P+N, Dv] the vision tower's output tokens."""
        if self._vision_tokens is None:
            with torch.no_grad():
                self._vision_tokens = self.vlm.encode_image(self.pixels)
        return self._vision_tokens

    def vision_output(self) -> torch.Tensor:
        """[B, P+N, Dv] the vision tower's output tokens (before the projector)."""
        return self.vision_tokens

    def to_token_space(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tower tokens [B, K, Dv] -> the allocator's token space (``vlm.project`` when
        ``token_space="projected"``, unchanged for ``"vision"``)."""
        with torch.no_grad():
            return self.vlm.project(tokens) if self.token_space == "projected" else tokens

    def _blocks(self, signal: str) -> nn.ModuleList:
        blocks = getattr(getattr(self.vlm, "vision", None), "blocks", None)
        if blocks is None or not len(blocks):
            raise SignalUnavailable(f"host: the signal {signal!r} needs a timm ViT with .blocks; the vision tower has none")
        attn = blocks[0].attn
        if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "scale")):
            raise SignalUnavailable(
                f"host: the signal {signal!r} needs ViT attention modules with qkv / num_heads / scale, "
                f"got {type(attn).__name__}"
            )
        return blocks

    def _record_block_inputs(self, signal: str) -> list[torch.Tensor]:
        if self._block_inputs is not None:
            return self._block_inputs
        if self.pixels is None:
            raise SignalUnavailable(f"host: the signal {signal!r} needs the pixels, which this host was not given")
        blocks = self._blocks(signal)
        recorded: dict[int, torch.Tensor] = {}

        def hook(i: int):
            def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                recorded[i] = (args[0] if args else kwargs["x"]).detach()

            return fn

        handles = [blk.attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, blk in enumerate(blocks)]
        handles.append(blocks[0].register_forward_pre_hook(hook(-1), with_kwargs=True))  # the tower's block input
        try:
            with torch.no_grad():
                out = self.vlm.encode_image(self.pixels)
        finally:
            for h in handles:
                h.remove()
        if len(recorded) != len(blocks) + 1:
            raise SignalUnavailable(f"host: the signal {signal!r}: only {len(recorded) - 1} of {len(blocks)} blocks ran")
        self._tower_input = recorded[-1]
        if self._vision_tokens is None:
            self._vision_tokens = out
        elif self._vision_tokens.shape != out.shape or not torch.allclose(
            self._vision_tokens.float(), out.float(), rtol=1e-3, atol=1e-4
        ):
            raise ValueError("vision_tokens: do not match vlm.encode_image(pixels); pass the tokens of these pixels")
        self._block_inputs = [recorded[i] for i in range(len(blocks))]
        return self._block_inputs

    def _q_k(self, layer: int, signal: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, k) [B, heads, P+N, Dh] of block ``layer`` (normalised where the block normalises)."""
        blocks = self._blocks(signal)
        idx = resolve_layer(layer, len(blocks))
        if idx not in self._qk:
            x = self._record_block_inputs(signal)[idx]
            attn = blocks[idx].attn
            b, n, _ = x.shape
            with torch.no_grad():
                qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
                q, k = qkv[0], qkv[1]
                q, k = attn.q_norm(q), attn.k_norm(k)
            self._qk[idx] = (q, k)
        return self._qk[idx]

    def vision_attention(self, layer: int) -> torch.Tensor:
        """[B, heads, P+N, P+N] softmax attention (float32) of vision block ``layer``."""
        idx = resolve_layer(layer, len(self._blocks("vision_attention")))
        if idx not in self._attn:
            q, k = self._q_k(idx, "vision_attention")
            scale = self.vlm.vision.blocks[idx].attn.scale
            self._attn[idx] = torch.softmax((q.float() * scale) @ k.float().transpose(-2, -1), dim=-1)
        return self._attn[idx]

    def vision_keys(self, layer: int) -> torch.Tensor:
        """[B, P+N, Dh] attention keys of vision block ``layer``, averaged over heads."""
        _, k = self._q_k(layer, "vision_keys")
        return k.mean(dim=1)

    def vision_blocks(self) -> int:
        """Number of blocks of the vision tower (the length of ``vision_merge``'s schedule)."""
        return len(self._blocks("vision_blocks"))

    @torch.no_grad()
    def vision_merge(self, r: torch.Tensor) -> VisionMerge:
        """The vision tower re-run with ToMe merging ``r[b, l]`` tokens in block l of row b.

        r: [B, D] ints (D = blocks), each at most half of the row's unprotected tokens at
        that block. Each block runs as the released ``ToMeBlock`` / ``ToMeAttention``
        (github facebookresearch/ToMe, ``tome/patch/timm.py``): attention with proportional
        attention (``+ log(size)`` on the logits), then bipartite soft matching on the
        block's keys averaged over heads (the prefix tokens protected), size-weighted
        merging of the residual stream, the new order [unmerged A, B] (prefix first), then
        the MLP. The block input is recorded by a hook on the unmodified tower; nothing is
        patched. Rows are padded (size 0: masked out of attention by ``log 0``). Returns the
        merged patch tokens after the tower's final norm, through ``vlm.project`` (the space
        the allocator's tokens live in, see ``token_space``).
        """
        from arr_coc.allocators.tome import bipartite_merge_round

        blocks = self._blocks("vision_merge")
        self._record_block_inputs("vision_merge")
        x = self._tower_input
        b, t, _ = x.shape
        p = int(self.vlm.num_prefix_tokens)
        if r.shape != (b, len(blocks)) or (r < 0).any():
            raise ValueError(f"r: expected [B={b}, blocks={len(blocks)}] non-negative ints, got {tuple(r.shape)}")
        r = r.long().to(x.device)
        slot = torch.arange(t, device=x.device)
        size = torch.ones(b, t, dtype=x.dtype, device=x.device)
        origin = (slot - p).expand(b, t).clone()
        alive = torch.ones(b, t, dtype=torch.bool, device=x.device)
        for li, blk in enumerate(blocks):
            attn = blk.attn
            y = blk.norm1(x)
            qkv = attn.qkv(y).reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            logits = (q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :]
            o = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, -1)
            o = attn.norm(o)
            if getattr(attn, "gate", None) is not None:
                o = o * attn.gate(y).sigmoid()
            x = x + blk.drop_path1(blk.ls1(attn.proj(o)))
            count = alive.sum(1)
            limit = (count - p) // 2
            if (r[:, li] > limit).any():
                raise ValueError(f"r: block {li} can merge at most {limit.tolist()} tokens per row, asked {r[:, li].tolist()}")
            if r[:, li].any():
                metric = k.mean(dim=1)
                z, size, keep = bipartite_merge_round(
                    torch.cat([x, metric], -1), size, count, r[:, li], match_dims=metric.shape[-1], protect=p
                )
                x = z[..., : x.shape[-1]]
                # ToMe's order: the unmerged A tokens (slot order, prefix first), then every B token
                key = torch.where(keep, (slot % 2) * t + slot, 2 * t + slot)
                order = key.argsort(dim=1)
                x = x.gather(1, order[..., None].expand_as(x))
                size = torch.where(keep, size, torch.zeros_like(size)).gather(1, order)
                origin, alive = origin.gather(1, order), keep.gather(1, order)
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        x = self.vlm.vision.norm(x)
        width = int((alive.sum(1) - p).max())
        tokens = x[:, p : p + width]
        mask = alive[:, p : p + width]
        if self.token_space == "projected":
            tokens = self.vlm.project(tokens)
        return VisionMerge(
            tokens=tokens * mask[..., None],
            sizes=torch.where(mask, size[:, p : p + width], torch.zeros_like(size[:, p : p + width])),
            origin=torch.where(mask, origin[:, p : p + width], torch.full_like(origin[:, p : p + width], -1)),
            mask=mask,
        )

    # ------------------------------------------------------------------ text tower
    def _text_tower(self, signal: str) -> None:
        if not getattr(self.vlm, "has_text_tower", False):
            raise SignalUnavailable(
                f"host: the signal {signal!r} needs a base VLM with a paired text tower (vlm.has_text_tower); this one has none"
            )

    def text_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, T, Dj] L2-normalised text-tower features of the question, [B, T] bool mask)."""
        if self._text is None:
            self._text_tower("text_features")
            mask = self._question_mask("text_features")
            with torch.no_grad():
                feats = self.vlm.instruction_features(self.question_ids, mask)
            self._text = (feats, mask)
        return self._text

    def _question_mask(self, signal: str) -> torch.Tensor:
        if self.question_ids is None:
            raise SignalUnavailable(f"host: the signal {signal!r} needs question_ids, which this host was not given")
        if self.question_mask is None:
            return torch.ones_like(self.question_ids, dtype=torch.bool)
        return self.question_mask.bool()

    def text_embedding(self) -> torch.Tensor:
        """[B, Dj] L2-normalised pooled (eos) text-tower embedding of the question."""
        if self._text_pooled is None:
            self._text_tower("text_embedding")
            mask = self._question_mask("text_embedding")
            with torch.no_grad():
                self._text_pooled = self.vlm.instruction_embedding(self.question_ids, mask)
        return self._text_pooled

    def patch_features(self) -> torch.Tensor:
        """[B, N, Dj] L2-normalised patch tokens in the joint space."""
        if self._patch is None:
            self._text_tower("patch_features")
            with torch.no_grad():
                self._patch = self.vlm.patch_features(self.vision_tokens)
        return self._patch

    # ------------------------------------------------------------------ in-LLM pruning
    def kept_positions(self, trace: InLLMTrace) -> torch.Tensor:
        """[B, K, 3] (row, col, level) of the input visual tokens the last layers saw, -1 padded."""
        b = trace.kept.shape[0]
        fine_pos = self.vlm.fine_positions(b, trace.kept.device)  # [B, N, 3]
        positions = fine_pos.gather(1, trace.kept.clamp(min=0)[..., None].expand(-1, -1, 3))
        return torch.where(trace.mask[..., None], positions, torch.full_like(positions, -1))

    def answer_in_llm(self, pruner: InLLMPruner, *args, **kwargs):
        """See :meth:`_answer_in_llm`. The frozen LLM runs without gradients; the pruner's
        ``prune`` runs with the caller's grad mode, so a trained in-LLM allocator's scores keep
        their graph in training (:class:`arr_coc.training.module.ARRCOCModule`)."""
        return self._answer_in_llm(pruner, *args, pruner_grad=torch.is_grad_enabled(), **kwargs)

    @torch.no_grad()
    def _answer_in_llm(
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
        pruner_grad: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, InLLMTrace]:
        """Answer logits [B, V] with ``pruner`` pruning the K visual tokens [B, K, Dl] inside the LLM.

        ``budget``: int or [B]; the number of visual tokens left after the last pruning call
        (clamped to the real visual tokens). With ``return_trace`` also an
        :class:`~arr_coc.allocators.host.InLLMTrace` (which input visual tokens the last
        layers saw).
        """
        if not getattr(pruner, "in_llm", False) or not callable(getattr(pruner, "prune", None)):
            raise ValueError(f"pruner: expected an in-LLM pruner (in_llm = True, a prune method), got {type(pruner).__name__}")
        vlm = self.vlm
        vmask, _, _ = vlm.check_answer_inputs(visual, visual_mask, visual_positions, question_ids, question_mask)
        inputs, attn2d, pos = vlm.llm_inputs(visual, visual_mask, visual_positions, question_ids, question_mask)
        b, k, _ = visual.shape
        device = visual.device
        if isinstance(budget, torch.Tensor):
            budget_t = budget.to(device=device, dtype=torch.long).expand(b) if budget.dim() == 0 else budget.to(device, torch.long)
            if budget_t.shape != (b,):
                raise ValueError(f"budget: expected an int or a [B={b}] tensor, got shape {tuple(budget.shape)}")
        elif isinstance(budget, int) and not isinstance(budget, bool):
            budget_t = torch.full((b,), budget, dtype=torch.long, device=device)
        else:
            raise ValueError(f"budget: expected an int or a [B] tensor, got {budget!r}")
        if (budget_t < 0).any():
            raise ValueError(f"budget: expected values >= 0, got {budget_t.tolist()}")
        budget_t = torch.minimum(budget_t, vmask.sum(1))

        model = vlm.llm.model
        layers = list(model.layers)[: model.config.num_hidden_layers]
        n_layers = len(layers)
        prune_at = tuple(pruner.prune_layers(n_layers))
        if any(not 0 <= p < n_layers for p in prune_at) or list(prune_at) != sorted(set(prune_at)):
            raise ValueError(f"pruner: prune_layers({n_layers}) must be increasing layers in [0, {n_layers}), got {prune_at}")
        h = inputs
        key_mask = attn2d.bool()
        origin = torch.where(vmask, torch.arange(k, device=device).expand(b, k), torch.full_like(pos[:, :k], -1))
        input_pos = pos[:, :k]
        kc = k
        memory: dict[str, Any] = {}
        trace = InLLMTrace(kept=origin, mask=vmask)
        for li, layer in enumerate(layers):
            mask4 = additive_causal_mask(key_mask, h.dtype)
            cos_sin = model.rotary_emb(h, position_ids=pos)
            att = llm_layer_attention(layer, h, mask4, cos_sin) if li in prune_at else None
            out = layer(h, attention_mask=mask4, position_ids=pos, position_embeddings=cos_sin)
            h = out[0] if isinstance(out, tuple) else out
            if att is None:
                continue
            state = LLMLayerState(
                layer=li,
                num_layers=n_layers,
                hidden=h,
                attention=att,
                visual_mask=key_mask[:, :kc],
                text_mask=key_mask[:, kc:],
                inputs_embeds=inputs,
                budget=budget_t,
                origin=origin,
                stage=prune_at.index(li),
                memory=memory,
            )
            with torch.set_grad_enabled(pruner_grad):
                decision = pruner.prune(state)
            h, key_mask, pos, origin, kc = self._apply(decision, h, key_mask, pos, origin, kc, input_pos)
            trace.counts.append(key_mask[:, :kc].sum(1))
            trace.extras.append(decision.extras)
        h = model.norm(h)
        logits = vlm.llm.lm_head(h[:, -1])
        if not return_trace:
            return logits
        trace.kept, trace.mask = origin, key_mask[:, :kc]
        return logits, trace

    @staticmethod
    def _apply(
        decision: PruneDecision,
        h: torch.Tensor,
        key_mask: torch.Tensor,
        pos: torch.Tensor,
        origin: torch.Tensor,
        kc: int,
        input_pos: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Keep the decided visual slots (in their order), append new ones, compact the padding."""
        b, _, d = h.shape
        keep = decision.keep.long()
        if keep.dim() != 2 or keep.shape[0] != b or (keep >= kc).any():
            raise ValueError(f"pruner: keep must be [B={b}, K'] indices < {kc} (-1 padded), got {tuple(keep.shape)}")
        vis_mask = key_mask[:, :kc]
        safe = keep.clamp(min=0)
        valid = (keep >= 0) & vis_mask.gather(1, safe)
        # the slot order of the kept tokens, padding last (FastV sorts its keep indices)
        key = torch.where(valid, safe, torch.full_like(safe, kc))
        order = key.argsort(dim=1, stable=True)
        safe, valid = safe.gather(1, order), valid.gather(1, order)
        vh = h[:, :kc].gather(1, safe[..., None].expand(-1, -1, d))
        vp = pos[:, :kc].gather(1, safe)
        vo = origin.gather(1, safe)
        if decision.new_tokens is not None:
            c = decision.new_tokens.shape[1]
            new_mask = decision.new_mask if decision.new_mask is not None else torch.ones(b, c, dtype=torch.bool, device=h.device)
            if decision.new_origin is None:
                raise ValueError("pruner: new_tokens need new_origin (the input visual index each is reported at)")
            new_origin = decision.new_origin.long()
            vh = torch.cat([vh, decision.new_tokens.to(h.dtype)], 1)
            valid = torch.cat([valid, new_mask.bool()], 1)
            vp = torch.cat([vp, input_pos.gather(1, new_origin.clamp(min=0))], 1)
            vo = torch.cat([vo, new_origin], 1)
        # compact: real tokens first, keep their order, trim to the longest row
        order = (~valid).long().argsort(dim=1, stable=True)
        width = int(valid.sum(1).max()) if valid.numel() else 0
        order = order[:, :width]
        valid = valid.gather(1, order)
        vh = vh.gather(1, order[..., None].expand(-1, -1, d)) * valid[..., None]
        vp = torch.where(valid, vp.gather(1, order), torch.zeros_like(order))
        vo = torch.where(valid, vo.gather(1, order), torch.full_like(order, -1))
        h = torch.cat([vh, h[:, kc:]], 1)
        key_mask = torch.cat([valid, key_mask[:, kc:]], 1)
        pos = torch.cat([vp, pos[:, kc:]], 1)
        return h, key_mask, pos, vo, width
