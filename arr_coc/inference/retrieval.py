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

from arr_coc.inference.critic import InfoNCECritic

__all__ = ["chunked_topk", "cosine_topk", "embed_gallery", "mi_topk"]


def _check_int(name: str, v: object, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    return v


def _check_matrix(name: str, x: object, dim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"{name}: expected a [*, {dim if dim is not None else 'D'}] tensor, got {getattr(x, 'shape', type(x))}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: expected finite values, found NaN or Inf")
    return x


def chunked_topk(
    score_fn: Callable[[torch.Tensor], torch.Tensor], gallery: torch.Tensor, k: int, *, chunk_size: int = 8192
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of ``score_fn(gallery[a:b]) -> [Q, b - a]`` over the gallery, chunk by chunk.

    Returns (scores [Q, k], indices [Q, k] long, logsumexp [Q] of all G scores). Per chunk
    ``torch.topk`` keeps k candidates, then a stable merge of [Q, 2k] with the running best:
    O(Q c) per chunk instead of a sort. Ties across chunks keep the lower gallery index;
    ties inside one chunk are ordered as ``torch.topk`` returns them.
    """
    g = gallery.shape[0]
    _check_int("k", k)
    _check_int("chunk_size", chunk_size)
    if k > g:
        raise ValueError(f"k: expected <= the gallery size {g}, got {k}")
    best_s = best_i = lse = None
    for start in range(0, g, chunk_size):
        s = score_fn(gallery[start : start + chunk_size])  # [Q, c]
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
    images = _check_matrix("images", images, critic.image_dim)
    _check_int("chunk_size", chunk_size)
    return torch.cat([critic.embed_image(images[a : a + chunk_size]) for a in range(0, images.shape[0], chunk_size)])


@torch.no_grad()
def mi_topk(
    critic: InfoNCECritic, queries: torch.Tensor, gallery_emb: torch.Tensor, k: int, *, chunk_size: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery images by pmi(q; x) (nats): queries [Q, Dq], gallery_emb [G, dim] from
    :func:`embed_gallery`. Returns (pmi [Q, k], indices [Q, k])."""
    queries = _check_matrix("queries", queries, critic.query_dim)
    gallery_emb = _check_matrix("gallery_emb", gallery_emb)
    q = critic.embed_query(queries)
    if gallery_emb.shape[1] != q.shape[1]:
        raise ValueError(f"gallery_emb: expected width {q.shape[1]} (the critic's), got {gallery_emb.shape[1]}")
    scale = critic.scale.to(q.dtype)
    s, i, lse = chunked_topk(lambda g: (q @ g.T) * scale, gallery_emb, k, chunk_size=chunk_size)
    return s - (lse - math.log(gallery_emb.shape[0]))[:, None], i


@torch.no_grad()
def cosine_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int, *, chunk_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery rows by cosine similarity: queries [Q, D], gallery [G, D] -> ([Q, k], [Q, k])."""
    queries = _check_matrix("queries", queries)
    gallery = _check_matrix("gallery", gallery, queries.shape[1])
    q = torch.nn.functional.normalize(queries, dim=-1)
    s, i, _ = chunked_topk(
        lambda g: q @ torch.nn.functional.normalize(g, dim=-1).T, gallery, k, chunk_size=chunk_size
    )
    return s, i
