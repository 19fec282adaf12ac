"""``arr_coc_host``: training-free ``arr_coc`` whose relevance space is built from host signals.

No stage 2, no learned module: the exact greedy conditional-MI selection of
:func:`arr_coc.attending.greedy_conditional_mi` runs in a space assembled from what the host
VLM already has (:mod:`arr_coc.allocators.host`):

- ``host.patch_features()`` [B, N, Dj]: the patch tokens in the joint CLIP space, where the
  vision tower and its paired text tower were contrastively aligned;
- ``host.text_features()`` ([B, T, Dj], [B, T]) (``text="tokens"``) or
  ``host.text_embedding()`` [B, Dj] (``text="pooled"``): the instruction in that space;
- ``host.vision_attention(prior_layer)``: the vision tower's [CLS] attention (``prior="cls"``);
- the LLM's own attention in an early layer (``prior="llm"``, the default; see below).

Validation (benchmark v2, step-3,200 stage-1 snapshot): experiments/results/arr_coc_host.md.

What it computes, exactly (M candidates: the N fine tokens, plus pooled 2^l x 2^l regions
for each ``levels`` entry, a pooled candidate being the area mean of its patches' vectors):

1. The relevance space. ``space="joint"``: candidate j is z_j, its joint-space vector, and
   the query tokens are the text features q_1..q_T. ``space="sum"`` (the direct sum of the
   joint space and the allocator's token space, i.e. what the LLM reads): candidate j is
   ``phi_j = [sqrt(w) z_j / |z_j| ; sqrt(1 - w) x_j / |x_j|]`` (x_j its token, w =
   ``joint_weight``) and query token i is ``[q_i ; 0]``. Under the cosine kernel of
   :mod:`arr_coc.attending` this is the Gaussian model with
   ``Cov(c_i, c_j) = w cos(z_i, z_j) + (1 - w) cos(x_i, x_j)`` (redundancy seen in both
   spaces) and ``Cov(c_j, q_i) = sqrt(w) cos(z_j, q_i)`` (relevance read in the joint space
   only, where text and patches were aligned), unit variances, plus the jitter.
   ``space="tokens"`` (the default): the allocator's token space alone (candidates x_j, the
   query the allocator's ``query`` tokens when their width is the tokens', e.g. the LLM's
   word embeddings; otherwise no query term): no text tower needed. On validation the joint
   part added nothing once the LLM prior is on (the stage-0 text tower does not ground the
   question), so the default reads no text tower.
2. The gain of candidate j given the picks S, in nats:
   ``alpha * I(c_j ; Q | c_S) + (1 - alpha) * R_j(S) + u_j [c_j not redundant]``, with the
   query and coverage terms of :func:`~arr_coc.attending.greedy_conditional_mi` and the
   optional query-agnostic prior ``u_j = prior_weight * max(0, log(N p_j))``, where p is a
   salience distribution over the patches (a pooled candidate: the mean p of its patches),
   so ``log(N p_j)`` is the pointwise information of "j is salient" against a uniform
   choice:

   - ``prior="cls"``: p = the vision tower's [CLS] attention over the patches in block
     ``prior_layer`` (default -2, VisionZip's / FasterVLM's layer), averaged over heads and
     renormalised over the N patches. It gives count and "no"-existence questions, whose
     words name no single patch, the coverage of every object;
   - ``prior="deviation"``: p_j proportional to ``|x_j - mean(x)|^2`` in the token space, so
     ``log(N p_j) = log(Var_j / mean Var)``: twice the Gaussian rate of token j at the
     distortion of the average token under the centred linear kernel;
   - ``prior="llm"`` (the default): p = the host LLM's attention in layer ``llm_layer``
     (default 0) of the question tokens over the fine tokens (heads averaged, then the real
     question tokens; ``llm_reader="readout"``: the last token, FastV's reader), read before
     any pruning by a partial forward (``host.llm_attention(layer)`` of the plug-ins, or
     ``host.answer_in_llm`` with a :class:`LayerAttentionProbe` on the embedded base VLM).
     This is the question's relevance: ``log(N p_j)`` is the pointwise information of "the
     question reads j" against a uniform reading. Its cost is one LLM layer over every
     token (1 / 4 of an unpruned prefill on the base VLM v2, 1 / 32 on LLaVA-1.5-7B);
   - ``prior=None``: no prior.
3. Greedy: pick the largest gain, condition on it, repeat until ``budget`` picks or the best
   gain falls below ``price``. ``gain`` reports the chain-rule total ``I(c_S ; Q)`` in the
   space of step 1 (the prior never enters it).
4. ``fill="background"`` (default ``"greedy"``): what the budget left after the question's
   evidence is spent on. The greedy's coverage term fills it with the tokens that tell most
   about the rest of the image, the other objects, and a VLM can take an object it keeps for
   the answer: on benchmark v2 the relevant cells plus the least salient cells score 1.000 at 16
   tokens, plus the most salient 0.982, the relevant cells alone 0.992
   (experiments/results/arr_coc_host_diag/fill.py). With it the greedy's picks whose prior
   information ``u_j`` exceeds ``evidence_threshold`` nats are kept (in pick order) and the rest
   of the budget goes to the fine tokens they do not cover with the smallest salience
   ``||x_j - mean_i x_i||`` (:func:`background_fill`): what the kept set tells beyond the
   evidence is then as little as the budget allows. ``gain`` is then None (the fill tokens are
   not the greedy's); ``extras["evidence"]`` [B] counts the evidence tokens kept.

Without a host (or a host without text / vision signals: :class:`SignalUnavailable` is
raised by the host, as for ``cdpruner``), the joint space is replaced by the allocator's own
tokens (z = x), the query by ``query`` when its width is the tokens' (otherwise coverage
only), and the [CLS] prior by the prefix tokens' attention
(:func:`arr_coc.token_scores.cls_attention_scores`); ``extras["signal"]`` says ``"tokens"``
instead of ``"host"``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from arr_coc.allocators.arr_coc import ArrCocAllocator
from arr_coc.allocators.base import AllocationContext, Selection
from arr_coc.allocators.host import request_signal
from arr_coc.allocators.registry import register_allocator
from arr_coc.attending import greedy_conditional_mi
from arr_coc.knowing import pyramid_scores
from arr_coc.pyramid import build_pyramid, coverage_mask
from arr_coc.token_scores import cls_attention_scores

__all__ = ["ArrCocHostAllocator", "LayerAttentionProbe", "background_fill", "salience_information"]

_SPACES = ("joint", "sum", "tokens")
_TEXTS = ("tokens", "pooled")
_PRIORS = (None, "cls", "deviation", "llm")
_READERS = ("question", "readout")
_FILLS = ("greedy", "background")


class LayerAttentionProbe:
    """An in-LLM pruner that records layer ``layer``'s attention of the text to the visual slots.

    Run by ``host.answer_in_llm``: after layer ``layer`` it stores ``attention`` [B, Kc]
    (heads averaged; ``reader="question"``: the mean over the real text tokens, the readout
    included; ``"readout"``: the last token only, FastV's reader) and keeps a single visual
    slot, so the layers after it run on a short sequence (their output is discarded).
    """

    in_llm = True

    def __init__(self, layer: int, reader: str):
        self.layer, self.reader = layer, reader
        self.attention: torch.Tensor | None = None

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        from arr_coc.allocators.host import resolve_layer

        return (resolve_layer(self.layer, num_layers, name="llm_layer"),)

    def prune(self, state):
        from arr_coc.allocators.host import PruneDecision

        att = state.attention.float().mean(1)  # [B, L, L]
        vis = att[:, state.text_slice, state.visual_slice]  # [B, Tt, Kc]
        if self.reader == "readout":
            a = vis[:, -1]
        else:
            tm = state.text_mask.to(vis.dtype)
            a = (vis * tm[:, :, None]).sum(1) / tm.sum(1, keepdim=True).clamp_min(1)
        self.attention = a.masked_fill(~state.visual_mask, 0.0)
        b = a.shape[0]
        return PruneDecision(keep=torch.zeros(b, 1, dtype=torch.long, device=a.device))


def salience_information(p: torch.Tensor, grid: tuple[int, int], levels: tuple[int, ...] = ()) -> torch.Tensor:
    """Pointwise information of a salience distribution against uniform, per candidate.

    p: [B, N] non-negative patch weights (renormalised here; an all-zero row is uniform) ->
    [B, M] nats ``max(0, log(N pbar_j))`` with ``pbar_j`` the mean of p over candidate j's
    patches (the fine tokens, then each pooled level, as :func:`arr_coc.pyramid.build_pyramid`).
    """
    if not isinstance(p, torch.Tensor) or p.dim() != 2:
        raise ValueError(f"p: expected a [B, N] tensor, got {getattr(p, 'shape', type(p))}")
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError("p: expected finite values >= 0")
    n = p.shape[1]
    total = p.sum(1, keepdim=True)
    p = torch.where(total > 0, p / total.clamp_min(torch.finfo(p.dtype).tiny), torch.full_like(p, 1.0 / max(n, 1)))
    pbar = pyramid_scores(p, grid, levels) if levels else p
    return (pbar * n).clamp_min(torch.finfo(p.dtype).tiny).log().clamp_min(0)


def background_fill(
    indices: torch.Tensor, evidence: torch.Tensor, fine: torch.Tensor, positions: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the evidence among a selection and fill the rest of it with the least salient fine tokens.

    indices [B, K] long candidate indices in pick order (< 0: padding), evidence [B, M] bool (which
    candidates are evidence), fine [B, N, D] the fine tokens (candidates 0 .. N-1), positions [M, 3]
    (row, col, level) -> (indices [B, K], evidence count [B]): the evidence picks first, in their
    order, then the fine tokens none of them covers in increasing salience ``||x_j - mean_i x_i||``,
    as many as the selection had real picks (its padding stays padding).
    """
    if indices.dim() != 2 or evidence.dim() != 2 or evidence.shape[0] != indices.shape[0]:
        raise ValueError(f"indices/evidence: expected [B, K] and [B, M], got {tuple(indices.shape)} and {tuple(evidence.shape)}")
    b, k = indices.shape
    n = fine.shape[1]
    real = indices >= 0
    safe = indices.clamp_min(0)
    is_ev = evidence.gather(1, safe) & real  # [B, K]
    slot = torch.arange(k, device=indices.device).expand(b, k)
    order = torch.where(is_ev, slot, slot + k).argsort(1)  # evidence picks first, in pick order
    ev_idx, n_ev = safe.gather(1, order), is_ev.sum(1)  # [B, K], [B]
    covered = rearrange(coverage_mask(positions[safe], is_ev, grid), "b h w -> b (h w)")  # [B, N]
    x = fine.float()
    salience = (x - x.mean(1, keepdim=True)).norm(dim=-1).masked_fill(covered, math.inf)  # [B, N]
    fill_sal, fill_idx = salience.sort(1)
    if n < k:  # fewer fine tokens than slots: the slots past them are never filled
        pad = fill_idx.new_zeros(b, k - n)
        fill_idx, fill_sal = torch.cat([fill_idx, pad], 1), torch.cat([fill_sal, torch.full_like(fill_sal[:, :1], math.inf).expand(b, k - n)], 1)
    j = (slot - n_ev[:, None]).clamp_min(0)  # position in the fill order
    fill_ok = torch.isfinite(fill_sal.gather(1, j))
    want = slot < real.sum(1, keepdim=True)  # as many tokens as the selection had
    out = torch.where(slot < n_ev[:, None], ev_idx, torch.where(fill_ok, fill_idx.gather(1, j), -1))
    return torch.where(want, out, torch.full_like(out, -1)), n_ev


@register_allocator("arr_coc_host")
class ArrCocHostAllocator(ArrCocAllocator):
    """Training-free greedy conditional MI in a relevance space built from host signals.

    Args:
        alpha: query focus in [0, 1]; price: nats per token (> 0 makes the budget adaptive).
        space: ``"joint"``, ``"sum"`` or ``"tokens"`` (see the module docstring).
        joint_weight: w in [0, 1], the joint space's share of the candidate covariance (``"sum"``).
        text: ``"tokens"`` (the text tower's per-token features) or ``"pooled"`` (its eos embedding).
        prior: None, ``"cls"``, ``"deviation"`` or ``"llm"``; prior_weight: its weight (nats per nat, >= 0).
        prior_layer: the vision block whose [CLS] attention ``prior="cls"`` reads.
        llm_layer, llm_reader: the LLM layer whose attention ``prior="llm"`` reads, and whose rows
            (``"question"``: the mean over the question tokens; ``"readout"``: the last token).
        levels: pooled pyramid levels (() = fine tokens only, the default).
        jitter, var_floor, distortion: of :func:`arr_coc.attending.greedy_conditional_mi`.
        fill: ``"greedy"`` (the greedy spends the whole budget) or ``"background"`` (its evidence
            picks, then the least salient fine tokens; module docstring, step 4; needs a prior).
        evidence_threshold: with ``fill="background"``, a pick is evidence when its prior
            information exceeds this many nats (>= 0).
    """

    reads_host = True
    permutation_equivariant = False

    def __init__(
        self,
        alpha: float = 0.9,
        price: float = 0.0,
        *,
        space: str = "tokens",
        joint_weight: float = 0.5,
        text: str = "tokens",
        prior: str | None = "llm",
        prior_weight: float = 1.0,
        prior_layer: int = -2,
        llm_layer: int = 0,
        llm_reader: str = "question",
        levels: tuple[int, ...] = (),
        jitter: float = 1e-6,
        var_floor: float = 1e-4,
        distortion: float = 1e-2,
        fill: str = "greedy",
        evidence_threshold: float = 1.0,
    ):
        if alpha is None or price is None:
            raise ValueError("alpha / price: arr_coc_host is training-free; expected fixed floats, got None")
        super().__init__(alpha, price, levels=tuple(levels), kernel="cosine", jitter=jitter, var_floor=var_floor,
                         distortion=distortion)
        if space not in _SPACES:
            raise ValueError(f"space: expected one of {_SPACES}, got {space!r}")
        if not (isinstance(joint_weight, (int, float)) and 0.0 <= joint_weight <= 1.0):
            raise ValueError(f"joint_weight: expected a float in [0, 1], got {joint_weight!r}")
        if text not in _TEXTS:
            raise ValueError(f"text: expected one of {_TEXTS}, got {text!r}")
        if prior not in _PRIORS:
            raise ValueError(f"prior: expected one of {_PRIORS}, got {prior!r}")
        if not (isinstance(prior_weight, (int, float)) and math.isfinite(prior_weight) and prior_weight >= 0):
            raise ValueError(f"prior_weight: expected a finite float >= 0, got {prior_weight!r}")
        if isinstance(prior_layer, bool) or not isinstance(prior_layer, int):
            raise ValueError(f"prior_layer: expected an int, got {prior_layer!r}")
        if isinstance(llm_layer, bool) or not isinstance(llm_layer, int):
            raise ValueError(f"llm_layer: expected an int, got {llm_layer!r}")
        if llm_reader not in _READERS:
            raise ValueError(f"llm_reader: expected one of {_READERS}, got {llm_reader!r}")
        self.llm_layer, self.llm_reader = llm_layer, llm_reader
        self._llm_cache: tuple[object, torch.Tensor, torch.Tensor] | None = None
        self.space, self.joint_weight, self.text = space, float(joint_weight), text
        self.prior, self.prior_weight, self.prior_layer = prior, float(prior_weight), prior_layer
        if fill not in _FILLS:
            raise ValueError(f"fill: expected one of {_FILLS}, got {fill!r}")
        if not (isinstance(evidence_threshold, (int, float)) and not isinstance(evidence_threshold, bool)
                and math.isfinite(evidence_threshold) and evidence_threshold >= 0):
            raise ValueError(f"evidence_threshold: expected a finite float >= 0, got {evidence_threshold!r}")
        self.fill, self.evidence_threshold = fill, float(evidence_threshold)
        if fill == "background" and not self._has_evidence():
            raise ValueError("fill: 'background' needs a prior (evidence is read from the prior information)")

    def _has_evidence(self) -> bool:
        """Whether ``fill="background"`` has a term to read evidence from (here: the prior)."""
        return self.prior is not None and self.prior_weight > 0

    # ------------------------------------------------------------------ signals
    def _joint(self, ctx: AllocationContext, dtype: torch.dtype):
        """(z [B, N, Dj], query [B, T, Dj] | None, query_mask [B, T] | None, signal)."""
        b, n = ctx.batch_size, ctx.num_fine
        if ctx.host is None or self.space == "tokens":
            x = ctx.fine.to(dtype)
            q = ctx.query
            if q is None or q.shape[-1] != x.shape[-1]:
                return x, None, None, "tokens" if ctx.host is None else "host"
            return x, q.to(dtype), ctx.query_mask, "tokens" if ctx.host is None else "host"
        z = request_signal(ctx.host, "patch_features", requester="arr_coc_host")
        if z.dim() != 3 or tuple(z.shape[:2]) != (b, n):
            raise ValueError(f"host: patch_features() must be [B={b}, N={n}, Dj], got {tuple(z.shape)}")
        if self.text == "pooled":
            q = request_signal(ctx.host, "text_embedding", requester="arr_coc_host")[:, None]
            qm = torch.ones(b, 1, dtype=torch.bool, device=q.device)
        else:
            q, qm = request_signal(ctx.host, "text_features", requester="arr_coc_host")
        if q.dim() != 3 or q.shape[0] != b or q.shape[-1] != z.shape[-1]:
            raise ValueError(f"host: text features must be [B={b}, T, Dj={z.shape[-1]}], got {tuple(q.shape)}")
        return z.to(dtype), q.to(dtype), qm.bool(), "host"

    def _salience(self, ctx: AllocationContext, dtype: torch.dtype) -> torch.Tensor | None:
        """[B, N] the prior's salience weights p (unnormalised), or None."""
        if self.prior is None or self.prior_weight == 0:
            return None
        if self.prior == "deviation":
            x = ctx.fine.to(dtype)
            return (x - x.mean(1, keepdim=True)).pow(2).sum(-1)
        p = ctx.prefix.shape[1]
        if self.prior == "llm":
            return self._llm_attention(ctx, dtype)
        if ctx.host is None:
            return cls_attention_scores(ctx.prefix.to(dtype), ctx.fine.to(dtype)).to(dtype)
        att = request_signal(ctx.host, "vision_attention", self.prior_layer, requester="arr_coc_host")
        if att.dim() != 4 or att.shape[-1] != p + ctx.num_fine or p < 1:
            raise ValueError(
                f"host: vision_attention({self.prior_layer}) must be [B, heads, P+N, P+N] with a [CLS] token "
                f"(P = {p}, N = {ctx.num_fine}), got {tuple(att.shape)}"
            )
        return att[:, :, 0, p:].mean(1).to(dtype)

    def _llm_attention(self, ctx: AllocationContext, dtype: torch.dtype) -> torch.Tensor | None:
        """[B, N] layer ``llm_layer``'s attention of the question to the fine tokens, or None
        without a host.

        From ``host.llm_attention(layer)`` where the host has it (the LLaVA / Qwen-VL
        plug-ins: a partial prefill on the unpruned prompt; heads averaged, then the real
        question tokens, or the last one for ``llm_reader="readout"``), else from a partial
        forward of the host's LLM on every fine token (``host.answer_in_llm`` with a
        :class:`LayerAttentionProbe`: the embedded base VLM, whose text is the question and its
        readout token).
        """
        host = ctx.host
        if host is None:
            return None
        from arr_coc.allocators.host import SignalUnavailable

        p = ctx.prefix.shape[1]
        if callable(getattr(host, "llm_attention", None)):
            att, mask = host.llm_attention(self.llm_layer)  # [B, H, T, P+N], [B, T]
            if att.dim() != 4 or att.shape[-1] != p + ctx.num_fine:
                raise ValueError(f"host: llm_attention must be [B, H, T, P+N={p + ctx.num_fine}], got {tuple(att.shape)}")
            a = att.to(dtype).mean(1)[:, :, p:]  # [B, T, N]
            m = mask.to(device=a.device, dtype=dtype)
            if self.llm_reader == "readout":
                last = (mask.long().cumsum(1).argmax(1))  # the last real question token
                return a[torch.arange(a.shape[0], device=a.device), last]
            return (a * m[:, :, None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
        ids, mask = getattr(host, "question_ids", None), getattr(host, "question_mask", None)
        if ids is None or not callable(getattr(host, "answer_in_llm", None)):
            raise SignalUnavailable(
                "host: arr_coc_host(prior='llm') needs host.llm_attention(layer), or host.answer_in_llm and the "
                "host's question_ids; this host has neither"
            )
        c = self._llm_cache
        if c is not None and c[0] is host and c[1].shape == ctx.fine.shape and torch.equal(c[1], ctx.fine):
            return c[2].to(dtype)
        probe = LayerAttentionProbe(self.llm_layer, self.llm_reader)
        with torch.no_grad():
            host.answer_in_llm(probe, ctx.fine, None, None, ids, mask, 1)
        if probe.attention is None or probe.attention.shape != ctx.fine.shape[:2]:
            raise ValueError(f"host: layer {self.llm_layer}'s attention must be [B, N] = {tuple(ctx.fine.shape[:2])}")
        self._llm_cache = (host, ctx.fine, probe.attention)
        return probe.attention.to(dtype)

    # ------------------------------------------------------------------ selection
    def select(self, ctx: AllocationContext) -> Selection:
        sel = self._greedy(ctx)
        return self._background(ctx, sel, sel.extras.get("prior_information"))

    def _background(self, ctx: AllocationContext, sel: Selection, information: torch.Tensor | None) -> Selection:
        """With ``fill="background"``: the picks whose ``information`` [B, M] (nats) exceeds the
        evidence threshold, then the least salient fine tokens (:func:`background_fill`)."""
        if self.fill != "background":
            return sel
        if information is None:
            raise ValueError("fill: 'background' reads the evidence from the prior, which this call did not compute")
        evidence = information.detach() > self.evidence_threshold  # [B, M]
        sel.indices, sel.extras["evidence"] = background_fill(sel.indices, evidence, ctx.fine, ctx.pyramid.positions, ctx.grid)
        sel.gain = None
        return sel

    def _greedy(self, ctx: AllocationContext, extra_unary: torch.Tensor | None = None) -> Selection:
        """The greedy of step 3; ``extra_unary`` [B, M] (nats, >= 0) is added to the prior's term
        (a trained subclass's learned relevance, :mod:`arr_coc.allocators.arr_coc_host_trained`)."""
        dtype = torch.float64 if ctx.fine.dtype == torch.float64 else torch.float32
        z, q, qm, signal = self._joint(ctx, dtype)
        levels = self.pyramid_levels
        zc = build_pyramid(z, ctx.grid, levels).candidates if levels else z  # [B, M, Dj]
        if self.space == "sum":
            w = self.joint_weight
            xc = F.normalize(ctx.candidates.to(dtype), dim=-1)
            emb = torch.cat([math.sqrt(w) * F.normalize(zc, dim=-1), math.sqrt(1.0 - w) * xc], -1)
            if q is not None:
                q = torch.cat([q, q.new_zeros(*q.shape[:2], xc.shape[-1])], -1)
        else:
            emb = zc
        sal = self._salience(ctx, dtype)
        unary = None if sal is None else (self.prior_weight * salience_information(sal, ctx.grid, levels)).to(dtype)
        if extra_unary is not None:
            extra_unary = extra_unary.detach().to(dtype)
            unary = extra_unary if unary is None else unary + extra_unary
        b = ctx.batch_size
        # fixed alpha and price (training-free); without any query, alpha = 0 (coverage only)
        has_q = q is not None and (qm is None or bool(qm.any()))
        alpha = torch.full((b,), self.balancer.fixed_alpha if has_q else 0.0, dtype=dtype, device=emb.device)
        price = torch.full((b,), self.balancer.fixed_price, dtype=dtype, device=emb.device)
        res = greedy_conditional_mi(
            emb, q, qm if q is not None else None, ctx.budget, alpha, price,
            kernel="cosine", jitter=self.jitter, var_floor=self.var_floor, distortion=self.distortion,
            unary=unary,
        )
        extras = dict(
            pick_order=res.indices, step_gains=res.gains, query_gains=res.query_gains,
            coverage_gains=res.coverage_gains, alpha=alpha, price=price, signal=signal,
        )
        if unary is not None:
            extras["prior_information"] = unary
        if self.prior == "llm" and sal is not None:
            extras["llm_attention"] = sal
        return Selection(indices=res.indices, gain=res.total, extras=extras)


@register_allocator("arr_coc_host_llm")
class ArrCocHostLLMAllocator(ArrCocHostAllocator):
    """The same greedy run inside the LLM, after layer ``llm_layer`` (FastV's place; in-LLM).

    A host that runs its LLM layer by layer (:class:`arr_coc.allocators.host.InLLMHost`) calls
    :meth:`prune` after layer ``llm_layer`` (layers 0 .. llm_layer see every visual token,
    as in FastV / SparseVLM). There the relevance space is that layer's output: candidate j is
    the hidden state h_j of visual slot j, the query tokens are the hidden states of the text
    tokens (the question and the readout), and the gain of j given the kept set S is, in nats,

        alpha * I(h_j ; H_Q | h_S) + (1 - alpha) * R_j(S) + prior_weight * max(0, log(n p_j)),

    the first two terms the Gaussian (cosine-kernel) terms of
    :func:`~arr_coc.attending.greedy_conditional_mi`, p the layer's attention of the text
    (``llm_reader``) over the n real visual slots, renormalised. ``prior`` is ignored here.
    Called as a plain allocator (no in-LLM host) it is :class:`ArrCocHostAllocator` with
    ``prior="llm"`` (the selection before the LLM, reading the same layer by a partial forward).
    """

    in_llm = True

    def __init__(self, alpha: float = 0.0, price: float = 0.0, *, prior_weight: float = 1.0, **kwargs):
        kwargs["prior"] = "llm"
        if kwargs.get("fill", "greedy") != "greedy":  # inside the LLM every slot has read every token already
            raise ValueError(f"fill: arr_coc_host_llm prunes inside the LLM, expected 'greedy', got {kwargs['fill']!r}")
        super().__init__(alpha, price, prior_weight=prior_weight, **kwargs)

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        from arr_coc.allocators.host import resolve_layer

        return (resolve_layer(self.llm_layer, num_layers, name="llm_layer"),)

    def prune(self, state):
        return self._prune(state)

    def _prune(self, state, extra_unary: torch.Tensor | None = None):
        """The in-LLM greedy; ``extra_unary`` [B, Kc] (nats, >= 0) is added to the prior's term."""
        from arr_coc.allocators.host import PruneDecision

        kc = state.num_visual_slots
        vm = state.visual_mask
        dtype = torch.float32
        h = state.hidden[:, :kc].to(dtype) * vm[..., None]  # padded slots: zero vectors, never picked
        q = state.hidden[:, state.text_slice].to(dtype)
        tm = state.text_mask.bool()
        att = state.attention.to(dtype).mean(1)[:, state.text_slice, state.visual_slice]  # [B, Tt, Kc]
        if self.llm_reader == "readout":
            a = att[:, -1]
        else:
            tmf = tm.to(dtype)
            a = (att * tmf[:, :, None]).sum(1) / tmf.sum(1, keepdim=True).clamp_min(1)
        a = a.masked_fill(~vm, 0.0)
        n_real = vm.sum(1, keepdim=True).to(dtype)
        p = a / a.sum(1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        unary = self.prior_weight * (n_real * p).clamp_min(torch.finfo(dtype).tiny).log().clamp_min(0) * vm
        if extra_unary is not None:
            unary = unary + extra_unary.detach().to(dtype) * vm
        b = h.shape[0]
        budget = torch.minimum(state.budget, vm.sum(1))
        alpha = torch.full((b,), self.balancer.fixed_alpha, dtype=dtype, device=h.device)
        price = torch.full((b,), self.balancer.fixed_price, dtype=dtype, device=h.device)
        res = greedy_conditional_mi(
            h, q, tm, budget, alpha, price, kernel="cosine", jitter=self.jitter, var_floor=self.var_floor,
            distortion=self.distortion, unary=unary,
        )
        return PruneDecision(keep=res.indices, extras={"gain": res.total, "llm_attention": a, "prior_information": unary})
