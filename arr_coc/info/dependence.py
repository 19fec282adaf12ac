"""Dependence measures: Pearson, Spearman, distance correlation, and a permutation test.

Samples have the sample dimension first. ``pearson`` and ``spearman`` take ``x [n]`` or
``[n, F]`` and ``y`` of the same shape (or ``[n]``, broadcast over the F columns) and return
``[]`` or ``[F]``. A constant variable has correlation 0 (not NaN).

``distance_correlation`` is the usual (biased, V-statistic) estimator of Szekely, Rizzo and
Bakirov (2007), the value ``dcor.distance_correlation`` returns. Scalar x and y use an
O(n log n) algorithm (Huo & Szekely 2016): the row sums of the distance matrices come from
prefix sums over the sorted samples, and ``sum_ij |x_i - x_j| |y_i - y_j|`` from dominance
sums computed by a bottom-up merge over the x-order, vectorized level by level (on the CPU,
where numba is installed, the same sums come from a compiled Fenwick-tree pass instead).
Vector samples use tiles of the O(n^2) distance matrices (bounded memory, any device).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from arr_coc.info._validate import check_same_n, check_samples
from arr_coc.info.knn import TILE_ELEMENTS, numba_kernels

__all__ = ["distance_correlation", "pearson", "permutation_test", "spearman"]


def _pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Validate a pair for correlation: both ``[n, F]`` (or y ``[n, 1]`` broadcast)."""
    xs = check_samples("x", x, min_n=2)
    ys = check_samples("y", y, min_n=2)
    check_same_n(x=xs, y=ys)
    if ys.shape[1] not in (1, xs.shape[1]):
        raise ValueError(f"y: expected [n] or the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    dt = torch.promote_types(xs.dtype, ys.dtype)
    # correlations are scale invariant per column: divide by each column's largest magnitude
    # first, so that values near the float limits neither overflow nor underflow in the moments
    return _unit_peak(xs.to(dt), 0), _unit_peak(ys.to(dt), 0).expand(-1, xs.shape[1]), x.dim() == 1 and y.dim() == 1


def _unit_peak(v: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``v`` divided by its largest magnitude (per column for ``dim=0``, overall for None); zeros stay zero."""
    peak = v.abs().amax(dim=dim, keepdim=True) if dim is not None else v.abs().amax()
    return v / torch.where(peak > 0, peak, torch.ones_like(peak))


def _pearson_cols(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    xc = xs - xs.mean(0)
    yc = ys - ys.mean(0)
    sx = xc.pow(2).sum(0).sqrt()
    sy = yc.pow(2).sum(0).sqrt()
    den = sx * sy
    r = (xc * yc).sum(0) / torch.where(den > 0, den, torch.ones_like(den))
    const = (xs == xs[:1]).all(0) | (ys == ys[:1]).all(0)
    return torch.where(const | (den == 0), torch.zeros_like(r), r.clamp(-1.0, 1.0))


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of ``x`` and ``y`` (``[n]`` -> ``[]``; ``[n, F]`` -> ``[F]``)."""
    xs, ys, scalar = _pair(x, y)
    r = _pearson_cols(xs, ys)
    return r[0] if scalar else r


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of each column of ``v [n, F]``, ties given their average rank (as scipy)."""
    n = v.shape[0]
    s, order = torch.sort(v, dim=0, stable=True)
    pos = torch.arange(n, device=v.device, dtype=torch.long)[:, None].expand_as(s)
    new = torch.ones_like(s, dtype=torch.bool)
    new[1:] = s[1:] != s[:-1]
    first = torch.cummax(torch.where(new, pos, torch.zeros_like(pos)), dim=0).values
    last_new = torch.ones_like(new)
    last_new[:-1] = s[1:] != s[:-1]
    last = torch.flip(torch.cummin(torch.flip(torch.where(last_new, pos, torch.full_like(pos, n)), [0]), dim=0).values, [0])
    avg = (first + last).to(torch.float64) / 2 + 1
    return torch.empty_like(avg).scatter_(0, order, avg)


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation (Pearson of average ranks), shapes as ``pearson``."""
    xs, ys, scalar = _pair(x, y)
    r = _pearson_cols(_average_ranks(xs), _average_ranks(ys))
    const = (xs == xs[:1]).all(0) | (ys == ys[:1]).all(0)
    r = torch.where(const, torch.zeros_like(r), r)
    return r[0] if scalar else r


# ----------------------------------------------------------------------------- distance correlation


def _row_sums_1d(v: torch.Tensor) -> torch.Tensor:
    """``sum_j |v_i - v_j|`` for every i, from the sorted sample: [n] -> [n]."""
    n = v.shape[0]
    s, order = torch.sort(v)
    r = torch.arange(n, device=v.device, dtype=v.dtype)
    before = torch.cumsum(s, 0) - s  # sum of the values sorted before
    total = s.sum()
    sums = s * r - before + (total - before - s) - s * (n - 1 - r)
    return torch.empty_like(sums).scatter_(0, order, sums)


def _cross_sum_1d(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``sum_{i<j} |x_i - x_j| |y_i - y_j|`` in O(n log^2 n) with vectorized merge levels."""
    n = x.shape[0]
    order = torch.sort(x, stable=True).indices
    xs, yv = x[order], y[order]
    m = 1 << max(1, math.ceil(math.log2(n)))
    pad = m - n
    big = torch.finfo(yv.dtype).max
    yp = torch.cat([yv, yv.new_full((pad,), big)])
    w = torch.stack([torch.ones_like(xs), xs, yv, xs * yv], 1)  # [n, 4] weights: 1, x, y, xy
    wp = torch.cat([w, w.new_zeros(pad, 4)])
    dom = torch.zeros(m, 4, dtype=w.dtype, device=w.device)  # sums over i < j with y_i < y_j
    s = 1
    while s < m:
        blocks = m // (2 * s)
        yb = yp.view(blocks, 2, s)
        left_sorted, left_idx = torch.sort(yb[:, 0], dim=1)
        wl = wp.view(blocks, 2, s, 4)[:, 0].gather(1, left_idx[..., None].expand(-1, -1, 4))
        cum = torch.cat([wl.new_zeros(blocks, 1, 4), torch.cumsum(wl, 1)], 1)  # [blocks, s+1, 4]
        cnt = torch.searchsorted(left_sorted, yb[:, 1].contiguous(), side="left")  # [blocks, s]
        add = cum.gather(1, cnt[..., None].expand(-1, -1, 4))  # [blocks, s, 4]
        dom.view(blocks, 2, s, 4)[:, 1] += add
        s *= 2
    dom = dom[:n]
    before = torch.cumsum(w, 0) - w  # all i < j
    up = before - dom
    xj, yj = xs, yv
    s_dom = xj * yj * dom[:, 0] - xj * dom[:, 2] - yj * dom[:, 1] + dom[:, 3]
    s_up = xj * yj * up[:, 0] - xj * up[:, 2] - yj * up[:, 1] + up[:, 3]
    return (s_dom - s_up).sum()


def _dcor_terms_1d(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    a_row, b_row = _row_sums_1d(x), _row_sums_1d(y)
    ab = 2 * _cross_sum_1d(x, y)
    aa = 2 * n * (x * x).sum() - 2 * x.sum() ** 2
    bb = 2 * n * (y * y).sum() - 2 * y.sum() ** 2

    def v(cross, r1, r2):
        nf = float(n)
        return cross / nf**2 - 2 * (r1 * r2).sum() / nf**3 + r1.sum() * r2.sum() / nf**4

    return v(ab, a_row, b_row), v(aa, a_row, a_row), v(bb, b_row, b_row)


def _dcor_terms_tiled(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    rows = max(1, TILE_ELEMENTS // (2 * n))
    a_row = torch.empty(n, dtype=x.dtype, device=x.device)
    b_row = torch.empty_like(a_row)
    ab = aa = bb = torch.zeros((), dtype=x.dtype, device=x.device)
    for r0 in range(0, n, rows):
        a = torch.cdist(x[r0 : r0 + rows], x)
        b = torch.cdist(y[r0 : r0 + rows], y)
        a_row[r0 : r0 + rows] = a.sum(1)
        b_row[r0 : r0 + rows] = b.sum(1)
        ab = ab + (a * b).sum()
        aa = aa + (a * a).sum()
        bb = bb + (b * b).sum()

    def v(cross, r1, r2):
        nf = float(n)
        return cross / nf**2 - 2 * (r1 * r2).sum() / nf**3 + r1.sum() * r2.sum() / nf**4

    return v(ab, a_row, b_row), v(aa, a_row, a_row), v(bb, b_row, b_row)


def distance_correlation(x: torch.Tensor, y: torch.Tensor, *, method: str = "auto") -> torch.Tensor:
    """Distance correlation (biased V-statistic) of ``x [n]`` or ``[n, dx]`` and ``y`` -> ``[]`` in [0, 1].

    method: ``"auto"`` (O(n log n) when both are scalar, tiled O(n^2) otherwise), ``"fast"``
    (scalar only) or ``"tiled"``. A constant variable gives exactly 0.
    """
    xs = check_samples("x", x, min_n=2)
    ys = check_samples("y", y, min_n=2)
    check_same_n(x=xs, y=ys)
    if method not in ("auto", "fast", "tiled"):
        raise ValueError(f"method: expected 'auto', 'fast' or 'tiled', got {method!r}")
    scalar = xs.shape[1] == 1 and ys.shape[1] == 1
    if method == "fast" and not scalar:
        raise ValueError("method: 'fast' needs scalar x and y ([n] or [n, 1])")
    # scale (one factor per variable: the Euclidean geometry is kept) and translation invariant:
    # bring the values to [-1, 1] first, so that magnitudes near the float limits cannot overflow
    xs = _unit_peak(xs, None)
    ys = _unit_peak(ys, None)
    xs = xs - xs.mean(0)
    ys = ys - ys.mean(0)
    kernels = numba_kernels() if xs.device.type == "cpu" else None
    if scalar and method != "tiled" and kernels is not None:  # compiled O(n log n) on the CPU
        terms = kernels.dcov_terms_1d(xs[:, 0].to(torch.float64).contiguous().numpy(), ys[:, 0].to(torch.float64).contiguous().numpy())
        dcov, dvx, dvy = (torch.tensor(t, dtype=xs.dtype, device=xs.device) for t in terms)
    elif scalar and method != "tiled":
        dcov, dvx, dvy = _dcor_terms_1d(xs[:, 0], ys[:, 0])
    else:
        dcov, dvx, dvy = _dcor_terms_tiled(xs, ys)
    den = (dvx * dvy).sqrt()
    r2 = dcov / torch.where(den > 0, den, torch.ones_like(den))
    const = (xs == xs[:1]).all() | (ys == ys[:1]).all()
    r = r2.clamp(0.0, 1.0).sqrt()
    return torch.where(const | (den <= 0), torch.zeros_like(r), r)


def permutation_test(
    statistic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    n_permutations: int = 999,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One-sided permutation p-value of ``statistic(x, y)`` against independence -> ``[]``.

    ``y``'s samples (first dimension) are shuffled ``n_permutations`` times; the p-value is
    ``(1 + #{T_perm >= T_obs}) / (1 + n_permutations)``, never 0 (Phipson & Smyth 2010).
    The statistic must return a finite real scalar every time; a NaN or inf (on the data or
    on any permutation) is a ValueError naming ``statistic``.
    """
    if not callable(statistic):
        raise ValueError("statistic: expected a callable statistic(x, y) -> scalar tensor")
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, int) or n_permutations < 1:
        raise ValueError(f"n_permutations: expected a positive int, got {n_permutations!r}")
    for name, v in (("x", x), ("y", y)):
        if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] < 2:
            raise ValueError(f"{name}: expected a tensor of at least 2 samples (sample dimension first)")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"y: expected {x.shape[0]} samples like x, got {y.shape[0]}")
    observed = _statistic_value(statistic(x, y), "on the data")
    n = y.shape[0]
    hits = torch.zeros((), dtype=torch.long, device=observed.device)
    for t in range(n_permutations):
        perm = torch.randperm(n, generator=generator, device=generator.device if generator is not None else "cpu").to(y.device)
        hits = hits + (_statistic_value(statistic(x, y[perm]), f"on permutation {t}") >= observed).long()
    return (1 + hits).to(torch.float64) / (1 + n_permutations)


def _statistic_value(value: object, where: str) -> torch.Tensor:
    """The statistic's value as a finite one-element tensor, or a ValueError naming ``statistic``
    (a NaN would compare false with everything and silently bias the p-value)."""
    try:
        t = torch.as_tensor(value).detach()
    except (TypeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"statistic: expected a real scalar {where}, got {type(value).__name__}") from exc
    if t.numel() != 1 or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"statistic: expected a real scalar {where}, got shape {tuple(t.shape)} dtype {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"statistic: returned {t.item()} {where}; expected a finite value")
    return t.reshape(())
