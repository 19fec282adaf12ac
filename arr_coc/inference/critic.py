"""A small InfoNCE critic between questions and images, and its pointwise MI.

``f(q, x) = s * <g(q), h(x)>`` with ``g``, ``h`` two-layer MLPs onto the unit sphere and a
learned scale ``s`` (temperature ``1 / s``). Trained with :class:`arr_coc.losses.InfoNCELoss`
(in-batch negatives), its optimum is ``f(q, x) = log p(x | q) / p(x) + c(q)`` (Poole et al.
2019), so the pointwise MI of a pair is estimated by removing ``c(q)`` with marginal samples:

    pmi(q; x) = f(q, x) - log (1/N) sum_j exp f(q, x_j),     x_j ~ p(x)       (nats)

and averaging it over pairs ``(q, x) ~ p(q, x)`` gives the InfoNCE estimate of I(Q; X)
(bounded by log N). For ranking a gallery against one query ``c(q)`` cancels: rank by f.

Features of the embedded task (:func:`vlm_features`): a question is the mean of the base
VLM's input embeddings of its words ([B, Dl]); an image is the mean and the max over the
ViT's patch tokens, concatenated ([B, 2 Dv]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from arr_coc.losses import InfoNCELoss

__all__ = ["InfoNCECritic", "pointwise_mi", "train_critic", "vlm_features"]


def _check_matrix(name: str, x: object, dim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        want = f"[*, {dim}]" if dim is not None else "[*, D]"
        raise ValueError(f"{name}: expected a {want} tensor, got {getattr(x, 'shape', type(x))}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: expected finite values, found NaN or Inf")
    return x


class InfoNCECritic(nn.Module):
    """f(q, x) = scale * <g(q), h(x)> on unit vectors.

    query_dim / image_dim: input widths; dim: shared width; hidden: MLP width.
    """

    def __init__(self, query_dim: int, image_dim: int, *, dim: int = 64, hidden: int = 128, temperature: float = 0.1):
        super().__init__()
        for name, v in (("query_dim", query_dim), ("image_dim", image_dim), ("dim", dim), ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        self.query_dim, self.image_dim = query_dim, image_dim
        self.g = nn.Sequential(nn.Linear(query_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.h = nn.Sequential(nn.Linear(image_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.loss = InfoNCELoss(temperature=temperature, learnable=True)

    @property
    def scale(self) -> torch.Tensor:
        return 1.0 / torch.as_tensor(self.loss.temperature)

    def embed_query(self, q: torch.Tensor) -> torch.Tensor:
        """[B, Dq] -> [B, dim] unit vectors."""
        return F.normalize(self.g(_check_matrix("query", q, self.query_dim)), dim=-1)

    def embed_image(self, x: torch.Tensor) -> torch.Tensor:
        """[N, Dx] -> [N, dim] unit vectors."""
        return F.normalize(self.h(_check_matrix("images", x, self.image_dim)), dim=-1)

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Critic matrix f(q_i, x_j): q [B, Dq], x [N, Dx] -> [B, N] (nats up to c(q))."""
        return self.embed_query(q) @ self.embed_image(x).T * self.scale

    def pair_scores(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """f(q_i, x_i) for paired rows: [B, Dq], [B, Dx] -> [B]."""
        if q.shape[0] != x.shape[0]:
            raise ValueError(f"images: expected {q.shape[0]} rows to pair with the queries, got {x.shape[0]}")
        return (self.embed_query(q) * self.embed_image(x)).sum(-1) * self.scale


@torch.no_grad()
def pointwise_mi(critic: InfoNCECritic, q: torch.Tensor, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """pmi(q_i; x_i) = f(q_i, x_i) - log mean_j exp f(q_i, r_j) in nats.

    q [B, Dq], x [B, Dx] paired rows; reference [N, Dx] samples of the image marginal p(x).
    Returns [B].
    """
    reference = _check_matrix("reference", reference, critic.image_dim)
    if reference.shape[0] < 1:
        raise ValueError("reference: expected at least one image")
    pos = critic.pair_scores(q, x)
    marg = torch.logsumexp(critic(q, reference), dim=1) - math.log(reference.shape[0])
    return pos - marg


def train_critic(
    queries: torch.Tensor,
    images: torch.Tensor,
    *,
    steps: int = 300,
    batch_size: int = 256,
    lr: float = 3e-3,
    seed: int = 0,
    dim: int = 64,
) -> tuple[InfoNCECritic, list[float]]:
    """Fit an :class:`InfoNCECritic` on paired rows (query i belongs to image i).

    queries [N, Dq], images [N, Dx], N >= 2 (one question per image, so in-batch negatives
    are other images). Returns the critic (eval mode) and the InfoNCE bound (nats) per step.
    """
    queries = _check_matrix("queries", queries)
    images = _check_matrix("images", images)
    n = queries.shape[0]
    if images.shape[0] != n or n < 2:
        raise ValueError(f"images: expected {n} rows (>= 2) paired with the queries, got {images.shape[0]}")
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if batch_size < 2:
        raise ValueError(f"batch_size: expected >= 2 (in-batch negatives), got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    critic = InfoNCECritic(queries.shape[1], images.shape[1], dim=dim)
    opt = torch.optim.AdamW(critic.parameters(), lr=lr, weight_decay=1e-4)
    history = []
    critic.train()
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[: min(batch_size, n)]
        out = critic.loss(critic.g(queries[idx]), critic.h(images[idx]))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        history.append(float(out["mi_lower_bound"]))
    return critic.eval(), history


@torch.no_grad()
def vlm_features(
    vlm: nn.Module, pixels: torch.Tensor | None, question_ids: torch.Tensor | None, question_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Critic inputs from the base VLM: (queries [B, Dl] | None, images [B, 2 Dv] | None).

    pixels [B, 3, H, W] in [0, 1]; question_ids / question_mask [B, T] (right-padded).
    """
    q = x = None
    if question_ids is not None:
        emb = vlm.query_embeddings(question_ids)
        mask = torch.ones_like(question_ids, dtype=torch.bool) if question_mask is None else question_mask.bool()
        q = (emb * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    if pixels is not None:
        tokens = vlm.encode_image(pixels)[:, vlm.num_prefix_tokens :]
        x = torch.cat([tokens.mean(1), tokens.amax(1)], dim=-1)
    return q, x
