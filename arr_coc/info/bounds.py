"""Variational lower bounds on mutual information from critic score matrices.

``scores [..., N, N]``: ``scores[..., i, j] = f(x_i, y_j)`` for a batch of N pairs
``(x_i, y_i)`` drawn from the joint; the diagonal holds the positive pairs and the
off-diagonal entries stand in for samples of the product of marginals. Both bounds are
differentiable (train a critic by maximising them) and returned as ``[...]`` in the unit of
``base``, computed in float64 (float32 for large float32 inputs) on the input's device.
"""

from __future__ import annotations

import math

import torch

from arr_coc.info._validate import check_base, from_nats, work_dtype

__all__ = ["infonce_lower_bound", "nwj_lower_bound"]


def _check_scores(scores: torch.Tensor, min_n: int) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise ValueError(f"scores: expected a floating-point tensor, got {getattr(scores, 'dtype', type(scores).__name__)}")
    if scores.dim() < 2 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"scores: expected a square critic matrix [..., N, N], got shape {tuple(scores.shape)}")
    if scores.shape[-1] < min_n:
        raise ValueError(f"scores: expected N >= {min_n} pairs, got N = {scores.shape[-1]}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores: expected finite values, found NaN or Inf")
    return scores.to(work_dtype(scores))


def infonce_lower_bound(scores: torch.Tensor, *, base: float = math.e) -> torch.Tensor:
    """InfoNCE bound (van den Oord et al. 2018): ``log N - CE``, ``[..., N, N]`` -> ``[...]``.

    ``CE = mean_i [logsumexp_j scores_ij - scores_ii]``, the cross-entropy of picking the
    positive in each row. The bound never exceeds ``log N``.
    """
    check_base(base)
    s = _check_scores(scores, 1)
    n = s.shape[-1]
    diag = torch.diagonal(s, dim1=-2, dim2=-1)
    ce = (torch.logsumexp(s, dim=-1) - diag).mean(dim=-1)
    return from_nats(_finite_bound("InfoNCE", math.log(n) - ce), base)


def _finite_bound(name: str, value: torch.Tensor) -> torch.Tensor:
    """The bound, or a ValueError naming ``scores`` where it overflows the working dtype."""
    if not bool(torch.isfinite(value).all()):
        raise ValueError(
            f"scores: the {name} bound overflows {value.dtype} for these scores (a critic's scores this large "
            "make e^score or the score differences unrepresentable); rescale the critic"
        )
    return value


def nwj_lower_bound(scores: torch.Tensor, *, base: float = math.e) -> torch.Tensor:
    """NWJ bound (Nguyen, Wainwright & Jordan 2010; f-GAN KL): ``E_p[f] - e^{-1} E_q[e^f]``.

    ``E_p`` is the mean of the diagonal, ``E_q`` the mean over the ``N (N - 1)`` off-diagonal
    entries (needs N >= 2). ``[..., N, N]`` -> ``[...]``. Tight at ``f = 1 + log p/(p_x p_y)``.
    Off-diagonal scores above about 710 make ``e^f`` overflow float64 (88 in float32 for
    large float32 inputs): a ValueError naming ``scores`` rather than ``-inf``.
    """
    check_base(base)
    s = _check_scores(scores, 2)
    n = s.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=s.device)
    pos = torch.diagonal(s, dim1=-2, dim2=-1).mean(dim=-1)
    off = s.masked_fill(eye, -math.inf).flatten(-2)
    log_mean_exp = torch.logsumexp(off, dim=-1) - math.log(n * (n - 1))
    return from_nats(_finite_bound("NWJ", pos - torch.exp(log_mean_exp - 1)), base)
