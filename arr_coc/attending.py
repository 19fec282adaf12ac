"""Attending: exact greedy conditional-MI selection of candidates under a token budget.

Model. The candidate embeddings ``c_1..c_M`` and the query tokens ``q_1..q_T`` (all in the
relevance space) are jointly Gaussian with covariance ``Sigma = k(., .) + jitter * I``,
``k`` the cosine kernel (inner product of unit vectors) or an RBF kernel. For a candidate
``j`` and the selected set ``S``:

```
I(c_j ; Q | c_S) = 1/2 log( Var(j | S) / Var(j | S, Q) )       (query information, two chains)
R_j(S)           = 1/2 log+( Var(j | S) / D )                   (coverage: Gaussian rate-distortion
                                                                  of the part of c_j that S does not
                                                                  explain, at distortion D)
gain_j(S)        = alpha * I(c_j ; Q | c_S) + (1 - alpha) * R_j(S)
```

For a single query token the first line equals ``-1/2 log(1 - rho^2(j, q | S))``. Greedy
picks ``argmax_j gain_j(S)``, conditions on it and repeats until the budget is spent or the
best gain falls below ``price`` (nats per token). By the chain rule the query terms of the
picks sum to ``I(c_S ; Q)``, reported as ``total``.

Conditional variances are kept by incremental Cholesky (Gram-Schmidt on kernel rows):
chain A conditions on the picks, chain B on the query tokens first and then the picks (the
two chains are stacked on the batch axis). Each step reads one kernel row (that of the pick)
and adds one Cholesky row per chain (O(M (T + k))): O(M K (T + K)) time and O(M (T + K))
memory for the chains, batched over B with no Python loop over the batch. The raw inner
products behind a kernel row come from one of: a product per step (O(M R) each,
memory-bound: the choice on accelerators); a Gram precomputed in one compute-bound product
(O(M^2 R) time, O(M^2) memory: faster on CPU, the default there while B M^2 <= 2^26); or,
for a candidate pyramid, :class:`PyramidGram`: the fine tokens' Gram (O(N^2 R)) with a pick's
row pooled from it when it is picked, O(N) per row, no M x M matrix. The kernel (cosine
scaling, RBF) is applied to the K rows read, never to a whole matrix. Gains are kept doubled
(log variance ratios; scaling by 2 is exact) in preallocated buffers, and the budget / price
gating of each row is applied after the loop (a stopped row's later picks are discarded).
Speed against a fast greedy DPP MAP on the same tokens: ``benchmarks/bench_attending.py``.

Tokens are deterministic, so the jitter is numerical only: a conditional variance at or
below ``var_floor`` means "determined by what is already known". Such a candidate is
redundant (zero gain), ``Var(j | S, Q)`` is clamped at the floor (finite information about
the query's twin), and conditioning on a determined variable is a no-op.

Precision. In float32 (the default for float32 input) a conditional variance is exact to about
1e-7 absolute; once the picks span the tokens' numerical rank the variances left are near the
floor, their log ratios carry errors of 1e-3 .. 1e-1, and from there the order of near-tied picks
and each example's reported total follow round-off. On benchmark v2's tokens
(``experiments/results/adapter_v2_bench.md``, "How far the greedy's picks are determined") about
30 picks have a positive gain; float32 and float64 part at step 21-22 (median), keep 0.68-0.87
of the same picks (0.995 at K = 16), and float32's total is within 0.007-0.011 nats of the
float64 chain rule (median per example; 0.15-0.27 at worst). The float64 greedy itself is a
stable function of its inputs: 0.97-1.00 of its picks survive a 1e-5 relative perturbation of
the embeddings. Pass float64 embeddings (or ``dtype=torch.float64``) where the order or one
example's total must be exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from arr_coc._finite import all_finite
from arr_coc.pyramid import pyramid_positions

__all__ = ["GreedyResult", "PyramidGram", "gaussian_set_mi", "greedy_conditional_mi", "kernel_matrix", "pyramid_gram"]

_KERNELS = ("cosine", "rbf")


@dataclass
class GreedyResult:
    """Output of :func:`greedy_conditional_mi` (K = max budget of the batch).

    indices:        [B, K] long, candidate indices in pick order, -1 after the row stopped.
    gains:          [B, K] the objective gain of each pick, alpha * query + (1 - alpha) * coverage (nats).
    query_gains:    [B, K] I(c_j ; Q | c_S) of each pick (nats).
    coverage_gains: [B, K] R_j(S) of each pick (nats).
    total:          [B] sum of ``query_gains`` = I(c_S ; Q) by the chain rule (nats).
    counts:         [B] long, number of picks.
    """

    indices: torch.Tensor
    gains: torch.Tensor
    query_gains: torch.Tensor
    coverage_gains: torch.Tensor
    total: torch.Tensor
    counts: torch.Tensor


# ---------------------------------------------------------------------- kernels
def _prepare(
    cand: torch.Tensor, query: torch.Tensor | None, kernel: str, bandwidth: float | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Embeddings in the form the kernel needs.

    Returns (cand [B, M, R], query [B, T, R] | None, diag [B, M] = k(j, j),
    cand_sq [B, M] | None, scale [B] | None) where for the RBF kernel the vectors are
    divided by the bandwidth so that k(x, y) = exp(-|x - y|^2 / 2).
    """
    cand = cand.to(dtype)
    query = query.to(dtype) if query is not None else None
    if kernel == "cosine":
        tiny = torch.finfo(dtype).tiny
        cn = torch.linalg.vector_norm(cand, dim=-1, keepdim=True)
        c = cand / cn.clamp_min(tiny)  # a zero vector stays zero
        diag = (cn.squeeze(-1) > 0).to(dtype)
        q = None
        if query is not None:
            q = query / torch.linalg.vector_norm(query, dim=-1, keepdim=True).clamp_min(tiny)
        return c, q, diag, None, None
    # rbf: bandwidth^2 = mean squared distance of the candidates to their mean (per example)
    if bandwidth is None:
        centred = cand - cand.mean(dim=1, keepdim=True)
        ell2 = centred.pow(2).sum(-1).mean(dim=1)  # [B]
        ell2 = torch.where(ell2 > 0, ell2, torch.ones_like(ell2))
    else:
        ell2 = torch.full(cand.shape[:1], float(bandwidth) ** 2, dtype=dtype, device=cand.device)
    scale = ell2.sqrt()
    c = cand / scale[:, None, None]
    q = query / scale[:, None, None] if query is not None else None
    diag = torch.ones(cand.shape[:2], dtype=dtype, device=cand.device)
    return c, q, diag, c.pow(2).sum(-1), scale


def _cross(kernel: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """k(a_i, b_j) for prepared a [B, I, R], b [B, J, R] -> [B, I, J]."""
    dots = a @ b.transpose(1, 2)
    if kernel == "cosine":
        return dots
    sq = a.pow(2).sum(-1)[:, :, None] + b.pow(2).sum(-1)[:, None, :] - 2 * dots
    return torch.exp(-0.5 * sq.clamp_min(0))


def _inv_norm(sq: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(sq), 0 where sq == 0 (a zero vector has zero covariance with everything)."""
    return torch.where(sq > 0, sq.clamp_min(torch.finfo(sq.dtype).tiny).rsqrt(), torch.zeros_like(sq))


def _rbf_from_dots(dots: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor, ell2: torch.Tensor) -> torch.Tensor:
    d2 = (sq_a[:, :, None] + sq_b[:, None, :] - 2 * dots).clamp_min(0)
    return torch.exp(-0.5 * d2 / ell2[:, None, None])


def kernel_matrix(
    x: torch.Tensor, y: torch.Tensor | None = None, *, kernel: str = "cosine", bandwidth: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Kernel Gram matrix k(x_i, y_j) [B, I, J] for x [B, I, R], y [B, J, R] (y = x if None).

    ``bandwidth`` (RBF only): a float, a [B] tensor, or None for the default used by
    :func:`greedy_conditional_mi` (root mean squared distance of ``x`` to its mean).
    """
    if kernel not in _KERNELS:
        raise ValueError(f"kernel: expected one of {_KERNELS}, got {kernel!r}")
    y = x if y is None else y
    if kernel == "cosine":
        return F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).transpose(1, 2)
    if bandwidth is None:
        centred = x - x.mean(dim=1, keepdim=True)
        ell2 = centred.pow(2).sum(-1).mean(dim=1)
        ell2 = torch.where(ell2 > 0, ell2, torch.ones_like(ell2))
    elif isinstance(bandwidth, torch.Tensor):
        ell2 = bandwidth.to(x.dtype) ** 2
    else:
        ell2 = torch.full(x.shape[:1], float(bandwidth) ** 2, dtype=x.dtype, device=x.device)
    s = ell2.sqrt()[:, None, None]
    return _cross("rbf", x / s, y / s)


# ---------------------------------------------------------------------- pyramid Gram
class PyramidGram:
    """Raw inner products of pyramid candidates, held as the fine tokens' Gram.

    fine_gram: [B, N, N] inner products <x_a, x_b> of the N = H x W fine tokens (raster order).
    grid:      (H, W).
    levels:    the pooled levels of the candidates, as in :func:`arr_coc.pyramid.build_pyramid`
               (candidates: the N fine tokens, then each pooled level in raster order; a pooled
               candidate is the area average of its patches).

    Inner products are bilinear, so <c_s, c_j> is the average over the patches of s of the
    fine Gram's rows, pooled over the patches of j like the tokens themselves: a row costs
    O(P N + M) (P = patches of s) and no [B, M, M] matrix is ever built. ``shape`` is the
    shape of the candidate Gram it stands for, [B, M, M].
    """

    def __init__(self, fine_gram: torch.Tensor, grid: tuple[int, int], levels: tuple[int, ...] = (1, 2)):
        h, w = (int(v) for v in grid)
        if not isinstance(fine_gram, torch.Tensor) or fine_gram.dim() != 3 or fine_gram.shape[1:] != (h * w, h * w):
            raise ValueError(
                f"fine_gram: expected a [B, N, N] tensor with N = H * W = {h * w}, got {getattr(fine_gram, 'shape', type(fine_gram))}"
            )
        if any((not isinstance(lv, int)) or lv < 1 for lv in levels):
            raise ValueError(f"levels: expected positive ints (log2 pooling factors), got {levels!r}")
        self.fine_gram, self.grid, self.levels = fine_gram.contiguous(), (h, w), tuple(levels)
        pos, self._level_sizes = pyramid_positions(self.grid, self.levels, device=fine_gram.device)
        self.num_candidates = pos.shape[0]
        side = 2 ** max(self.levels, default=0)
        d = torch.arange(side, device=fine_gram.device)
        rr = pos[:, 0, None, None] + d[:, None]  # [M, side, 1] patch rows
        cc = pos[:, 1, None, None] + d[None, :]  # [M, 1, side] patch columns
        f = (2 ** pos[:, 2])[:, None, None]
        inside = (d[:, None] < f) & (d[None, :] < f) & (rr < h) & (cc < w)  # [M, side, side]
        self._patches = torch.where(inside, rr * w + cc, 0).reshape(self.num_candidates, -1)  # [M, P]
        inside = inside.reshape(self.num_candidates, -1)
        self._weights = inside.to(fine_gram.dtype) / inside.sum(1, keepdim=True).to(fine_gram.dtype)  # [M, P]
        self._pool_t: torch.Tensor | None = None
        self._row_offset: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.fine_gram.shape[0], self.num_candidates, self.num_candidates)

    def to(self, dtype: torch.dtype) -> PyramidGram:
        """The same Gram with ``fine_gram`` in ``dtype`` (self when it already is)."""
        return self if self.fine_gram.dtype == dtype else PyramidGram(self.fine_gram.to(dtype), self.grid, self.levels)

    def _pool(self, u: torch.Tensor) -> torch.Tensor:
        """u [B, N] over the fine tokens -> [B, M] over the candidates (area averages, as the pyramid)."""
        if self._pool_t is None:  # [N, M - N]: column j - N holds the patch weights of pooled candidate j
            n = self.fine_gram.shape[1]
            pool = torch.zeros(self.num_candidates - n, n, dtype=u.dtype, device=u.device)
            self._pool_t = pool.scatter_add_(1, self._patches[n:], self._weights[n:].to(u.dtype)).T.contiguous()
        return torch.cat([u, u @ self._pool_t], 1)

    def rows(self, s: torch.Tensor, flat: torch.Tensor | None = None) -> torch.Tensor:
        """<c_s, c_j> [B, M] for one candidate s [B] per example (``flat`` is unused: the row-oracle signature)."""
        b, n, _ = self.fine_gram.shape
        if self._row_offset is None or self._row_offset.shape[0] != b:
            self._row_offset = torch.arange(b, device=s.device)[:, None] * n
        patches = self._patches.index_select(0, s).add_(self._row_offset)  # [B, P] rows of the flattened Gram
        u = self.fine_gram.view(b * n, n).index_select(0, patches.view(-1)).view(b, -1, n)  # [B, P, N]
        u = torch.bmm(self._weights.index_select(0, s)[:, None], u)[:, 0]  # [B, N]: average over the patches of s
        return self._pool(u)

    def diag(self) -> torch.Tensor:
        """|c_j|^2 [B, M]: for a pooled candidate, the mean of the fine Gram over its patch pairs."""
        b, n, _ = self.fine_gram.shape
        parts = [self.fine_gram.diagonal(dim1=1, dim2=2)]
        side = 2 ** max(self.levels, default=0)
        start = n
        for level, count in zip(self.levels, self._level_sizes[1:]):  # per level: f * f patch slots, not side^2
            f = 2**level
            slots = (torch.arange(f, device=self._patches.device)[:, None] * side
                     + torch.arange(f, device=self._patches.device)).reshape(-1)
            pat = self._patches[start : start + count][:, slots]  # [Ml, f f]
            wts = self._weights[start : start + count][:, slots]
            pairs = (pat[:, :, None] * n + pat[:, None, :]).reshape(-1)  # [Ml f^2 f^2]
            g = self.fine_gram.view(b, n * n).index_select(1, pairs).view(b, count, -1)
            parts.append((g * (wts[:, :, None] * wts[:, None, :]).reshape(count, -1)).sum(-1))
            start += count
        return torch.cat(parts, 1)

    def mean(self) -> torch.Tensor:
        """Mean of all M x M inner products [B]: a^T G a / M^2, a_i = total weight of fine token i."""
        n = self.fine_gram.shape[1]
        a = torch.zeros(n, dtype=self.fine_gram.dtype, device=self.fine_gram.device)
        a.index_add_(0, self._patches.reshape(-1), self._weights.reshape(-1))
        return (self.fine_gram @ a).matmul(a) / self.num_candidates**2

    def dense(self) -> torch.Tensor:
        """The candidate Gram [B, M, M] itself (O(B M^2) memory; for checks and small inputs)."""
        n = self.fine_gram.shape[1]
        pool = torch.zeros(self.num_candidates, n, dtype=self.fine_gram.dtype, device=self.fine_gram.device)
        pool.scatter_add_(1, self._patches, self._weights)
        return pool @ self.fine_gram @ pool.T


def pyramid_gram(fine: torch.Tensor, grid: tuple[int, int], levels: tuple[int, ...] = (1, 2)) -> PyramidGram:
    """:class:`PyramidGram` of fine tokens [B, N, R] (one [B, N, N] product, in their dtype)."""
    return PyramidGram(fine @ fine.transpose(1, 2), grid, levels)


# ---------------------------------------------------------------------- validation
def _validate(cand, query, query_mask, budget, alpha, price, kernel, jitter, var_floor, distortion, check_finite=True):
    if not isinstance(cand, torch.Tensor) or cand.dim() != 3:
        raise ValueError(f"cand_emb: expected a [B, M, R] tensor, got {getattr(cand, 'shape', type(cand))}")
    b, m, r = cand.shape
    if check_finite and not all_finite(cand):
        raise ValueError("cand_emb: expected finite values, found NaN or Inf")
    if query is not None:
        if not isinstance(query, torch.Tensor) or query.dim() != 3 or query.shape[0] != b or query.shape[2] != r:
            raise ValueError(f"query_emb: expected a [B={b}, T, R={r}] tensor, got {getattr(query, 'shape', type(query))}")
        if not all_finite(query):
            raise ValueError("query_emb: expected finite values, found NaN or Inf")
        if query_mask is not None and tuple(query_mask.shape) != tuple(query.shape[:2]):
            raise ValueError(f"query_mask: expected shape {tuple(query.shape[:2])}, got {tuple(query_mask.shape)}")
    elif query_mask is not None:
        raise ValueError("query_mask: given without query_emb")
    if not isinstance(budget, torch.Tensor):
        if isinstance(budget, int) and not isinstance(budget, bool):
            budget = torch.full((b,), budget, dtype=torch.long, device=cand.device)
        else:
            raise ValueError(f"budget: expected an int or a [B={b}] long tensor, got {budget!r}")
    if budget.dim() == 0:
        budget = budget.expand(b)
    if budget.shape != (b,) or budget.is_floating_point() or budget.dtype == torch.bool:
        raise ValueError(f"budget: expected a [B={b}] integer tensor, got {budget.dtype} {tuple(budget.shape)}")
    if (budget < 0).any():
        raise ValueError(f"budget: expected values >= 0, got {budget.tolist()}")

    def per_example(name, v, lo, hi):
        t = torch.as_tensor(v, device=cand.device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"{name}: expected a float or a [B={b}] tensor, got shape {tuple(t.shape)}")
        if not torch.isfinite(t).all() or (t < lo).any() or (t > hi).any():
            raise ValueError(f"{name}: expected finite values in [{lo}, {hi}], got {t.tolist()}")
        return t

    alpha = per_example("alpha", alpha, 0.0, 1.0)
    price = per_example("price", price, 0.0, math.inf)
    if kernel not in _KERNELS:
        raise ValueError(f"kernel: expected one of {_KERNELS}, got {kernel!r}")
    for name, v in (("jitter", jitter), ("var_floor", var_floor), ("distortion", distortion)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name}: expected a finite float > 0, got {v!r}")
    if distortion < var_floor:
        raise ValueError(f"distortion: expected >= var_floor={var_floor} (below the numerical floor it means nothing), got {distortion}")
    return budget.to(device=cand.device, dtype=torch.long), alpha, price


# ---------------------------------------------------------------------- the greedy
def _kernel_setup(
    cand_emb: torch.Tensor,
    query_emb: torch.Tensor | None,
    kernel: str,
    bandwidth: float | None,
    dtype: torch.dtype,
    precompute_kernel: bool,
    cand_gram: torch.Tensor | PyramidGram | None,
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The kernel the greedy reads, one row at a time.

    Returns (row, diag [B, M] = k(j, j), k_qq [B, T, T] | None, k_qc [B, T, M] | None), where
    ``row(s, flat)`` gives the kernel rows k(c_s, .) [B, M] of the picks s [B] (``flat`` = the
    picks' indices into the flattened [B * M]) as a fresh tensor the caller may modify.
    Three sources of the raw inner products <c_s, c_j>: a [B, M, M] Gram (given, or computed
    once: one compute-bound product), a :class:`PyramidGram` (rows pooled from the fine
    tokens' Gram), or one row-vector product with the embeddings per pick (memory-bound).
    The kernel of a row is then O(M): cosine scales by the inverse norms, RBF exponentiates.
    """
    b, m, _ = cand_emb.shape
    if not precompute_kernel:
        c, q, diag, c_sq, _ = _prepare(cand_emb, query_emb, kernel, bandwidth, dtype)
        ct = c.transpose(1, 2).contiguous()  # [B, R, M]: a row vector times it is a kernel row
        k_qq = _cross(kernel, q, q) if q is not None else None
        k_qc = _cross(kernel, q, c) if q is not None else None
        rows_c = c.reshape(b * m, -1)

        def row_from_embeddings(s: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
            dots = torch.bmm(rows_c.index_select(0, flat)[:, None], ct)[:, 0]  # [B, M]
            if kernel == "cosine":
                return dots
            d2 = (c_sq.reshape(-1)[flat][:, None] + c_sq - 2 * dots).clamp_min_(0)
            return d2.mul_(-0.5).exp_()

        return row_from_embeddings, diag, k_qq, k_qc

    x = cand_emb.to(dtype)
    if isinstance(cand_gram, PyramidGram):
        pg = cand_gram.to(dtype)
        sq = pg.diag()
        raw_rows = pg.rows
        gram_mean = pg.mean if kernel == "rbf" and bandwidth is None else None
    else:
        g0 = x @ x.transpose(1, 2) if cand_gram is None else cand_gram.to(dtype)
        sq = g0.diagonal(dim1=1, dim2=2).clone()
        g_flat = g0.reshape(b * m, m)

        def raw_rows(s: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
            return g_flat.index_select(0, flat)

        gram_mean = (lambda: g0.mean(dim=(1, 2))) if kernel == "rbf" and bandwidth is None else None
    qx = query_emb.to(dtype) if query_emb is not None else None
    if kernel == "cosine":
        inv = _inv_norm(sq)
        inv_flat = inv.reshape(-1)
        diag = (sq > 0).to(dtype)
        k_qq = k_qc = None
        if qx is not None:
            qinv = _inv_norm(qx.pow(2).sum(-1))
            k_qq = (qx @ qx.transpose(1, 2)) * qinv[:, :, None] * qinv[:, None, :]
            k_qc = (x @ qx.transpose(1, 2)).transpose(1, 2) * qinv[:, :, None] * inv[:, None, :]

        def cosine_row(s: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
            return raw_rows(s, flat).mul_(inv_flat.index_select(0, flat)[:, None]).mul_(inv)

        return cosine_row, diag, k_qq, k_qc
    if gram_mean is not None:  # mean squared distance to the mean = mean |x|^2 - |mean x|^2
        ell2 = sq.mean(1) - gram_mean()
        ell2 = torch.where(ell2 > 0, ell2, torch.ones_like(ell2))
    else:
        ell2 = torch.full(sq.shape[:1], float(bandwidth) ** 2, dtype=dtype, device=x.device)
    sq_flat, ell2_c = sq.reshape(-1), ell2[:, None]
    diag = torch.ones_like(sq)
    k_qq = k_qc = None
    if qx is not None:
        qsq = qx.pow(2).sum(-1)
        k_qq = _rbf_from_dots(qx @ qx.transpose(1, 2), qsq, qsq, ell2)
        k_qc = _rbf_from_dots((x @ qx.transpose(1, 2)).transpose(1, 2), qsq, sq, ell2)

    def rbf_row(s: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        d2 = (sq_flat.index_select(0, flat)[:, None] + sq - 2 * raw_rows(s, flat)).clamp_min_(0)
        return d2.mul_(-0.5).div_(ell2_c).exp_()

    return rbf_row, diag, k_qq, k_qc


@torch.no_grad()
def greedy_conditional_mi(
    cand_emb: torch.Tensor,
    query_emb: torch.Tensor | None,
    query_mask: torch.Tensor | None,
    budget: torch.Tensor | int,
    alpha: torch.Tensor | float = 1.0,
    price: torch.Tensor | float = 0.0,
    *,
    kernel: str = "cosine",
    jitter: float = 1e-6,
    var_floor: float = 1e-4,
    distortion: float = 1e-2,
    bandwidth: float | None = None,
    dtype: torch.dtype | None = None,
    precompute_kernel: bool | None = None,
    check_finite: bool = True,
    cand_gram: torch.Tensor | PyramidGram | None = None,
    unary: torch.Tensor | None = None,
) -> GreedyResult:
    """Exact greedy conditional-MI selection (see the module docstring for the model).

    cand_emb:   [B, M, R] candidate embeddings in the relevance space.
    query_emb:  [B, T, R] query token embeddings, or None (coverage only).
    query_mask: [B, T] bool (True = real token) or None (all real). A row with no real
                token has I(c; Q) = 0, so only coverage drives it.
    budget:     [B] long (or int) cap on picks per example; values above M act as M.
    alpha:      [B] or float in [0, 1], weight of the query term vs. coverage.
    price:      [B] or float >= 0, nats per token: a row stops when its best gain < price.
                With price 0 the budget is always spent (once every candidate is
                redundant the rest are filled by largest residual variance).
    kernel:     "cosine" or "rbf" (RBF bandwidth: ``bandwidth`` or the per-example root
                mean squared distance of the candidates to their mean).
    jitter:     added to the covariance diagonal (numerical only).
    var_floor:  conditional variances at or below it count as zero (redundant).
    distortion: D of the coverage term.
    dtype:      compute dtype; default float64 for float64 input, else float32.
    precompute_kernel: compute the [B, M, M] Gram once (O(M^2 R) compute-bound time,
                O(M^2) memory) instead of one kernel row per pick (O(M K R) time,
                memory-bound, O(M K) memory). None: on CPU when B M^2 <= 2^26, else rows.
    check_finite: validate that the embeddings are finite (callers that already did may skip it).
    cand_gram:  optional raw inner products <c_i, c_j>: a [B, M, M] tensor, or a
                :class:`PyramidGram` (the fine tokens' Gram of a candidate pyramid, rows
                pooled on demand: no [M, M] matrix at all); implies ``precompute_kernel``.
    unary:      optional [B, M] nats >= 0 added to the objective of every non-redundant
                candidate (a query-agnostic prior, e.g. fused propositional / perspectival
                information). It changes which candidate is picked, never the reported
                ``query_gains`` / ``total``: those stay the chain-rule I(c_S ; Q).

    Returns a :class:`GreedyResult`.
    """
    budget, alpha, price = _validate(
        cand_emb, query_emb, query_mask, budget, alpha, price, kernel, jitter, var_floor, distortion, check_finite
    )
    b, m, _ = cand_emb.shape
    device = cand_emb.device
    if dtype is None:
        dtype = torch.float64 if cand_emb.dtype == torch.float64 else torch.float32
    alpha = alpha.to(dtype)
    price = price.to(dtype)
    if unary is not None:
        if unary.shape != cand_emb.shape[:2]:
            raise ValueError(f"unary: expected [B, M] = {tuple(cand_emb.shape[:2])}, got {tuple(unary.shape)}")
        if not bool(torch.isfinite(unary).all()) or bool((unary < 0).any()):
            raise ValueError("unary: expected finite values >= 0 (nats)")
        unary = unary.to(device=device, dtype=dtype)
    k_max = int(budget.clamp(max=m).max().item()) if b else 0
    budget = budget.clamp(max=m)

    if cand_gram is not None:
        if tuple(cand_gram.shape) != (b, m, m):
            raise ValueError(f"cand_gram: expected [B={b}, M={m}, M={m}], got {tuple(cand_gram.shape)}")
        precompute_kernel = True
    if precompute_kernel is None:  # CPU: one compute-bound Gram beats K memory-bound passes over [M, R]
        precompute_kernel = device.type == "cpu" and b * m * m <= 2**26
    t = query_emb.shape[1] if query_emb is not None else 0
    use_query = t > 0  # even at alpha = 0 the total I(c_S ; Q) is reported
    idx_out = torch.full((b, k_max), -1, dtype=torch.long, device=device)
    if k_max == 0:
        z = torch.zeros(b, 0, dtype=dtype, device=device)
        return GreedyResult(idx_out, z, z.clone(), z.clone(), torch.zeros(b, dtype=dtype, device=device),
                            torch.zeros(b, dtype=torch.long, device=device))
    kernel_row, diag, k_qq_raw, k_qc_raw = _kernel_setup(
        cand_emb, query_emb if use_query else None, kernel, bandwidth, dtype, precompute_kernel, cand_gram
    )
    var0 = diag + jitter  # [B, M] Var(j)

    # Chains stacked on the batch axis: rows :B chain B (conditioned on the query first) when
    # there is a query, the last B rows chain A (picks only). One factor l [T + K, C B, M],
    # pivot-major (the row written at each step is contiguous): chain B's rows :T are an
    # eigen-factor of the real query tokens (K_QQ + jitter I; padded tokens zeroed out,
    # eigenvalues at or below the floor dropped); pick k is row T + k of every chain (chain A's
    # rows :T stay zero and are never read).
    chains = 2 if use_query else 1
    cb = chains * b
    l = torch.zeros(t + k_max, cb, m, dtype=dtype, device=device)
    var = var0.repeat(chains, 1)  # [C B, M] conditional variances, chain B first
    if use_query:
        qm = torch.ones(b, t, dtype=torch.bool, device=device) if query_mask is None else query_mask.to(device).bool()
        qmf = qm.to(dtype)
        k_qq = k_qq_raw * qmf[:, :, None] * qmf[:, None, :]
        k_qq = k_qq + torch.diag_embed(qmf * jitter)
        k_qc = k_qc_raw * qmf[:, :, None]  # [B, T, M]
        evals, evecs = torch.linalg.eigh(k_qq)
        inv_sqrt = torch.where(evals > var_floor, evals.clamp_min(var_floor).rsqrt(), torch.zeros_like(evals))
        l_q = (evecs.transpose(1, 2) @ k_qc) * inv_sqrt[:, :, None]  # [B, T, M]
        l[:t, :b] = l_q.transpose(0, 1)
        var[:b] = (var0 - l_q.pow(2).sum(1)).clamp_min(0)

    # Gains are kept doubled (2 I = log of a variance ratio): scaling by 2 is exact in
    # floating point, so argmax, ties and "gain >= price" are those of the gains themselves.
    # logs [1 + C, B, M] = [log D, (log Var(j | S, Q),) log Var(j | S)];
    # gains [3, B, M] = [2 R_j, 2 I(c_j ; Q | c_S), 2 gain_j].
    logs = torch.empty(1 + chains, b, m, dtype=dtype, device=device)
    logs[0] = math.log(distortion)
    log_var = logs[1:].view(cb, m)
    gains = torch.zeros(3, b, m, dtype=dtype, device=device)
    gains_flat = gains.view(3, b * m)
    score = torch.empty(b, m, dtype=dtype, device=device)
    bias = torch.zeros(b, m, dtype=dtype, device=device)  # -inf once picked
    bias_flat = bias.view(-1)
    picks: list[torch.Tensor] = []  # [B] per step
    picked_gains = torch.empty(k_max, 3, b, dtype=dtype, device=device)
    cov = torch.empty(cb, 1, m, dtype=dtype, device=device)
    alpha_c = alpha[:, None]
    unary2 = 2 * unary if unary is not None else None
    price2 = 2 * price
    row_offset = torch.arange(b, device=device) * m  # flat index of (b, 0) in [B, M]
    var_chains = var.view(chains, b * m)  # [C, B * M]: chain c's Var(j) of example i at i * M + j
    var_a = var[cb - b :]
    cov_b, cov_a, cov_rows = cov[:b], cov[cb - b :], cov[:, 0]
    g_cov, g_query, g_sum = gains.unbind(0)
    log_d_and_b, log_a = logs[0:chains], logs[chains:]
    # a row stops early only with a price or per-example budgets: then check every step
    stop_early = bool((price > 0).any()) or bool((budget != k_max).any())
    done = budget <= 0
    steps = k_max
    host = device.type == "cpu"
    for k in range(k_max):
        torch.clamp_min(var, var_floor, out=log_var)
        log_var.log_()
        # var_floor <= distortion, so a redundant candidate (Var(j|S) <= floor) gets 0 from both terms
        # [log Var_A - log D, log Var_A - log Var_B] (the second only with a query), clamped at 0
        torch.sub(log_a, log_d_and_b, out=gains[:chains]).clamp_min_(0)
        if use_query:
            torch.lerp(g_cov, g_query, alpha_c, out=g_sum)
        else:
            torch.mul(g_cov, 1 - alpha_c, out=g_sum)
        if unary2 is not None:
            g_sum.add_(unary2 * (g_sum > 0))
        s = torch.add(g_sum, bias, out=score).argmax(dim=1)  # [B]
        flat = s + row_offset
        pg = torch.index_select(gains_flat, 1, flat, out=picked_gains[k])  # [3, B]
        if not host or bool((pg[2] <= 0).any()):  # on an accelerator: no sync, always the fallback
            # no positive gain left in some row: among zero gains, the largest residual variance
            fallback = ((var_a.clamp(0, 1) - 2) + bias).argmax(dim=1)
            s = torch.where(pg[2] > 0, s, fallback)
            flat = s + row_offset
            torch.index_select(gains_flat, 1, flat, out=pg)
        picks.append(s)
        if stop_early:
            done = done | (k >= budget) | (pg[2] < price2)
            if bool(done.all()):
                steps = k + 1
                break
        if k == k_max - 1:
            break
        bias_flat.index_fill_(0, flat, -math.inf)
        # kernel row of the pick, then one Cholesky row per chain. The row's own entry (where
        # the jitter would go) only ever feeds column s of the factor, which no later step reads.
        kr = kernel_row(s, flat)[:, None]  # [B, 1, M]
        r = t + k
        s_idx = s[:, None, None]
        if use_query:  # chain B: the query rows and the picks so far
            prev = l[:r, :b].transpose(0, 1)  # [B, T + k, M]
            ls = prev.gather(2, s_idx.expand(b, r, 1))
            torch.baddbmm(kr, ls.transpose(1, 2), prev, alpha=-1, out=cov_b)
        if k > 0:  # chain A: the picks so far
            prev = l[t:r, cb - b :].transpose(0, 1)  # [B, k, M]
            ls = prev.gather(2, s_idx.expand(b, k, 1))
            torch.baddbmm(kr, ls.transpose(1, 2), prev, alpha=-1, out=cov_a)
        else:
            cov_a.copy_(kr)
        vs = var_chains.index_select(1, flat).view(cb)  # [C B] Var(s | previous pivots)
        # a pivot at or below the floor is already determined: conditioning on it is a no-op
        inv = vs.clamp_min(var_floor).rsqrt_().mul_(vs > var_floor)
        col = torch.mul(cov_rows, inv[:, None], out=l[r])
        var.addcmul_(col, col, value=-1).clamp_min_(0)
        var_chains.index_fill_(1, flat, 0.0)  # a pick is known exactly

    picks, picked_gains = torch.stack(picks, 1), picked_gains[:steps].permute(1, 2, 0)  # [B, K'], [3, B, K']
    ks = torch.arange(steps, device=device)
    cont = (ks[None] < budget[:, None]) & (picked_gains[2] >= price2[:, None])
    cont = cont.cumprod(1).bool()  # a row that stopped stays stopped
    half = torch.where(cont[None], picked_gains * 0.5, 0.0)
    idx_out[:, :steps] = torch.where(cont, picks, -1)
    g_out = torch.zeros(3, b, k_max, dtype=dtype, device=device)
    g_out[:, :, :steps] = half
    gx_out, gq_out, g_out = g_out.unbind(0)  # without a query, the query gains stayed 0
    total = gq_out.sum(1)
    counts = (idx_out >= 0).sum(1)
    return GreedyResult(idx_out, g_out, gq_out, gx_out, total, counts)


# ---------------------------------------------------------------------- closed form
def gaussian_set_mi(
    cand_emb: torch.Tensor,
    query_emb: torch.Tensor,
    indices: torch.Tensor,
    query_mask: torch.Tensor | None = None,
    *,
    kernel: str = "cosine",
    jitter: float = 1e-6,
    var_floor: float | None = None,
    bandwidth: float | None = None,
) -> torch.Tensor:
    """Differentiable I(c_S ; Q) of the candidates ``indices`` [B], in nats.

    cand_emb [B, M, R], query_emb [B, T, R], indices [B, K] (-1 = padding, ignored),
    query_mask [B, T]. Same model as :func:`greedy_conditional_mi` (Sigma = kernel +
    jitter I).

    ``var_floor=None``: the exact form 1/2 [log det Sigma_SS + log det Sigma_QQ - log det
    Sigma_(S,Q)] (Cholesky; the matrices must be numerically positive definite).

    With a floor: the chain rule along the order of ``indices`` under the greedy's floors,
    sum_k 1/2 log+( max(Var(s_k | S_<k), f) / max(Var(s_k | S_<k, Q), f) ), where a pick whose
    conditional variance in a chain is at or below the floor ``f`` is determined (it adds
    nothing and is not conditioned on) and the query's eigen-directions at or below the floor
    are dropped. For the greedy's own picks it equals the greedy's ``total``; where no floor
    engages it equals the exact form (and does not depend on the order). Rank-deficient sets,
    exact duplicates and query twins are fine. (Clamping each log-det's eigenvalues instead is
    not the same quantity: on low-rank tokens it differs from the chain by nats.)
    """
    if kernel not in _KERNELS:
        raise ValueError(f"kernel: expected one of {_KERNELS}, got {kernel!r}")
    dtype = torch.float64 if cand_emb.dtype == torch.float64 else torch.float32
    if kernel == "rbf" and bandwidth is None:  # the bandwidth comes from every candidate
        x = cand_emb.to(dtype)
        ell2 = (x - x.mean(dim=1, keepdim=True)).pow(2).sum(-1).mean(dim=1)
        bandwidth = torch.where(ell2 > 0, ell2, torch.ones_like(ell2)).sqrt()
    sel = cand_emb.gather(1, indices.clamp_min(0)[..., None].expand(-1, -1, cand_emb.shape[-1]))
    if kernel == "rbf":
        scale = bandwidth.to(dtype)[:, None, None] if isinstance(bandwidth, torch.Tensor) else float(bandwidth)
        cs, q = sel.to(dtype) / scale, query_emb.to(dtype) / scale
    else:
        cs, q, _, _, _ = _prepare(sel, query_emb, kernel, None, dtype)  # gather first: normalise K rows, not M
    b, t = q.shape[:2]
    valid = indices >= 0
    qm = torch.ones(b, t, dtype=torch.bool, device=cs.device) if query_mask is None else query_mask.bool()
    joint = torch.cat([cs, q], 1)
    present = torch.cat([valid, qm], 1).to(dtype)
    kj = _cross(kernel, joint, joint) * present[:, :, None] * present[:, None, :]
    # absent entries become independent unit variables: they add 0 to every log-det
    kj = kj + torch.diag_embed(present * jitter + (1 - present))
    ks = indices.shape[1]
    if var_floor is not None:
        return _floored_chain_mi(kj, ks, valid, qm, float(var_floor))
    ld = lambda mat: torch.linalg.cholesky(mat).diagonal(dim1=-2, dim2=-1).log().sum(-1) * 2  # noqa: E731
    return 0.5 * (ld(kj[:, :ks, :ks]) + ld(kj[:, ks:, ks:]) - ld(kj))


def _floored_chain_mi(kj: torch.Tensor, ks: int, valid: torch.Tensor, qm: torch.Tensor, var_floor: float) -> torch.Tensor:
    """[B]: the greedy's chain-rule I(c_S ; Q) along the given picks (see :func:`gaussian_set_mi`).

    kj: [B, K + T, K + T] joint covariance (the K picks, then the T query tokens; absent entries
    independent unit variables), valid: [B, K] and qm: [B, T] bool (real picks / query tokens).

    The floors make discrete choices: which query eigen-directions count, and which picks are
    determined in each chain. They are made without gradient, by the greedy's own recursion (two
    Gram-Schmidt chains over the picks, O(K^2 (K + T)), in place); the value is that recursion's.
    When a gradient is wanted the same value is recomputed, the choices held fixed, from two
    Cholesky factorisations (the kept directions and picks; the others independent unit
    variables), so it flows to the embeddings of every pick and query token that counts.
    """
    b, f = kj.shape[0], var_floor
    k_ss, k_qs = kj[:, :ks, :ks], kj[:, ks:, :ks]
    qmf = qm.to(kj.dtype)
    k_qq = kj[:, ks:, ks:] * qmf[:, :, None] * qmf[:, None, :]  # absent tokens: no variance (dropped)
    with torch.no_grad():
        # the query's eigen-factor as the greedy builds it
        evals, evecs = torch.linalg.eigh(k_qq.detach())
        keep_q = evals > f  # [B, T]
        basis = evecs * keep_q[:, None, :].to(kj.dtype)  # [B, T, T] kept eigenvectors (others 0)
        l_q = (basis.transpose(1, 2) @ k_qs.detach()) * torch.where(keep_q, evals.clamp_min(f).rsqrt(), 0.0)[:, :, None]
        t = l_q.shape[1]
        k_det = k_ss.detach()
        var_a = k_det.diagonal(dim1=-2, dim2=-1).clone()  # [B, K]
        var_b = (var_a - l_q.pow(2).sum(1)).clamp_min(0)
        fac_a = kj.new_zeros(b, ks, ks)  # row k: pick k's Gram-Schmidt row in chain A
        fac_b = torch.cat([l_q, kj.new_zeros(b, ks, ks)], 1)  # chain B: the query rows first
        kept_a = torch.zeros(b, ks, dtype=torch.bool, device=kj.device)
        kept_b = torch.zeros_like(kept_a)
        total = kj.new_zeros(b)
        for k in range(ks):
            va, vb = var_a[:, k], var_b[:, k]  # later steps only write columns > k
            kept_a[:, k] = valid[:, k] & (va > f)
            kept_b[:, k] = valid[:, k] & (vb > f)
            gain = 0.5 * (va.clamp_min(f).log() - vb.clamp_min(f).log()).clamp_min(0)
            total += torch.where(kept_a[:, k], gain, 0.0)
            if k == ks - 1:
                break
            for fac, var, v, kept, r in ((fac_a, var_a, va, kept_a[:, k], k), (fac_b, var_b, vb, kept_b[:, k], t + k)):
                # cov(s_k, s_j | the chain's earlier rows) for the later picks j > k, scaled by 1 / sd
                cov = k_det[:, k, k + 1 :] - torch.bmm(fac[:, None, :r, k], fac[:, :r, k + 1 :])[:, 0]
                row = cov * torch.where(kept, v.clamp_min(f).rsqrt(), 0.0)[:, None]
                fac[:, r, k + 1 :] = row
                var[:, k + 1 :] = (var[:, k + 1 :] - row.pow(2)).clamp_min(0)
    if not (torch.is_grad_enabled() and kj.requires_grad):
        return total

    def independent_outside(mat: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        both = (keep[:, :, None] & keep[:, None, :]).to(mat.dtype)
        return mat * both + torch.diag_embed((~keep).to(mat.dtype))

    # chain A: Var(s_k | kept earlier picks) = the Cholesky diagonal of the kept picks' covariance
    var_a = torch.linalg.cholesky(independent_outside(k_ss, kept_a)).diagonal(dim1=-2, dim2=-1).pow(2)
    # chain B: the kept query directions z = U^T q (covariance U^T K_QQ U), then the picks kept in B
    z = basis.transpose(1, 2) @ k_qq @ basis
    zc = basis.transpose(1, 2) @ k_qs * kept_b[:, None, :].to(kj.dtype)
    joint = torch.cat([torch.cat([independent_outside(z, keep_q), zc], 2),
                       torch.cat([zc.transpose(1, 2), independent_outside(k_ss, kept_b)], 2)], 1)
    var_b = torch.linalg.cholesky(joint).diagonal(dim1=-2, dim2=-1)[:, t:].pow(2)
    var_b = torch.where(kept_b, var_b, torch.full_like(var_b, f))  # determined in B: at the floor
    gain = 0.5 * (var_a.clamp_min(f).log() - var_b.clamp_min(f).log()).clamp_min(0)
    return torch.where(kept_a, gain, 0.0).sum(1)
