"""Relevance sources and host signals for the real-VLM plug-ins (LLaVA, Qwen-VL).

An allocator scores image tokens against the question in *some* space. The plug-ins offer
three, chosen per wrapped allocator with ``wrap(..., relevance=...)``, plus the host signals
that published methods read directly (``host=``, :class:`arr_coc.allocators.host.HostSignals`):

| source (``relevance=``) | what the allocator compares | extra cost per batch |
|---|---|---|
| ``"embeddings"`` (default) | projected patch tokens (LLM input space) vs the question's input word embeddings | none: an embedding lookup the prompt needs anyway |
| ``TextTower(clip, clip_tokenizer, host_tokenizer)`` (LLaVA) | CLIP / SigLIP joint space: the paired vision model's patch tokens (post-layernorm, visual projection) vs the text tower's per-token features of the question (CDPruner's signal) | one pass of the paired vision model over the images (as costly as LLaVA's own vision tower) and one text-tower pass over at most 77 tokens per prompt; the paired model's weights in memory (CLIP ViT-L/14-336: 428M parameters, of which the text tower 123M) |
| ``LLMLayer(l)`` | the host LLM's hidden states after decoder layer ``l``, image tokens vs question tokens, from a partial forward on the unpruned prompt (FastV's / SparseVLM's signal, as a pre-LLM score) | a prefill of layers ``0..l`` over the *full* prompt: (l + 1) / num_layers of an unpruned prefill (l = 2 of 32: 9%), on top of the shortened prefill; its KV is not kept |

Host signals, for allocators that read them (``reads_host``: ``cls_attention``,
``visionzip``, ``tome``, ``cdpruner``), computed lazily, once per batch:

| signal | LLaVA | Qwen-VL | cost |
|---|---|---|---|
| ``vision_attention(l)`` / ``vision_keys(l)`` | the vision tower's block ``l`` (q / k recomputed from the block's input) | unavailable (windowed attention, 2-D RoPE and a 2x2 merger: no token of the tower is an LLM token) | one more vision-tower pass up to block ``l`` |
| ``vision_output()`` / ``to_token_space(x)`` | the features LLaVA's projector reads (``vision_feature_layer``, the select strategy's prefix) and the projector itself (VisionZip merges before it) | unavailable | one more vision-tower pass |
| ``text_features()`` / ``text_embedding()`` / ``patch_features()`` | with ``text_tower=TextTower(...)`` | unavailable (no paired text tower; ``pixel_values`` are patches, not images) | as the ``TextTower`` row above |
| ``llm_hidden(l)`` / ``llm_attention(l)`` | hidden states / softmax attention of LLM layer ``l`` on the full prompt | the same | as the ``LLMLayer`` row above |

With ``relevance`` other than ``"embeddings"`` the allocator runs on the *scoring-space*
tokens and query; the language model still receives the projected tokens it selected
(the same candidate indices, pooled pyramid levels pooled in the LLM space). Merging
allocators (``tome``, ``visionzip``), whose output tokens are new vectors, therefore need
the ``"embeddings"`` source (``ValueError`` otherwise).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from arr_coc.allocators.host import SignalUnavailable, resolve_layer
from arr_coc.integrations._common import candidate_index, text_query
from arr_coc.integrations._llm import attention_probs, decoder_layers
from arr_coc.pyramid import build_pyramid

__all__ = [
    "LLMLayer",
    "PluginSignals",
    "TextTower",
    "check_relevance",
    "llm_layer_states",
    "run_allocator",
    "select_in_llm_space",
]


@dataclass
class TextTower:
    """A vision tower's paired text encoder (CLIP / SigLIP): CDPruner's relevance signal.

    model:          a ``CLIPModel`` or ``SiglipModel`` (text model, vision model, projections).
    tokenizer:      its tokenizer (77 tokens for CLIP).
    host_tokenizer: the host VLM's tokenizer, to decode the question tokens to text.
    max_length:     text tokens kept (CLIP's context: 77).
    """

    model: nn.Module
    tokenizer: Any
    host_tokenizer: Any
    max_length: int = 77

    def __post_init__(self) -> None:
        if not hasattr(self.model, "text_model") or not hasattr(self.model, "vision_model"):
            raise ValueError(
                f"model: expected a CLIPModel / SiglipModel with text_model and vision_model, got {type(self.model).__name__}"
            )

    def _project_text(self, hidden: torch.Tensor) -> torch.Tensor:
        proj = getattr(self.model, "text_projection", None)
        if proj is None:
            proj = getattr(self.model.text_model, "head", None)
        return hidden if proj is None else proj(hidden)

    @torch.no_grad()
    def encode_text(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """([B, T, Dj] per-token features, [B, T] mask, [B, Dj] pooled), L2-normalised."""
        enc = self.tokenizer(texts, padding="max_length" if "Siglip" in type(self.model).__name__ else True,
                             truncation=True, max_length=self.max_length, return_tensors="pt")
        ids = enc["input_ids"].to(device)
        mask = enc.get("attention_mask", torch.ones_like(enc["input_ids"])).to(device)
        out = self.model.text_model(input_ids=ids, attention_mask=mask if "Siglip" not in type(self.model).__name__ else None)
        tokens = self._project_text(out.last_hidden_state)
        pooled = out.pooler_output
        if getattr(self.model, "text_projection", None) is not None:
            pooled = self.model.text_projection(pooled)
        norm = torch.nn.functional.normalize
        return norm(tokens.float(), dim=-1), mask.bool(), norm(pooled.float(), dim=-1)

    @torch.no_grad()
    def encode_patches(self, pixel_values: torch.Tensor, num_patches: int) -> torch.Tensor:
        """[I, N, Dj] the paired vision model's patch tokens in the joint space, L2-normalised."""
        vm = self.model.vision_model
        h = vm(pixel_values=pixel_values.to(next(vm.parameters()).dtype)).last_hidden_state
        post = getattr(vm, "post_layernorm", None)
        if post is not None:
            h = post(h)
        proj = getattr(self.model, "visual_projection", None)
        if proj is not None:
            h = proj(h)
        if h.shape[1] < num_patches:
            raise SignalUnavailable(f"text_tower: the paired vision model gave {h.shape[1]} tokens for {num_patches} patches")
        return torch.nn.functional.normalize(h[:, h.shape[1] - num_patches :].float(), dim=-1)

    def question_texts(self, input_ids: torch.Tensor, question: torch.Tensor) -> list[str]:
        """Decode each row's question tokens with the host tokenizer."""
        return [
            self.host_tokenizer.decode(ids[m].tolist(), skip_special_tokens=True).strip()
            for ids, m in zip(input_ids, question.bool())
        ]


@dataclass
class LLMLayer:
    """Relevance from the host LLM's hidden states after decoder layer ``layer`` (0-based; < 0 from the end)."""

    layer: int = 2


def check_relevance(relevance: Any, *, text_tower_ok: bool) -> Any:
    if relevance is None or relevance == "embeddings":
        return "embeddings"
    if isinstance(relevance, LLMLayer):
        return relevance
    if isinstance(relevance, TextTower) or relevance == "text_tower":
        if not text_tower_ok:
            raise ValueError(
                "relevance: a paired text tower needs a CLIP / SigLIP vision tower fed with images (LLaVA); "
                "Qwen-VL's tower has none"
            )
        return relevance
    raise ValueError(f"relevance: expected 'embeddings', 'text_tower', a TextTower or an LLMLayer, got {relevance!r}")


class _Stop(Exception):
    """Raised by a forward hook to end a partial forward."""


@torch.no_grad()
def llm_layer_states(
    model: nn.Module, layer: int, run_lm: Any, valid: torch.Tensor, *, attention: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states [B, L, D] after decoder layer ``layer`` and, when asked, its attention [B, H, L, L].

    ``run_lm()`` runs the language model on the full prompt (``valid`` [B, L]: its mask); a
    forward hook on layer ``layer`` stops it there (the later layers never run), a
    pre-hook captures the layer's attention input. Hooks are removed afterwards.
    """
    layers = decoder_layers(model)
    idx = resolve_layer(layer, len(layers), name="layer")
    got: dict[str, Any] = {}

    def keep_out(module, args, output):
        got["hidden"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    def keep_in(module, args, kwargs):
        got["attn"] = (kwargs["hidden_states"], kwargs["position_embeddings"])

    handles = [layers[idx].register_forward_hook(keep_out)]
    if attention:
        handles.append(layers[idx].self_attn.register_forward_pre_hook(keep_in, with_kwargs=True))
    try:
        run_lm()
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if "hidden" not in got:
        raise SignalUnavailable(f"layer: the language model did not reach decoder layer {idx}")
    if not attention:
        return got["hidden"], None
    normed, cos_sin = got["attn"]
    n = valid.shape[1]
    allowed = (torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()[None] & valid.bool()[:, None, :]) | torch.eye(
        n, dtype=torch.bool, device=valid.device
    )[None]
    return got["hidden"], attention_probs(layers[idx].self_attn, normed, cos_sin, allowed)


class PluginSignals:
    """Host signals of one plug-in batch (:class:`arr_coc.allocators.host.HostSignals`).

    Rows are the images of the allocator call, in order (``rows`` picks a subset for the
    calls of the Qwen-VL plug-in, which groups images by grid). Every signal is computed
    once per batch, on first use.

    vision:      callable ``layer -> (normed input [I, S, Dv], attention module)`` of a
                 vision block, or None (no such signal); the first ``S - num_tokens`` tower
                 tokens (a [CLS] the select strategy dropped) are dropped so the layout is
                 the allocator's (``num_tokens`` = P + N).
    text_tower:  a :class:`TextTower` or None; ``pixel_values`` / ``num_patches`` feed it.
    question:    [B, L] bool question tokens; ``image_rows`` [I] the prompt of each image.
    llm:         callable ``(layer, attention) -> (hidden [B, L, D], probs [B, H, L, L] or None)``.
    image_slots: [I, n] long, the prompt positions of each image's tokens (P + N).
    """

    def __init__(
        self,
        *,
        input_ids: torch.Tensor,
        question: torch.Tensor,
        image_rows: torch.Tensor,
        image_slots: list[torch.Tensor],
        vision: Any = None,
        num_tokens: int = 0,
        text_tower: TextTower | None = None,
        pixel_values: torch.Tensor | None = None,
        num_patches: int = 0,
        llm: Any = None,
        vision_output: Any = None,
        to_token_space: Any = None,
        rows: torch.Tensor | None = None,
        cache: dict | None = None,
    ) -> None:
        self.input_ids, self.question, self.image_rows, self.image_slots = input_ids, question, image_rows, image_slots
        self._vision, self.num_tokens = vision, num_tokens
        self.text_tower, self.pixel_values, self.num_patches = text_tower, pixel_values, num_patches
        self._llm = llm
        self._vision_output, self._to_token_space = vision_output, to_token_space
        self.rows = rows if rows is not None else torch.arange(len(image_rows), device=image_rows.device)
        self._cache = cache if cache is not None else {}

    def subset(self, rows: torch.Tensor) -> PluginSignals:
        """The same batch's signals for the images ``rows`` (sharing the cache)."""
        return PluginSignals(
            input_ids=self.input_ids, question=self.question, image_rows=self.image_rows,
            image_slots=self.image_slots, vision=self._vision, num_tokens=self.num_tokens,
            text_tower=self.text_tower, pixel_values=self.pixel_values, num_patches=self.num_patches,
            llm=self._llm, vision_output=self._vision_output, to_token_space=self._to_token_space, rows=rows,
            cache=self._cache,
        )

    # ------------------------------------------------------------------ vision tower
    def _vision_qk(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        if self._vision is None:
            raise SignalUnavailable("host: this plug-in's vision tower gives no per-block attention (vision_attention)")
        key = ("vision", layer)
        if key not in self._cache:
            normed, attn = self._vision(layer)
            i, s, _ = normed.shape
            heads = attn.num_heads
            hd = attn.head_dim
            q = attn.q_proj(normed).view(i, s, heads, hd).transpose(1, 2)
            k = attn.k_proj(normed).view(i, s, heads, hd).transpose(1, 2)
            p = s - self.num_tokens
            if p < 0:
                raise SignalUnavailable(f"host: vision block {layer} has {s} tokens, fewer than the {self.num_tokens} allocated")
            self._cache[key] = (q[:, :, p:], k[:, :, p:], float(attn.scale))
        q, k, scale = self._cache[key]
        return q[self.rows], k[self.rows], scale

    def vision_attention(self, layer: int) -> torch.Tensor:
        """[I, heads, P+N, P+N] softmax attention (float32) of the vision tower's block ``layer``."""
        q, k, scale = self._vision_qk(layer)
        return torch.softmax((q.float() * scale) @ k.float().transpose(-2, -1), dim=-1)

    def vision_keys(self, layer: int) -> torch.Tensor:
        """[I, P+N, Dh] attention keys of block ``layer``, averaged over heads."""
        return self._vision_qk(layer)[1].mean(dim=1)

    def vision_output(self) -> torch.Tensor:
        """[I, P+N, Dv] the vision tower's features the projector reads (before it)."""
        if self._vision_output is None:
            raise SignalUnavailable("host: this plug-in gives no pre-projector vision features (vision_output)")
        if "vision_output" not in self._cache:
            self._cache["vision_output"] = self._vision_output()
        return self._cache["vision_output"][self.rows]

    def to_token_space(self, x: torch.Tensor) -> torch.Tensor:
        """[I, K, Dv] -> [I, K, D]: the host's projector (vision features to LLM tokens)."""
        if self._to_token_space is None:
            raise SignalUnavailable("host: this plug-in gives no projector (to_token_space)")
        return self._to_token_space(x)

    # ------------------------------------------------------------------ text tower
    def _text(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.text_tower is None:
            raise SignalUnavailable("host: text_features / patch_features need wrap(..., text_tower=TextTower(...))")
        if "text" not in self._cache:
            texts = self.text_tower.question_texts(self.input_ids, self.question)
            self._cache["text"] = self.text_tower.encode_text(texts, self.input_ids.device)
        feats, mask, pooled = self._cache["text"]
        r = self.image_rows[self.rows]
        return feats[r], mask[r], pooled[r]

    def text_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([I, T, Dj] per-token text-tower features of the question, [I, T] mask)."""
        feats, mask, _ = self._text()
        return feats, mask

    def text_embedding(self) -> torch.Tensor:
        """[I, Dj] the text tower's pooled embedding of the question."""
        return self._text()[2]

    def patch_features(self) -> torch.Tensor:
        """[I, N, Dj] the patches in the joint space (the paired vision model's)."""
        if self.text_tower is None or self.pixel_values is None:
            raise SignalUnavailable("host: patch_features needs wrap(..., text_tower=TextTower(...)) and images")
        if "patch" not in self._cache:
            self._cache["patch"] = self.text_tower.encode_patches(self.pixel_values, self.num_patches)
        return self._cache["patch"][self.rows]

    # ------------------------------------------------------------------ LLM
    def _llm_layer(self, layer: int, attention: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._llm is None:
            raise SignalUnavailable("host: this plug-in cannot run its language model partially")
        key = ("llm", layer, attention)
        if key not in self._cache:
            self._cache[key] = self._llm(layer, attention)
        return self._cache[key]

    def llm_hidden(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """([I, P+N, D] image tokens, [I, T, D] question tokens, [I, T] mask) after LLM layer ``layer``."""
        hidden, _ = self._llm_layer(layer, False)
        r = self.image_rows[self.rows]
        img = torch.stack([hidden[int(b), self.image_slots[int(i)]] for i, b in zip(self.rows, r)])
        q, m = text_query(hidden, self.question)
        return img, q[r], m[r]

    def llm_attention(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([I, H, T, P+N] attention of the question tokens to the image's tokens in LLM layer ``layer``, [I, T] mask).

        Softmax over the whole prompt (so rows do not sum to 1 over the image), float32.
        """
        _, probs = self._llm_layer(layer, True)
        r = self.image_rows[self.rows]
        out, masks = [], []
        t = int(self.question.sum(1).max()) if self.question.numel() else 0
        for i, b in zip(self.rows.tolist(), r.tolist()):
            qpos = torch.nonzero(self.question[b]).flatten()
            a = probs[b][:, qpos][:, :, self.image_slots[i]]  # [H, t_b, n]
            pad = a.new_zeros(a.shape[0], t - a.shape[1], a.shape[2])
            out.append(torch.cat([a, pad], 1))
            masks.append(torch.arange(t, device=a.device) < a.shape[1])
        return torch.stack(out), torch.stack(masks)


def select_in_llm_space(
    allocator: nn.Module,
    llm_tokens: torch.Tensor,
    score_tokens: torch.Tensor,
    query: torch.Tensor | None,
    query_mask: torch.Tensor | None,
    **kwargs: Any,
):
    """Run ``allocator`` on scoring-space tokens; return its output with the LLM-space tokens it selected.

    llm_tokens [I, P+N, D] (what the language model gets), score_tokens [I, P+N, Dr] (where the
    relevance lives), query [I, T, Dr]. The candidate indices are shared (fine tokens, then
    pooled levels: pooling is linear, so a pooled candidate is pooled in either space).
    Raises ``ValueError`` for an allocator that outputs merged tokens.
    """
    out = allocator(score_tokens, query=query, query_mask=query_mask, **kwargs)
    p = int(kwargs.get("num_prefix_tokens", 0))
    n = score_tokens.shape[1] - p
    grid = kwargs.get("grid") or (int(round(n**0.5)),) * 2
    pos = out.positions.clamp(min=0)  # [I, K, 3] (row, col, level) on the fine grid
    levels = tuple(range(1, int(pos[..., 2].max()) + 1)) if pos.numel() else ()
    idx = candidate_index(pos.reshape(-1, 3), grid).reshape(pos.shape[:2])  # into fine + levels 1..max

    def take(tokens: torch.Tensor) -> torch.Tensor:
        cand = build_pyramid(tokens[:, p:], grid, levels).candidates
        got = cand.gather(1, idx[..., None].expand(-1, -1, cand.shape[-1]))
        return torch.where(out.mask[..., None], got, torch.zeros_like(got))

    if not torch.allclose(take(score_tokens).to(out.tokens.dtype), out.tokens, atol=1e-5, rtol=1e-4):
        raise ValueError(
            f"relevance: {type(allocator).__name__} outputs merged tokens, which exist only in the scoring space; "
            "use relevance='embeddings' with merging allocators"
        )
    out.tokens = take(llm_tokens)
    return out


def run_allocator(
    allocator: nn.Module,
    tokens: torch.Tensor,
    query: torch.Tensor | None,
    query_mask: torch.Tensor | None,
    *,
    host: PluginSignals | None = None,
    scoring: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
):
    """One allocator call of a plug-in: host signals to the methods that read them, a scoring space when asked.

    tokens [I, P+N, D] (LLM space), query [I, T, D]; ``scoring`` = (tokens, query, mask) of
    another relevance space (:func:`select_in_llm_space`). An allocator with ``reads_host``
    gets ``host=``; when the host lacks a signal it needs (e.g. ToMe's merging inside the
    tower, or CDPruner's text tower without ``text_tower=``), the call is repeated without a
    host, i.e. with the method's documented host-free rule, a ``UserWarning`` says so and
    ``extras["host_unavailable"]`` holds the reason.
    """

    def call(**extra: Any):
        if scoring is None:
            return allocator(tokens, query=query, query_mask=query_mask, **kwargs, **extra)
        return select_in_llm_space(allocator, tokens, scoring[0], scoring[1], scoring[2], **kwargs, **extra)

    if host is None or not getattr(allocator, "reads_host", False):
        return call()
    try:
        return call(host=host)
    except SignalUnavailable as err:
        warnings.warn(
            f"allocator: {type(allocator).__name__} asked for a signal this host lacks ({err}); "
            "it runs with its host-free rule instead",
            UserWarning,
            stacklevel=3,
        )
        out = call()
        out.extras["host_unavailable"] = str(err)
        return out
