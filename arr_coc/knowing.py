"""Knowing: how much does each candidate tell about the query (and about the image)?

- :class:`ParticipatoryScorer` (query-aware): multi-head cross-attention from the query
  tokens to the candidates in a learned shared relevance space. Per candidate it returns a
  pointwise mutual information estimate in nats,
  ``pmi_j = log p(j | query) - log p(j)``, where ``p(j | query)`` is the attention
  distribution over the candidates (averaged over heads and real query tokens) and
  ``p(j)`` a prior (uniform, or learned and query-agnostic), together with the projected
  embeddings that :mod:`arr_coc.attending` works on.
- :class:`PropositionalScorer` / :class:`PerspectivalScorer` (query-agnostic): what a token
  holds / what stands out, from the vision tokens (feature norm, CLS attention) or from the
  pixels (patch colour entropy in nats, contrast + edge salience). Thin modules over the pure
  functions of :mod:`arr_coc.token_scores` and :mod:`arr_coc.texture`. One image's scores
  never depend on the other images of the batch.

Untrained behaviour. The candidate map is the identity plus a zero-initialised low-rank
correction (a fixed semi-orthogonal basis first when ``relevance_dim`` differs from the
vision width), and the query map is the identity (or semi-orthogonal) too, so cosines in
the relevance space equal (or approximate) cosines of the raw embeddings. Dimensions left as
None are lazy: until the parameters exist the maps compute that initial function for any
width, and they are created (in place) by the first forward in training mode with
gradients on, by a width that needs a projection, or by :meth:`ParticipatoryScorer.materialize`
(call it before building an optimizer or saving, so nothing is missed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from arr_coc import texture, token_scores
from arr_coc.pyramid import build_pyramid

__all__ = [
    "ParticipatoryScorer",
    "PerspectivalScorer",
    "PropositionalScorer",
    "ScorerOutput",
    "masked_mean",
    "pyramid_scores",
]


@dataclass
class ScorerOutput:
    """What :class:`ParticipatoryScorer` returns.

    pmi:           [B, M] log p(j | query) - log p(j) in nats (0 where there is no real query token).
    candidate_emb: [B, M, R] candidates in the relevance space.
    query_emb:     [B, T, R] query tokens in the relevance space (None without a query).
    query_summary: [B, R] mean of the real query tokens (zeros without one).
    has_query:     [B] bool, whether the example has at least one real query token.
    log_prior:     [B, M] log p(j).
    """

    pmi: torch.Tensor
    candidate_emb: torch.Tensor
    query_emb: torch.Tensor | None
    query_summary: torch.Tensor
    has_query: torch.Tensor
    log_prior: torch.Tensor


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of x [B, T, D] where mask [B, T] is True -> [B, D] (zeros for an empty row)."""
    if mask is None:
        return x.mean(dim=1)
    w = mask.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp_min(1)


# ---------------------------------------------------------------------- lazy maps
class _Lazy(LazyModuleMixin, nn.Module):
    """Lazy parameters materialised on demand, not forced by the first forward.

    Until materialised, a map computes its initial function (the identity) for any width,
    so an untrained module serves inputs of every width; it materialises (in place, so an
    optimizer holding the parameters keeps them) when it trains, when a width change makes a
    projection necessary, or on :meth:`materialize`. LazyModuleMixin supplies saving and
    loading of (un)initialised parameters.
    """

    def __init__(self):
        super().__init__()
        self._initialize_hook.remove()  # no forced materialisation on the first forward

    @property
    def materialized(self) -> bool:
        return not self.has_uninitialized_params()


class _CandidateMap(_Lazy):
    """x [.., D] -> x P + (x A) B [.., R]: P = identity (R = D) or a fixed semi-orthogonal basis; B starts at 0."""

    def __init__(self, in_dim: int | None, out_dim: int | None, rank: int, learned_prior: bool):
        super().__init__()
        self.out_dim, self.rank, self.learned_prior = out_dim, rank, learned_prior
        self.down = UninitializedParameter()
        self.up = UninitializedParameter()
        self.prior = UninitializedParameter() if learned_prior else None
        self.basis = UninitializedBuffer()
        if in_dim is not None:
            self.initialize_parameters(in_dim)

    def initialize_parameters(self, d: int) -> None:  # type: ignore[override]
        if self.materialized:
            return
        r = self.out_dim or d
        self.out_dim = r
        dev = self.down.device
        with torch.no_grad():
            self.down.materialize((d, self.rank), device=dev)
            nn.init.normal_(self.down, std=1.0 / math.sqrt(d))
            self.up.materialize((self.rank, r), device=dev)
            nn.init.zeros_(self.up)
            if self.prior is not None:
                self.prior.materialize((r,), device=dev)
                nn.init.zeros_(self.prior)
            if r == d:
                self.basis.materialize((0,), device=dev)
            else:
                self.basis.materialize((d, r), device=dev)
                g = torch.Generator().manual_seed(0)
                w = torch.randn(max(d, r), min(d, r), generator=g)
                qmat = torch.linalg.qr(w)[0]  # orthonormal columns
                self.basis.copy_(qmat if d >= r else qmat.T)

    def out_width(self, d: int) -> int:
        return self.out_dim or d

    def forward(self, x: torch.Tensor, *, materialize: bool = False) -> torch.Tensor:
        d = x.shape[-1]
        if not self.materialized:
            if not materialize and self.out_width(d) == d:
                return x  # the initial map, for any width
            self.initialize_parameters(d)
        if d != self.down.shape[0]:
            raise ValueError(f"candidates: this scorer was built for width {self.down.shape[0]}, got {d}")
        base = x if self.basis.numel() == 0 else x @ self.basis.to(x.dtype)
        return base + (x @ self.down.to(x.dtype)) @ self.up.to(x.dtype)

    def prior_vector(self, r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.prior is None or not self.materialized:
            return torch.zeros(r, dtype=dtype, device=device)
        return self.prior.to(dtype)


class _QueryMap(_Lazy):
    """q [.., Dq] -> q W^T [.., R]; W starts as the identity (Dq = R) or semi-orthogonal."""

    def __init__(self, in_dim: int | None, out_dim: int | None):
        super().__init__()
        self.weight = UninitializedParameter()
        if in_dim is not None and out_dim is not None:
            self.initialize_parameters(in_dim, out_dim)

    def initialize_parameters(self, d: int, out_dim: int) -> None:  # type: ignore[override]
        if self.materialized:
            return
        with torch.no_grad():
            self.weight.materialize((out_dim, d), device=self.weight.device)
            if out_dim == d:
                self.weight.copy_(torch.eye(d))
            else:
                g = torch.Generator().manual_seed(1)
                w = torch.randn(max(d, out_dim), min(d, out_dim), generator=g)
                qmat = torch.linalg.qr(w)[0]
                self.weight.copy_(qmat if out_dim >= d else qmat.T)

    def forward(self, q: torch.Tensor, out_dim: int, *, materialize: bool = False) -> torch.Tensor:
        if not self.materialized:
            if not materialize and q.shape[-1] == out_dim:
                return q
            self.initialize_parameters(q.shape[-1], out_dim)
        if q.shape[-1] != self.weight.shape[1] or out_dim != self.weight.shape[0]:
            raise ValueError(
                f"query: this scorer maps width {self.weight.shape[1]} -> {self.weight.shape[0]}, "
                f"got width {q.shape[-1]} -> {out_dim}"
            )
        return q @ self.weight.to(q.dtype).T


def _head_dots(a: torch.Tensor, emb: torch.Tensor, heads: int, head: int | None = None) -> torch.Tensor:
    """Dot products within one head (or each head) without copying emb.

    head given: a [B, T, e] against emb[..., head slice] [B, M, e] -> [B, T, M].
    head None:  a [B, H, e] (one vector per head) -> [B, H, M].
    """
    e = emb.shape[-1] // heads
    if head is not None:
        return torch.matmul(a, emb[..., head * e : (head + 1) * e].transpose(1, 2))
    return torch.stack([torch.matmul(a[:, i : i + 1], emb[..., i * e : (i + 1) * e].transpose(1, 2))[:, 0] for i in range(heads)], 1)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(h for h in range(1, min(n, at_most) + 1) if n % h == 0)


# ---------------------------------------------------------------------- participatory
class ParticipatoryScorer(nn.Module):
    """Query-to-candidate cross-attention in a learned relevance space; pointwise MI in nats.

    Args:
        vision_dim: D of the candidates (None: lazy - the identity for any width until the
            parameters are created by a training forward or :meth:`materialize`).
        query_dim: Dq of the query tokens (None: lazy likewise; a query of another width than
            R creates the query map at once, semi-orthogonal at init).
        relevance_dim: R of the relevance space (None: R = D).
        num_heads: attention heads (R must divide by it; with R inferred, the largest
            divisor of R not above it is used).
        rank: rank of the learned correction of the candidate map.
        prior: "uniform" (p(j) = 1/M) or "learned" (a query-agnostic attention, uniform at init).
        temperature: initial inverse temperature of the cosine attention (learned per head).

    forward(candidates [B, M, D], query [B, T, Dq] | None, query_mask [B, T] | None) -> :class:`ScorerOutput`.
    """

    def __init__(
        self,
        vision_dim: int | None = None,
        query_dim: int | None = None,
        relevance_dim: int | None = None,
        num_heads: int = 8,
        *,
        rank: int = 16,
        prior: str = "uniform",
        temperature: float = 10.0,
    ):
        super().__init__()
        if prior not in ("uniform", "learned"):
            raise ValueError(f"prior: expected 'uniform' or 'learned', got {prior!r}")
        if not (isinstance(num_heads, int) and num_heads >= 1):
            raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}")
        if relevance_dim is not None and relevance_dim % num_heads != 0:
            raise ValueError(f"relevance_dim: expected a multiple of num_heads={num_heads}, got {relevance_dim}")
        if not temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {temperature!r}")
        self.num_heads_max = num_heads
        self.explicit_heads = relevance_dim is not None or vision_dim is not None
        if vision_dim is not None and relevance_dim is None and vision_dim % num_heads != 0:
            raise ValueError(f"vision_dim: expected a multiple of num_heads={num_heads} (or pass relevance_dim), got {vision_dim}")
        self.prior_kind = prior
        r = relevance_dim if relevance_dim is not None else vision_dim
        self.candidate_map = _CandidateMap(vision_dim, relevance_dim, rank, prior == "learned")
        self.query_map = _QueryMap(query_dim, r)
        self.log_temperature = nn.Parameter(torch.full((num_heads,), math.log(temperature)))

    @property
    def relevance_dim(self) -> int | None:
        return self.candidate_map.out_dim

    def materialize(self, vision_dim: int, query_dim: int | None = None) -> "ParticipatoryScorer":
        """Create the learned parameters for these widths now (before building an optimizer)."""
        self.candidate_map.initialize_parameters(vision_dim)
        if query_dim is not None:
            self.query_map.initialize_parameters(query_dim, self.candidate_map.out_width(vision_dim))
        return self

    def _heads(self, r: int) -> int:
        return self.num_heads_max if self.explicit_heads else _largest_divisor(r, self.num_heads_max)

    def forward(
        self, candidates: torch.Tensor, query: torch.Tensor | None = None, query_mask: torch.Tensor | None = None
    ) -> ScorerOutput:
        if candidates.dim() != 3:
            raise ValueError(f"candidates: expected [B, M, D], got {tuple(candidates.shape)}")
        b, m, _ = candidates.shape
        dtype = torch.float64 if candidates.dtype == torch.float64 else torch.float32
        grow = self.training and torch.is_grad_enabled()  # learning starts: materialise
        emb = self.candidate_map(candidates.to(dtype), materialize=grow)  # [B, M, R]
        r = emb.shape[-1]
        h = self._heads(r)
        tau = self.log_temperature[:h].to(dtype).clamp(max=math.log(100.0)).exp()  # [H]
        # per-head cosines without a normalised copy of [B, M, R]: dot products, then / |k_j^h|
        inv_k = 1.0 / torch.linalg.vector_norm(emb.unflatten(-1, (h, r // h)), dim=-1).clamp_min(1e-12)  # [B, M, H]
        if self.prior_kind == "learned":
            prior_vec = self.candidate_map.prior_vector(r, dtype, emb.device)
            p = F.normalize(rearrange(prior_vec, "(h e) -> 1 h e", h=h), dim=-1).expand(b, -1, -1)
            prior_logits = _head_dots(p, emb, h) * inv_k.transpose(1, 2) * tau[None, :, None]  # [B, H, M]
            log_prior = (prior_logits.log_softmax(-1).exp().mean(1)).log()  # [B, M]
        else:
            log_prior = torch.full((b, m), -math.log(m), dtype=dtype, device=emb.device)
        if query is None or query.shape[1] == 0:
            zeros = torch.zeros(b, m, dtype=dtype, device=emb.device)
            return ScorerOutput(
                pmi=zeros,
                candidate_emb=emb,
                query_emb=None,
                query_summary=torch.zeros(b, r, dtype=dtype, device=emb.device),
                has_query=torch.zeros(b, dtype=torch.bool, device=emb.device),
                log_prior=log_prior,
            )
        if query.dim() != 3 or query.shape[0] != b:
            raise ValueError(f"query: expected [B={b}, T, Dq], got {tuple(query.shape)}")
        t = query.shape[1]
        mask = torch.ones(b, t, dtype=torch.bool, device=emb.device) if query_mask is None else query_mask.bool()
        if mask.shape != (b, t):
            raise ValueError(f"query_mask: expected shape {(b, t)}, got {tuple(mask.shape)}")
        qemb = self.query_map(query.to(dtype), out_dim=r, materialize=grow)  # [B, T, R]
        qh = F.normalize(rearrange(qemb, "b t (h e) -> b t h e", h=h), dim=-1).flatten(2)  # [B, T, R]
        e = r // h
        dots = torch.stack([_head_dots(qh[..., i * e : (i + 1) * e], emb, h, i) for i in range(h)], 1)
        logits = dots * inv_k.transpose(1, 2)[:, :, None, :] * tau[None, :, None, None]  # [B, H, T, M]
        log_p = logits.log_softmax(-1)  # log p_{h,t}(j)
        log_p = log_p.masked_fill(~mask[:, None, :, None], -math.inf)
        count = mask.sum(1)  # [B]
        has_query = count > 0
        # log of the mixture over heads and real tokens
        log_cond = torch.logsumexp(rearrange(log_p, "b h t m -> b m (h t)"), dim=-1) - (count * h).clamp_min(1).to(dtype).log()[:, None]
        pmi = torch.where(has_query[:, None], log_cond - log_prior, torch.zeros_like(log_prior))
        return ScorerOutput(
            pmi=pmi,
            candidate_emb=emb,
            query_emb=qemb,
            query_summary=masked_mean(qemb, mask),
            has_query=has_query,
            log_prior=log_prior,
        )


# ---------------------------------------------------------------------- query-agnostic
def pyramid_scores(scores: torch.Tensor, grid: tuple[int, int], levels: tuple[int, ...] = (1, 2)) -> torch.Tensor:
    """Per-patch scores [B, N] -> per-candidate scores [B, M] (area mean over each pooled region)."""
    return build_pyramid(scores[..., None], grid, levels).candidates[..., 0]


class PropositionalScorer(nn.Module):
    """What a token holds (query-agnostic).

    source="tokens": the L2 norm of each vision token (:func:`arr_coc.token_scores.feature_norm_scores`).
    source="pixels": the Shannon entropy in nats of each patch's own colour (or intensity)
    histogram (:func:`arr_coc.texture.patch_entropy`).

    forward(fine [B, N, D] | None, *, pixels [B, C, H, W] | None, grid (H, W) | None) -> [B, N].
    """

    def __init__(self, source: str = "tokens", *, mode: str = "colour", bins: int | None = None):
        super().__init__()
        if source not in ("tokens", "pixels"):
            raise ValueError(f"source: expected 'tokens' or 'pixels', got {source!r}")
        self.source, self.mode, self.bins = source, mode, bins

    def forward(self, fine: torch.Tensor | None = None, *, pixels: torch.Tensor | None = None, grid=None) -> torch.Tensor:
        if self.source == "tokens":
            if fine is None:
                raise ValueError("fine: PropositionalScorer(source='tokens') needs the [B, N, D] tokens")
            return token_scores.feature_norm_scores(fine)
        if pixels is None or grid is None:
            raise ValueError("pixels: PropositionalScorer(source='pixels') needs pixels [B, C, H, W] and grid")
        return texture.patch_entropy(pixels, grid, mode=self.mode, bins=self.bins)


class PerspectivalScorer(nn.Module):
    """What stands out (query-agnostic).

    source="tokens": attention of the global token(s) (CLS / registers, or the mean token)
    to each patch (:func:`arr_coc.token_scores.cls_attention_scores`), a distribution over N.
    source="pixels": contrast + colour distinctness + edge density in [0, 1]
    (:func:`arr_coc.texture.perspectival_salience`).

    forward(fine [B, N, D] | None, *, prefix [B, P, D] | None, pixels | None, grid | None) -> [B, N].
    """

    def __init__(self, source: str = "tokens", *, num_heads: int = 1, edge_threshold: float = 0.1):
        super().__init__()
        if source not in ("tokens", "pixels"):
            raise ValueError(f"source: expected 'tokens' or 'pixels', got {source!r}")
        self.source, self.num_heads, self.edge_threshold = source, num_heads, edge_threshold

    def forward(
        self,
        fine: torch.Tensor | None = None,
        *,
        prefix: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
        grid=None,
    ) -> torch.Tensor:
        if self.source == "tokens":
            if fine is None:
                raise ValueError("fine: PerspectivalScorer(source='tokens') needs the [B, N, D] tokens")
            if prefix is None:
                prefix = fine[:, :0]
            return token_scores.cls_attention_scores(prefix, fine, num_heads=self.num_heads)
        if pixels is None or grid is None:
            raise ValueError("pixels: PerspectivalScorer(source='pixels') needs pixels [B, C, H, W] and grid")
        return texture.perspectival_salience(pixels, grid, edge_threshold=self.edge_threshold)
