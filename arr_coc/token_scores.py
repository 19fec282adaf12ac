"""Scores of vision tokens computed from the tokens themselves (and, for two of them, a query).

Pure functions, batched over B, no learned parameters, no host-model attention weights.
Every score of one example depends on that example alone (nothing is normalised across the
batch). They are what the published pruning baselines rank tokens by, and what
``arr_coc.knowing`` wraps as its query-agnostic (propositional / perspectival) scorers.

Computation runs in float32 when the inputs are float16 / bfloat16 (float64 stays float64),
and the results come back in that working dtype.

Public functions (shapes):

- :func:`global_query`           prefix [B, P, D], fine [B, N, D] -> [B, max(P, 1), D]
- :func:`cls_attention_scores`   prefix [B, P, D], fine [B, N, D] -> [B, N] (rows sum to 1)
- :func:`feature_norm_scores`    fine [B, N, D] -> [B, N]
- :func:`cosine_similarity_matrix` x [B, N, D] -> [B, N, N]
- :func:`query_attention_scores` query [B, T, D], fine [B, N, D], query_mask [B, T] -> [B, N]
- :func:`query_relevance`        query [B, T, D], fine [B, N, D], query_mask [B, T] -> [B, N]
- :func:`content_tiebreak`       x [B, N, D] -> [B, N] (breaks exact ties by content)
- :func:`argmax_with_tiebreak`   score [B, N], tiebreak [B, N] -> [B] long
- :func:`valid_query_rows`       query [B, T, Dq] or None, query_mask [B, T] or None -> [B] bool
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = [
    "argmax_with_tiebreak",
    "cls_attention_scores",
    "content_tiebreak",
    "cosine_similarity_matrix",
    "feature_norm_scores",
    "global_query",
    "query_attention_scores",
    "query_relevance",
    "valid_query_rows",
    "working_dtype",
]


def working_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision (and integer) inputs, the input dtype for float32 / float64."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _work(x: torch.Tensor) -> torch.Tensor:
    return x.to(working_dtype(x))


def _pair_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32


def _check_rank(name: str, t: torch.Tensor, rank: int, shape: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != rank:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a {shape} tensor, got {got}")


def _check_pair(prefix: torch.Tensor, fine: torch.Tensor) -> None:
    _check_rank("prefix", prefix, 3, "[B, P, D]")
    _check_rank("fine", fine, 3, "[B, N, D]")
    if prefix.shape[0] != fine.shape[0] or prefix.shape[2] != fine.shape[2]:
        raise ValueError(
            f"prefix: expected [B={fine.shape[0]}, P, D={fine.shape[2]}] to match fine, got {tuple(prefix.shape)}"
        )


def _check_query(query: torch.Tensor, fine: torch.Tensor, query_mask: torch.Tensor | None) -> None:
    _check_rank("query", query, 3, "[B, T, D]")
    _check_rank("fine", fine, 3, "[B, N, D]")
    if query.shape[0] != fine.shape[0] or query.shape[2] != fine.shape[2]:
        raise ValueError(
            f"query: expected [B={fine.shape[0]}, T, D={fine.shape[2]}] in the tokens' space, "
            f"got {tuple(query.shape)} (project the query first)"
        )
    if query_mask is not None and tuple(query_mask.shape) != tuple(query.shape[:2]):
        raise ValueError(f"query_mask: expected shape {tuple(query.shape[:2])}, got {tuple(query_mask.shape)}")


def valid_query_rows(query: torch.Tensor | None, query_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B] bool: which examples have at least one real query token (None when there is no query)."""
    if query is None:
        return None
    if query_mask is None:
        return torch.ones(query.shape[0], dtype=torch.bool, device=query.device)
    return query_mask.to(torch.bool).any(dim=1)


def global_query(prefix: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    """The token(s) that ask "what in this image is salient?".

    The prefix tokens (CLS and / or registers) when there are any; otherwise (SigLIP, the
    Qwen-VL family: no CLS) the mean patch token, which plays the role of a global
    summary. prefix [B, P, D], fine [B, N, D] -> [B, max(P, 1), D] (working dtype).
    """
    _check_pair(prefix, fine)
    if prefix.shape[1] > 0:
        return _work(prefix)
    return _work(fine).mean(dim=1, keepdim=True)


def _attention_probs(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Scaled dot-product attention weights, heads split from D. q [B, Q, D], k [B, N, D] -> [B, H, Q, N]."""
    d = q.shape[-1]
    if not isinstance(num_heads, int) or num_heads < 1 or d % num_heads != 0:
        raise ValueError(f"num_heads: expected a positive int dividing D={d}, got {num_heads!r}")
    qh = rearrange(q, "b q (h e) -> b h q e", h=num_heads)
    kh = rearrange(k, "b n (h e) -> b h n e", h=num_heads)
    logits = torch.einsum("bhqe,bhne->bhqn", qh, kh) / math.sqrt(d // num_heads)
    return logits.softmax(dim=-1)


def cls_attention_scores(prefix: torch.Tensor, fine: torch.Tensor, *, num_heads: int = 1) -> torch.Tensor:
    """[CLS]-to-patch attention computed by our own attention: [B, P, D], [B, N, D] -> [B, N].

    ``softmax_j(<g, x_j> / sqrt(d_head))`` per head, averaged over heads and over the global
    query tokens ``g`` (see :func:`global_query`: the prefix tokens, or the mean patch token
    when P = 0). This is the FasterVLM / VisionZip salience, recomputed from the output
    tokens instead of read from the vision tower's attention maps, which fused attention
    kernels never materialise. Each row is a probability distribution over the N patches.
    """
    g = global_query(prefix, fine)
    probs = _attention_probs(g, _work(fine), num_heads)  # [B, H, Q, N]
    return probs.mean(dim=(1, 2))


def feature_norm_scores(fine: torch.Tensor) -> torch.Tensor:
    """L2 norm of each token, a propositional "how much is in this token" score: [B, N, D] -> [B, N]."""
    _check_rank("fine", fine, 3, "[B, N, D]")
    return torch.linalg.vector_norm(_work(fine), dim=-1)


def cosine_similarity_matrix(x: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """Pairwise cosine similarity [B, N, D] -> [B, N, N].

    Exactly symmetric with an exact unit diagonal (an all-zero token has similarity 0 to
    everything, itself included), so that equal similarities compare equal wherever the
    tokens sit in the sequence (a blocked matmul need not round (i, j) and (j, i) alike).
    """
    _check_rank("x", x, 3, "[B, N, D]")
    x = _work(x)
    xn = F.normalize(x, dim=-1, eps=eps)
    sim = xn @ xn.transpose(1, 2)
    sim = 0.5 * (sim + sim.transpose(1, 2))
    nonzero = (x != 0).any(dim=-1).to(sim.dtype)  # [B, N]
    return sim - torch.diag_embed(torch.diagonal(sim, dim1=1, dim2=2)) + torch.diag_embed(nonzero)


def content_tiebreak(x: torch.Tensor) -> torch.Tensor:
    """A per-token number that depends only on the token's content: [B, N, D] -> [B, N].

    The projection of the normalised token on a fixed pseudo-random unit direction (seeded,
    the same on every call). Greedy selections use it to break exact ties (e.g. the first
    pick of a DPP with constant quality, or the two ends of a mutual nearest-neighbour pair)
    by content instead of by position, which keeps them permutation-equivariant. Distinct
    tokens get distinct values almost surely; exact duplicates tie (and are interchangeable).
    """
    _check_rank("x", x, 3, "[B, N, D]")
    x = _work(x)
    g = torch.Generator().manual_seed(0x5EED)
    u = torch.randn(x.shape[-1], generator=g, dtype=torch.float64)
    u = (u / u.norm()).to(device=x.device, dtype=x.dtype)
    return (F.normalize(x, dim=-1, eps=1e-8) * u).sum(dim=-1)


def argmax_with_tiebreak(score: torch.Tensor, tiebreak: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of score [B, N]; among exact ties, the largest ``tiebreak`` [B, N] -> [B] long."""
    best = score.amax(dim=1, keepdim=True)
    tied = score == best
    return torch.where(tied, tiebreak, torch.full_like(tiebreak, float("-inf"))).argmax(dim=1)


def query_attention_scores(
    query: torch.Tensor,
    fine: torch.Tensor,
    query_mask: torch.Tensor | None = None,
    *,
    num_heads: int = 1,
) -> torch.Tensor:
    """Text-to-image attention received by each image token (FastV's ranking), our own attention.

    query [B, T, D] (already in the tokens' space), fine [B, N, D], query_mask [B, T] bool
    (True = real) -> [B, N]: ``mean_t softmax_j(<q_t, x_j> / sqrt(d_head))`` averaged over heads
    and over the real query tokens. Rows whose query is all padding get the uniform 1 / N
    (callers pick their own fallback with :func:`valid_query_rows`). Rows sum to 1.
    """
    _check_query(query, fine, query_mask)
    dtype = _pair_dtype(query, fine)
    q, x = query.to(dtype), fine.to(dtype)
    probs = _attention_probs(q, x, num_heads).mean(dim=1)  # [B, T, N]
    b, t, n = probs.shape
    w = torch.ones(b, t, dtype=probs.dtype, device=probs.device)
    if query_mask is not None:
        w = query_mask.to(device=probs.device, dtype=probs.dtype)
    count = w.sum(dim=1, keepdim=True)
    scores = torch.einsum("bt,btn->bn", w, probs) / count.clamp(min=1)
    return torch.where(count > 0, scores, torch.full_like(scores, 1.0 / n))


def query_relevance(
    query: torch.Tensor,
    fine: torch.Tensor,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cosine similarity of each image token to the real query tokens (CDPruner's relevance).

    query [B, T, D], fine [B, N, D], query_mask [B, T] -> [B, N] in [-1, 1]; rows whose query is
    all padding get 0.
    """
    _check_query(query, fine, query_mask)
    dtype = _pair_dtype(query, fine)
    qn = F.normalize(query.to(dtype), dim=-1, eps=1e-8)
    xn = F.normalize(fine.to(dtype), dim=-1, eps=1e-8)
    cos = torch.einsum("bnd,btd->bnt", xn, qn)
    w = torch.ones(query.shape[:2], dtype=dtype, device=query.device)
    if query_mask is not None:
        w = query_mask.to(device=query.device, dtype=dtype)
    return torch.einsum("bnt,bt->bn", cos, w) / w.sum(dim=1, keepdim=True).clamp(min=1)
