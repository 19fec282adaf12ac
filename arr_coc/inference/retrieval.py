"""Rank a gallery of images for a query by a critic's pointwise MI (or by cosine), top-k.

For a query ``q`` and gallery images ``x_1..x_G`` (the gallery is the sample of ``p(x)``):

    pmi(q; x_i) = f(q, x_i) - log (1/G) sum_j exp f(q, x_j)            (nats)

with ``f`` an InfoNCE critic (:class:`arr_coc.inference.critic.InfoNCECritic`); ranking by
it equals ranking by ``f`` but the scores are comparable across queries. The gallery is
scored in chunks of ``chunk_size`` rows (memory O(Q x (chunk + k))) with a running top-k and
a running log-sum-exp, on whatever device the tensors are on.

```python
gal = embed_gallery(critic, image_feats)          # [G, dim], once
scores, idx = mi_topk(critic, query_feats, gal, k=10)
scores, idx = cosine_topk(query_vecs, gallery_vecs, k=10)
```
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from arr_coc.inference._checks import check_int as _check_int
from arr_coc.inference._checks import check_matrix as _check_matrix
from arr_coc.inference.critic import InfoNCECritic, _unit

__all__ = ["chunked_topk", "cosine_topk", "embed_gallery", "mi_topk"]


def chunked_topk(
    score_fn: Callable[[torch.Tensor], torch.Tensor], gallery: torch.Tensor, k: int, *, chunk_size: int = 8192
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of ``score_fn(gallery[a:b]) -> [Q, b - a]`` over the gallery, chunk by chunk.

    Returns (scores [Q, k], indices [Q, k] long, logsumexp [Q] of all G scores). Per chunk
    ``torch.topk`` keeps k candidates, then a stable merge of [Q, 2k] with the running best:
    O(Q c) per chunk instead of a sort. Ties across chunks keep the lower gallery index;
    ties inside one chunk are ordered as ``torch.topk`` returns them. ``score_fn`` must return
    finite real scores (NaN or inf: ValueError naming ``score_fn``).
    """
    if not callable(score_fn):
        raise ValueError(f"score_fn: expected a callable, got {type(score_fn).__name__}")
    if not isinstance(gallery, torch.Tensor) or gallery.ndim < 1:
        raise ValueError(f"gallery: expected a [G, ...] tensor, got {getattr(gallery, 'shape', type(gallery))}")
    g = gallery.shape[0]
    _check_int("k", k)
    _check_int("chunk_size", chunk_size)
    if k > g:
        raise ValueError(f"k: expected <= the gallery size {g}, got {k}")
    best_s = best_i = lse = None
    q_rows = None
    for start in range(0, g, chunk_size):
        rows = gallery[start : start + chunk_size]
        s = score_fn(rows)  # [Q, c]
        if not isinstance(s, torch.Tensor) or s.ndim != 2 or s.shape[1] != rows.shape[0] or (q_rows is not None and s.shape[0] != q_rows):
            raise ValueError(f"score_fn: expected [Q, {rows.shape[0]}] scores for a chunk, got {getattr(s, 'shape', type(s))}")
        if s.is_complex() or not s.is_floating_point() or not torch.isfinite(s).all():
            raise ValueError("score_fn: expected finite real scores, found NaN, inf or a non-float dtype")
        q_rows = s.shape[0]
        lse = torch.logsumexp(s, 1) if lse is None else torch.logaddexp(lse, torch.logsumexp(s, 1))
        s, i = s.topk(min(k, s.shape[1]), dim=1)  # sorted, descending
        i = i + start
        if best_s is not None:
            # the kept best (lower indices) precede the chunk's, so a stable sort breaks
            # ties across chunks by the lower gallery index
            s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
            top = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
            s, i = s.gather(1, top), i.gather(1, top)
        best_s, best_i = s, i
    return best_s, best_i, lse


@torch.no_grad()
def embed_gallery(critic: InfoNCECritic, images: torch.Tensor, *, chunk_size: int = 8192) -> torch.Tensor:
    """Image features [G, Dx] -> critic embeddings [G, dim] (chunked)."""
    if not isinstance(critic, InfoNCECritic):
        raise ValueError(f"critic: expected an InfoNCECritic, got {type(critic).__name__}")
    images = _check_matrix("images", images, critic.image_dim)
    _check_int("chunk_size", chunk_size)
    if images.shape[0] == 0:
        return images.new_zeros((0, critic.g[-1].out_features), dtype=critic.g[0].weight.dtype)
    return torch.cat([critic.embed_image(images[a : a + chunk_size]) for a in range(0, images.shape[0], chunk_size)])


@torch.no_grad()
def mi_topk(
    critic: InfoNCECritic, queries: torch.Tensor, gallery_emb: torch.Tensor, k: int, *, chunk_size: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery images by pmi(q; x) (nats): queries [Q, Dq], gallery_emb [G, dim] from
    :func:`embed_gallery`. Returns (pmi [Q, k], indices [Q, k])."""
    if not isinstance(critic, InfoNCECritic):
        raise ValueError(f"critic: expected an InfoNCECritic, got {type(critic).__name__}")
    q = critic.embed_query(queries, name="queries")
    gallery_emb = _check_matrix("gallery_emb", gallery_emb, dtype=q.dtype)
    if gallery_emb.shape[1] != q.shape[1]:
        raise ValueError(f"gallery_emb: expected width {q.shape[1]} (the critic's), got {gallery_emb.shape[1]}")
    scale = critic.scale.to(q.dtype)
    s, i, lse = chunked_topk(lambda g: (q @ g.T) * scale, gallery_emb, k, chunk_size=chunk_size)
    return s - (lse - math.log(gallery_emb.shape[0]))[:, None], i


@torch.no_grad()
def cosine_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int, *, chunk_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery rows by cosine similarity: queries [Q, D], gallery [G, D] -> ([Q, k], [Q, k]).

    Both are read in their promoted dtype; a zero row has cosine 0 with everything.
    """
    queries = _check_matrix("queries", queries)
    gallery = _check_matrix("gallery", gallery, queries.shape[1])
    dtype = torch.promote_types(queries.dtype, gallery.dtype)
    q = _unit(queries.to(dtype))
    s, i, _ = chunked_topk(lambda g: q @ _unit(g.to(dtype)).T, gallery, k, chunk_size=chunk_size)
    return s, i
