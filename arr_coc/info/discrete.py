"""Information measures estimated from integer samples.

Samples are ``[n]`` (a scalar variable) or ``[n, d]`` (a vector variable: each distinct row
is one symbol) of an integer or bool dtype. Estimators:

- ``correction=None``: plug-in (maximum likelihood) - the entropy of the empirical
  distribution. Agrees exactly with scikit-learn's ``mutual_info_score``.
- ``correction="miller_madow"``: each entropy gets ``+ (m - 1) / (2 n)``, with ``m`` the
  number of symbols observed; MI and CMI combine the corrected entropies.
- ``correction="james_stein"`` (entropy only): Hausser & Strimmer (2009) shrinkage of the
  frequencies towards the uniform distribution over ``num_categories`` symbols (the observed
  ones by default), with the data-driven shrinkage intensity clipped to [0, 1].

Results are 0-dimensional tensors on the input's device, in the unit of ``base``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from arr_coc.info._validate import check_base, check_integer_samples, check_same_n, from_nats

__all__ = ["discrete_cmi", "discrete_entropy", "discrete_mi", "information_gain"]

Correction = Literal["miller_madow"] | None


def _codes(*vs: torch.Tensor) -> torch.Tensor:
    """[n] symbol codes of the rows of the concatenated ``[n, d_i]`` samples."""
    rows = torch.cat(vs, dim=1)
    if rows.shape[1] == 1:
        return torch.unique(rows[:, 0], return_inverse=True)[1]
    return torch.unique(rows, dim=0, return_inverse=True)[1]


def _counts(*vs: torch.Tensor) -> torch.Tensor:
    """Counts of the observed symbols (no zeros)."""
    return torch.bincount(_codes(*vs)).to(torch.float64)


def _plugin(counts: torch.Tensor, n: int) -> torch.Tensor:
    """Plug-in entropy (nats) from counts summing to n: log n - sum c log c / n."""
    return math.log(n) - torch.special.xlogy(counts, counts).sum() / n


def _entropy_est(counts: torch.Tensor, n: int, correction: Correction) -> torch.Tensor:
    h = _plugin(counts, n)
    if correction == "miller_madow":
        h = h + (counts.numel() - 1) / (2 * n)
    return h


def _check_correction(correction: object, allowed: tuple) -> None:
    if correction not in allowed:
        raise ValueError(f"correction: expected one of {allowed}, got {correction!r}")


def discrete_entropy(
    x: torch.Tensor,
    *,
    correction: Literal["miller_madow", "james_stein"] | None = None,
    num_categories: int | None = None,
    base: float = math.e,
) -> torch.Tensor:
    """H(X) from integer samples ``x [n]`` or ``[n, d]`` -> ``[]``.

    ``num_categories`` (James-Stein only) is the size of the alphabet the shrinkage target
    spreads over; it must be at least the number of observed symbols.
    """
    check_base(base)
    _check_correction(correction, (None, "miller_madow", "james_stein"))
    xs = check_integer_samples("x", x)
    n = xs.shape[0]
    counts = _counts(xs)
    if correction != "james_stein":
        if num_categories is not None:
            raise ValueError("num_categories: only used with correction='james_stein'")
        return from_nats(_entropy_est(counts, n, correction), base)
    m = counts.numel()
    K = m if num_categories is None else num_categories
    if isinstance(K, bool) or not isinstance(K, int) or K < m:
        raise ValueError(f"num_categories: expected an int >= the {m} observed symbols, got {num_categories!r}")
    theta = torch.zeros(K, dtype=torch.float64, device=counts.device)
    theta[:m] = counts / n
    target = 1.0 / K
    denom = (n - 1) * ((target - theta) ** 2).sum()
    # Hausser & Strimmer eq. (8); lambda = 1 (the target) when n = 1 or when the
    # frequencies already equal the target (0 / 0: any lambda gives the same estimate).
    lam = torch.where(denom > 0, (1 - (theta**2).sum()) / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.ones_like(denom))
    lam = lam.clamp(0.0, 1.0)
    shrunk = lam * target + (1 - lam) * theta
    return from_nats(-torch.special.xlogy(shrunk, shrunk).sum(), base)


def discrete_mi(x: torch.Tensor, y: torch.Tensor, *, correction: Correction = None, base: float = math.e) -> torch.Tensor:
    """I(X; Y) = H(X) + H(Y) - H(X, Y) from integer samples ``x``, ``y`` (``[n]`` or ``[n, d]``) -> ``[]``."""
    check_base(base)
    _check_correction(correction, (None, "miller_madow"))
    xs = check_integer_samples("x", x)
    ys = check_integer_samples("y", y)
    n = check_same_n(x=xs, y=ys)
    i = _entropy_est(_counts(xs), n, correction) + _entropy_est(_counts(ys), n, correction) - _entropy_est(_counts(xs, ys), n, correction)
    return from_nats(i, base)


def discrete_cmi(
    x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, *, correction: Correction = None, base: float = math.e
) -> torch.Tensor:
    """I(X; Y | Z) = H(X,Z) + H(Y,Z) - H(X,Y,Z) - H(Z) from integer samples -> ``[]``."""
    check_base(base)
    _check_correction(correction, (None, "miller_madow"))
    xs = check_integer_samples("x", x)
    ys = check_integer_samples("y", y)
    zs = check_integer_samples("z", z)
    n = check_same_n(x=xs, y=ys, z=zs)
    e = lambda *v: _entropy_est(_counts(*v), n, correction)  # noqa: E731
    return from_nats(e(xs, zs) + e(ys, zs) - e(xs, ys, zs) - e(zs), base)


def information_gain(
    target: torch.Tensor, feature: torch.Tensor, *, correction: Correction = None, base: float = math.e
) -> torch.Tensor:
    """H(target) - H(target | feature), the decision-tree split criterion -> ``[]``.

    ``H(target | feature) = sum_v p(v) H(target | feature = v)``; with Miller-Madow each
    group's entropy is corrected with its own count, which equals correcting H(T, F) and H(F).
    Numerically this is ``discrete_mi(target, feature)``.
    """
    check_base(base)
    _check_correction(correction, (None, "miller_madow"))
    ts = check_integer_samples("target", target)
    fs = check_integer_samples("feature", feature)
    n = check_same_n(target=ts, feature=fs)
    h_t = _entropy_est(_counts(ts), n, correction)
    h_t_given_f = _entropy_est(_counts(ts, fs), n, correction) - _entropy_est(_counts(fs), n, correction)
    return from_nats(h_t - h_t_given_f, base)
