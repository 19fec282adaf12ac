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

Conditional variances are kept by incremental Cholesky (Gram-Schmidt on kernel columns):
chain A conditions on the picks, chain B on the query tokens first and then the picks (the
two chains are stacked on the batch axis). Each step takes one kernel column and adds one
Cholesky row per chain (O(M (T + k))): O(M K (T + K)) time and O(M (T + K)) memory for the
chains, batched over B with no Python loop over the batch. The kernel columns come either
from one product per step (O(M R) each, memory-bound: the choice on accelerators) or from
the kernel precomputed in one compute-bound Gram (O(M^2 R) time, O(M^2) memory: faster on
CPU, the default there while B M^2 <= 2^26).

Tokens are deterministic, so the jitter is numerical only: a conditional variance at or
below ``var_floor`` means "determined by what is already known". Such a candidate is
redundant (zero gain), ``Var(j | S, Q)`` is clamped at the floor (finite information about
the query's twin), and conditioning on a determined variable is a no-op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["GreedyResult", "greedy_conditional_mi", "kernel_matrix", "gaussian_set_mi"]

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


def _precomputed_kernels(
    cand: torch.Tensor,
    query: torch.Tensor | None,
    kernel: str,
    bandwidth: float | None,
    dtype: torch.dtype,
    cand_gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The whole kernel from one Gram of the raw embeddings (no normalised copy of [B, M, R]).

    ``cand_gram`` [B, M, M]: the raw inner products, when the caller has them more cheaply.
    Returns gram [B, M, M], diag [B, M] = k(j, j), k_qq [B, T, T] | None, k_qc [B, T, M] | None.
    """
    x = cand.to(dtype)
    g0 = x @ x.transpose(1, 2) if cand_gram is None else cand_gram.to(dtype, copy=True)
    sq = g0.diagonal(dim1=1, dim2=2).clone()
    qx = query.to(dtype) if query is not None else None
    if kernel == "cosine":
        inv = _inv_norm(sq)
        gram = g0.mul_(inv[:, :, None]).mul_(inv[:, None, :])
        diag = (sq > 0).to(dtype)
        if qx is None:
            return gram, diag, None, None
        qinv = _inv_norm(qx.pow(2).sum(-1))
        k_qq = (qx @ qx.transpose(1, 2)) * qinv[:, :, None] * qinv[:, None, :]
        k_qc = (qx @ x.transpose(1, 2)) * qinv[:, :, None] * inv[:, None, :]
        return gram, diag, k_qq, k_qc
    if bandwidth is None:  # mean squared distance to the mean = mean |x|^2 - |mean x|^2
        ell2 = sq.mean(1) - g0.mean(dim=(1, 2))
        ell2 = torch.where(ell2 > 0, ell2, torch.ones_like(ell2))
    else:
        ell2 = torch.full(sq.shape[:1], float(bandwidth) ** 2, dtype=dtype, device=x.device)
    gram = _rbf_from_dots(g0, sq, sq, ell2)
    diag = torch.ones_like(sq)
    if qx is None:
        return gram, diag, None, None
    qsq = qx.pow(2).sum(-1)
    k_qq = _rbf_from_dots(qx @ qx.transpose(1, 2), qsq, qsq, ell2)
    k_qc = _rbf_from_dots(qx @ x.transpose(1, 2), qsq, sq, ell2)
    return gram, diag, k_qq, k_qc


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


# ---------------------------------------------------------------------- validation
def _validate(cand, query, query_mask, budget, alpha, price, kernel, jitter, var_floor, distortion, check_finite=True):
    if not isinstance(cand, torch.Tensor) or cand.dim() != 3:
        raise ValueError(f"cand_emb: expected a [B, M, R] tensor, got {getattr(cand, 'shape', type(cand))}")
    b, m, r = cand.shape
    if check_finite and not torch.isfinite(cand).all():
        raise ValueError("cand_emb: expected finite values, found NaN or Inf")
    if query is not None:
        if not isinstance(query, torch.Tensor) or query.dim() != 3 or query.shape[0] != b or query.shape[2] != r:
            raise ValueError(f"query_emb: expected a [B={b}, T, R={r}] tensor, got {getattr(query, 'shape', type(query))}")
        if not torch.isfinite(query).all():
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
    cand_gram: torch.Tensor | None = None,
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
    precompute_kernel: compute the [B, M, M] kernel once (O(M^2 R) compute-bound time,
                O(M^2) memory) instead of one kernel column per step (O(M K R) time,
                memory-bound, O(M K) memory). None: on CPU when B M^2 <= 2^26, else columns.
    check_finite: validate that the embeddings are finite (callers that already did may skip it).
    cand_gram:  optional [B, M, M] raw inner products <c_i, c_j> (e.g. pooled from the fine
                tokens' Gram, cheaper on a pyramid); implies ``precompute_kernel``.
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
        if cand_gram.shape != (b, m, m):
            raise ValueError(f"cand_gram: expected [B={b}, M={m}, M={m}], got {tuple(cand_gram.shape)}")
        precompute_kernel = True
    if precompute_kernel is None:  # CPU: one compute-bound Gram beats K memory-bound passes over [M, R]
        precompute_kernel = device.type == "cpu" and b * m * m <= 2**26
    ct = c_sq = None
    if precompute_kernel:
        gram, diag, k_qq_raw, k_qc_raw = _precomputed_kernels(cand_emb, query_emb, kernel, bandwidth, dtype, cand_gram)
    else:
        gram = None
        c, q, diag, c_sq, _ = _prepare(cand_emb, query_emb, kernel, bandwidth, dtype)
        ct = c.transpose(1, 2).contiguous()  # [B, R, M]: a row vector times it is a kernel column
        k_qq_raw = _cross(kernel, q, q) if q is not None else None
        k_qc_raw = _cross(kernel, q, c) if q is not None else None
        del c
    var0 = diag + jitter  # [B, M] Var(j)

    # Two chains stacked on the batch axis (rows :B chain A, B: chain B), one factor
    # l [2B, T + K, M] in pivot-major layout. Chain B's first T rows are an eigen-factor of
    # the real query tokens (K_QQ + jitter I; padded tokens zeroed out, eigenvalues at or
    # below the floor dropped); chain A's are zero, which conditions on nothing.
    t = query_emb.shape[1] if query_emb is not None else 0
    use_query = t > 0  # even at alpha = 0 the total I(c_S ; Q) is reported
    chains = 2 if use_query else 1
    l = torch.zeros(chains * b, t + k_max, m, dtype=dtype, device=device)
    var = var0.repeat(chains, 1)
    if use_query:
        qm = torch.ones(b, t, dtype=torch.bool, device=device) if query_mask is None else query_mask.to(device).bool()
        qmf = qm.to(dtype)
        k_qq = k_qq_raw * qmf[:, :, None] * qmf[:, None, :]
        k_qq = k_qq + torch.diag_embed(qmf * jitter)
        k_qc = k_qc_raw * qmf[:, :, None]  # [B, T, M]
        evals, evecs = torch.linalg.eigh(k_qq)
        inv_sqrt = torch.where(evals > var_floor, evals.clamp_min(var_floor).rsqrt(), torch.zeros_like(evals))
        l_q = (evecs.transpose(1, 2) @ k_qc) * inv_sqrt[:, :, None]  # [B, T, M]
        l[b:, :t] = l_q
        var[b:] = (var0 - l_q.pow(2).sum(1)).clamp_min(0)

    idx_out = torch.full((b, k_max), -1, dtype=torch.long, device=device)
    g_out = torch.zeros(b, k_max, dtype=dtype, device=device)
    gq_out = torch.zeros_like(g_out)
    gx_out = torch.zeros_like(g_out)
    picked = torch.zeros(b, m, dtype=torch.bool, device=device)
    done = budget <= 0
    alpha_c = alpha[:, None]
    half_log_d = 0.5 * math.log(distortion)
    check_every = 1 if bool((price > 0).any()) or bool((budget != k_max).any()) else k_max + 1

    for k in range(k_max):
        var_a = var[:b]
        # var_floor <= distortion, so a redundant candidate (Var(j|S) <= floor) gets 0 from both terms
        log_va = var_a.clamp_min(var_floor).log()
        cov_gain = (0.5 * log_va - half_log_d).clamp_min(0)
        if use_query:
            q_gain = (0.5 * (log_va - var[b:].clamp_min(var_floor).log())).clamp_min(0)
            gain = torch.lerp(cov_gain, q_gain, alpha_c)
        else:
            q_gain = torch.zeros_like(cov_gain)
            gain = (1 - alpha_c) * cov_gain
        if unary is not None:
            gain = torch.where(gain > 0, gain + unary, gain)
        # positive gains first; among zero gains, the largest residual variance
        score = torch.where(gain > 0, gain, var_a.clamp(0, 1) - 2).masked_fill_(picked, -math.inf)
        s = score.argmax(dim=1)  # [B]
        s1 = s[:, None]
        g = gain.gather(1, s1)[:, 0]
        cont = ~done & (k < budget) & (g >= price)
        idx_out[:, k] = torch.where(cont, s, -1)
        g_out[:, k] = torch.where(cont, g, 0)
        gq_out[:, k] = torch.where(cont, q_gain.gather(1, s1)[:, 0], 0)
        gx_out[:, k] = torch.where(cont, cov_gain.gather(1, s1)[:, 0], 0)
        done = done | ~cont
        if k == k_max - 1 or ((k + 1) % check_every == 0 and bool(done.all())):
            break
        picked.scatter_(1, s1, True)
        # kernel column of the pick (one row-vector product), then one Cholesky column per chain
        if gram is not None:
            kcol = gram.gather(1, s[:, None, None].expand(-1, 1, m))[:, 0]  # row s = column s
        else:
            cs = ct.gather(2, s[:, None, None].expand(-1, ct.shape[1], 1))  # [B, R, 1]
            kcol = torch.bmm(cs.transpose(1, 2), ct)[:, 0]  # [B, M]
            if kernel == "rbf":
                kcol = torch.exp(-0.5 * (c_sq + c_sq.gather(1, s1) - 2 * kcol).clamp_min(0))
        kcol = kcol.scatter_add(1, s1, torch.full_like(g[:, None], jitter))
        ss = s.repeat(chains)
        _cholesky_step(l, var, kcol.repeat(chains, 1), ss, t + k, var_floor)

    total = gq_out.sum(1)
    counts = (idx_out >= 0).sum(1)
    return GreedyResult(idx_out, g_out, gq_out, gx_out, total, counts)


def _cholesky_step(
    l: torch.Tensor, var: torch.Tensor, kcol: torch.Tensor, s: torch.Tensor, k: int, var_floor: float
) -> None:
    """Condition every chain on its pivot s [C]: write row k of l [C, T + K, M], update var [C, M] in place.

    cov(j, s | previous pivots) = k(j, s) - sum_i l[i, j] l[i, s]; the new factor row is
    cov / sqrt(Var(s | previous)); a pivot at or below the floor is already determined and
    conditioning on it is a no-op.
    """
    s1 = s[:, None]
    if k > 0:
        prev = l[:, :k]  # [C, k, M]
        ls = prev.gather(2, s[:, None, None].expand(-1, k, 1))  # [C, k, 1]
        cov = kcol - torch.bmm(ls.transpose(1, 2), prev)[:, 0]
    else:
        cov = kcol
    vs = var.gather(1, s1)  # [C, 1]
    inv = torch.where(vs > var_floor, vs.clamp_min(var_floor).rsqrt(), torch.zeros_like(vs))
    col = cov * inv
    l[:, k] = col
    var.sub_(col * col).clamp_(min=0)
    var.scatter_(1, s1, 0.0)  # a pick is known exactly


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
    """Differentiable I(c_S ; Q) = 1/2 [log det Sigma_SS + log det Sigma_QQ - log det Sigma_(S,Q)] [B].

    cand_emb [B, M, R], query_emb [B, T, R], indices [B, K] (-1 = padding, ignored),
    query_mask [B, T]. Same model as :func:`greedy_conditional_mi` (Sigma = kernel +
    jitter I). ``var_floor=None``: exact log-dets (Cholesky; the matrices must be
    numerically positive definite). With a floor, each log-det sums log max(eigenvalue,
    var_floor), the set-level counterpart of the greedy's floors: an exact duplicate adds
    nothing and a query twin's information is capped, and rank-deficient sets are fine.
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
    if var_floor is None:
        ld = lambda mat: torch.linalg.cholesky(mat).diagonal(dim1=-2, dim2=-1).log().sum(-1) * 2  # noqa: E731
    else:
        ld = lambda mat: torch.linalg.eigvalsh(mat).clamp_min(var_floor).log().sum(-1)  # noqa: E731
    return 0.5 * (ld(kj[:, :ks, :ks]) + ld(kj[:, ks:, ks:]) - ld(kj))
