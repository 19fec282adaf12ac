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

from arr_coc.inference._checks import check_int, check_matrix, check_real, check_vlm_pixels, check_vlm_question
from arr_coc.losses import InfoNCELoss

__all__ = ["InfoNCECritic", "pointwise_mi", "train_critic", "vlm_features"]


class InfoNCECritic(nn.Module):
    """f(q, x) = scale * <g(q), h(x)> on unit vectors.

    query_dim / image_dim: input widths; dim: shared width; hidden: MLP width.
    """

    def __init__(self, query_dim: int, image_dim: int, *, dim: int = 64, hidden: int = 128, temperature: float = 0.1):
        super().__init__()
        for name, v in (("query_dim", query_dim), ("image_dim", image_dim), ("dim", dim), ("hidden", hidden)):
            check_int(name, v)
        check_real("temperature", temperature, lo=0.0, lo_open=True)
        self.query_dim, self.image_dim = query_dim, image_dim
        self.g = nn.Sequential(nn.Linear(query_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.h = nn.Sequential(nn.Linear(image_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.loss = InfoNCELoss(temperature=temperature, learnable=True)

    @property
    def scale(self) -> torch.Tensor:
        return 1.0 / torch.as_tensor(self.loss.temperature)

    @property
    def _dtype(self) -> torch.dtype:
        return self.g[0].weight.dtype

    def _embed(self, mlp: nn.Module, name: str, x: torch.Tensor, width: int) -> torch.Tensor:
        x = check_matrix(name, x, width, self._dtype)
        z = mlp(x)
        if not torch.isfinite(z).all():
            raise ValueError(f"{name}: the critic's embedding overflowed (values too large for {self._dtype})")
        return _unit(z)

    def embed_query(self, q: torch.Tensor, *, name: str = "query") -> torch.Tensor:
        """[B, Dq] -> [B, dim] unit vectors (a zero embedding stays zero)."""
        return self._embed(self.g, name, q, self.query_dim)

    def embed_image(self, x: torch.Tensor, *, name: str = "images") -> torch.Tensor:
        """[N, Dx] -> [N, dim] unit vectors (a zero embedding stays zero)."""
        return self._embed(self.h, name, x, self.image_dim)

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Critic matrix f(q_i, x_j): q [B, Dq], x [N, Dx] -> [B, N] (nats up to c(q))."""
        return self.embed_query(q, name="q") @ self.embed_image(x, name="x").T * self.scale

    def pair_scores(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """f(q_i, x_i) for paired rows: [B, Dq], [B, Dx] -> [B]."""
        eq, ex = self.embed_query(q, name="q"), self.embed_image(x, name="x")
        if eq.shape[0] != ex.shape[0]:
            raise ValueError(f"x: expected {eq.shape[0]} rows to pair with q, got {ex.shape[0]}")
        return (eq * ex).sum(-1) * self.scale


def _unit(z: torch.Tensor) -> torch.Tensor:
    """Rows onto the unit sphere, exactly scale-free: each row is divided by its peak
    magnitude before the norm, so huge or tiny finite rows neither overflow nor underflow."""
    peak = z.abs().amax(dim=-1, keepdim=True)
    return F.normalize(z / torch.where(peak > 0, peak, torch.ones_like(peak)), dim=-1)


@torch.no_grad()
def pointwise_mi(critic: InfoNCECritic, q: torch.Tensor, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """pmi(q_i; x_i) = f(q_i, x_i) - log mean_j exp f(q_i, r_j) in nats.

    q [B, Dq], x [B, Dx] paired rows; reference [N, Dx] samples of the image marginal p(x).
    Returns [B].
    """
    if not isinstance(critic, InfoNCECritic):
        raise ValueError(f"critic: expected an InfoNCECritic, got {type(critic).__name__}")
    reference = check_matrix("reference", reference, critic.image_dim)
    if reference.shape[0] < 1:
        raise ValueError("reference: expected at least one image")
    eq = critic.embed_query(q, name="q")
    ex = critic.embed_image(x, name="x")
    if eq.shape[0] != ex.shape[0]:
        raise ValueError(f"x: expected {eq.shape[0]} rows to pair with q, got {ex.shape[0]}")
    scale = critic.scale.to(eq.dtype)
    pos = (eq * ex).sum(-1) * scale
    marg = torch.logsumexp(eq @ critic.embed_image(reference, name="reference").T * scale, dim=1) - math.log(reference.shape[0])
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
    queries = check_matrix("queries", queries, dtype=torch.float32)
    images = check_matrix("images", images, dtype=torch.float32)
    n = queries.shape[0]
    if images.shape[0] != n or n < 2:
        raise ValueError(f"images: expected {n} rows (>= 2) paired with the queries, got {images.shape[0]}")
    if queries.shape[1] < 1 or images.shape[1] < 1:
        raise ValueError(f"queries, images: expected at least one feature column, got {queries.shape[1]}, {images.shape[1]}")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("dim", dim), ("seed", seed)):
        check_int(name, v, 0 if name == "seed" else 1)
    check_real("lr", lr, lo=0.0, lo_open=True)
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
        if not torch.isfinite(out["loss"]):
            raise ValueError("queries, images: the InfoNCE loss became non-finite (features too large, or lr too high)")
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
    if not isinstance(vlm, nn.Module) or not hasattr(vlm, "query_embeddings") or not hasattr(vlm, "encode_image"):
        raise ValueError(f"vlm: expected an arr_coc BaseVLM, got {type(vlm).__name__}")
    if pixels is not None:
        check_vlm_pixels(vlm, pixels)
    if question_ids is not None:
        check_vlm_question(vlm, question_ids, question_mask)
    elif question_mask is not None:
        raise ValueError("question_mask: given without question_ids")
    q = x = None
    if question_ids is not None:
        emb = vlm.query_embeddings(question_ids)
        mask = torch.ones_like(question_ids, dtype=torch.bool) if question_mask is None else question_mask.bool()
        q = (emb * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    if pixels is not None:
        tokens = vlm.encode_image(pixels)[:, vlm.num_prefix_tokens :]
        x = torch.cat([tokens.mean(1), tokens.amax(1)], dim=-1)
    return q, x
