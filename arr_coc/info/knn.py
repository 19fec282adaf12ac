"""Exact k-nearest-neighbour search in the max-norm, with bounded memory, on any device.

The engines answer the same question - for every point, the distance ``eps_i`` to its k-th
nearest other point - and give the strict neighbour counts the KSG estimators need:

- ``brute_radius_counts``: tiles of the full distance matrix (chunked so a tile holds at
  most ``TILE_ELEMENTS`` entries). O(n^2) work, any dimension; the right tool on a GPU or
  at small n.
- ``strip_kth_2d`` (torch, any device): the two-dimensional case ``(x, y)`` (both scalar)
  with one ``y`` shared by a batch of ``x`` (the features of ``mi_features``), in
  O(n log n) work and O(n) memory. The points, in ``y`` order, are cut into horizontal
  strips of ``h`` points (``y`` is shared, so the strips are too) and each strip is sorted
  by ``x``. A point's candidates are the ``w`` nearest slots on either side of its ``x`` in
  its own strip and in the ``A`` strips above and below (a fixed shape that vectorises);
  their k-th smallest distance ``ub`` bounds ``eps_i`` from above. Every unexamined point
  is at least ``L`` away: in each strip of the band, the ``x`` gap to its first unexamined
  slot (raised to the strip's ``y`` distance for the other strips), and beyond the band
  the ``y`` gap to the next strips. Where ``ub <= L`` the bound is exact. The rest (about
  15 % on Gaussian data) are answered exactly by enumerating the square of half-side
  ``ub``: a range of strips, and in each a range of slots found by binary search.
- the compiled CPU kernels of ``arr_coc.info._numba_knn`` (numba; ``numba_kernels()``): a
  rank-space grid searched in rings, the same answer with no temporaries. ``ksg_counts_2d``
  picks them for CPU tensors where numba is installed.
- ``tree_radius_counts`` (CPU, numba): what ``brute_radius_counts`` computes, for any
  low-dimensional joint space (``TREE_MAX_DIM`` coordinates or fewer), by k-d trees in
  O(n log n)-ish work: the multivariate ``ksg_mi``, ``ksg_cmi`` and the continuous
  ``ci_test``. ``tree_knn_indices``: the k nearest neighbours themselves (``ci_test``'s local
  permutation).

``strict_counts_sorted`` counts ``#{j : |v_j - v_i| < eps_i}`` with binary search on
sorted marginals; the boundary is then corrected so that the count uses exactly the
floating-point predicate ``abs(v_j - v_i) < eps_i`` (the same one the brute engine uses).
Every engine is exact: the tests compare them with brute force bit for bit, ties included.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import torch

__all__ = [
    "TILE_ELEMENTS",
    "TREE_MAX_DIM",
    "brute_radius_counts",
    "ksg_counts_2d",
    "kth_1d_sorted",
    "numba_kernels",
    "strict_counts_sorted",
    "strip_kth_2d",
    "tree_knn_indices",
    "tree_radius_counts",
    "use_tree",
]

TILE_ELEMENTS = 1 << 22  # entries per distance tile (32 MiB in float64)
TREE_MAX_DIM = 8  # joint spaces of up to this many coordinates use the k-d trees (CPU, numba)
TREE_MIN_N = 256  # below this many points the tiled brute force is as fast
CHUNK = 1 << 13  # query points per vectorised step on the CPU (the temporaries stay in cache)
DEVICE_CHUNK = 1 << 20  # ... on an accelerator (fewer, larger launches)


def _chunk(device: torch.device) -> int:
    return CHUNK if device.type == "cpu" else DEVICE_CHUNK


def _tile_rows(n: int, copies: int) -> int:
    return max(1, TILE_ELEMENTS // max(1, n * copies))


def brute_radius_counts(
    variables: list[torch.Tensor], k: int, count_sets: list[tuple[int, ...]]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """k-th neighbour distance in the joint max-norm and strict counts in subspaces.

    variables: list of ``[n, d_v]`` tensors (the joint space is their concatenation).
    count_sets: for each requested count, the indices of the variables forming the subspace.
    Returns ``eps [n]`` (max-norm distance to the k-th nearest other point of the joint
    space) and, per count set, ``[n]`` long ``#{j != i : max_{v in set} |z_v,j - z_v,i| < eps_i}``.
    """
    n = variables[0].shape[0]
    device = variables[0].device
    eps = torch.empty(n, dtype=variables[0].dtype, device=device)
    counts = [torch.empty(n, dtype=torch.long, device=device) for _ in count_sets]
    rows = _tile_rows(n, len(variables) + 2)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        idx = torch.arange(r0, r1, device=device)
        per_var = []
        for v in variables:
            d = (v[r0:r1, None, :] - v[None, :, :]).abs().amax(dim=-1) if v.shape[1] > 1 else (v[r0:r1, 0, None] - v[None, :, 0]).abs()
            d[torch.arange(r1 - r0, device=device), idx] = math.inf  # never count the point itself
            per_var.append(d)
        joint = per_var[0]
        for d in per_var[1:]:
            joint = torch.maximum(joint, d)
        e = joint.kthvalue(k, dim=1).values
        eps[r0:r1] = e
        for c, cs in enumerate(count_sets):
            sub = per_var[cs[0]]
            for j in cs[1:]:
                sub = torch.maximum(sub, per_var[j])
            counts[c][r0:r1] = (sub < e[:, None]).sum(dim=1)
    return eps, counts


def _bsearch(flat: torch.Tensor, row_start: torch.Tensor, n: int, val: torch.Tensor, right: bool) -> torch.Tensor:
    """Vectorised binary search in sorted rows of a flat array: for each query, the first
    index ``j in [0, n]`` of its row (``flat[row_start + j]``) whose value is ``> val``
    (``right``) or ``>= val``."""
    lo = torch.zeros_like(row_start)
    hi = torch.full_like(row_start, n)
    for _ in range(max(1, n.bit_length())):
        active = lo < hi
        if not bool(active.any()):
            break
        mid = (lo + hi) // 2
        v = flat.index_select(0, row_start + mid.clamp(max=n - 1))
        go_left = (v > val) if right else (v >= val)
        hi = torch.where(active & go_left, mid, hi)
        lo = torch.where(active & ~go_left, mid + 1, lo)
    return lo


def strict_counts_sorted(sorted_v: torch.Tensor, v: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``#{j : |sorted_v[b, j] - v[b, i]| < eps[b, i]}`` (the point itself included when eps > 0).

    sorted_v: [B, n] ascending rows, or [n] shared by every row; v, eps: [B, m] -> [B, m] long.
    Binary search on ``v +- eps`` finds the interval up to rounding; it is then checked, and
    where needed moved, with the exact predicate ``abs(sorted_v[j] - v) < eps`` (moving over
    a whole run of equal values at a time), so the count is the brute-force count.
    """
    shared = sorted_v.dim() == 1
    B, m = v.shape
    sorted_v = sorted_v.contiguous()
    out = torch.empty(B, m, dtype=torch.long, device=v.device)
    rows = max(1, _chunk(v.device) * 8 // m)  # rows per step: the temporaries stay in cache
    for r0 in range(0, B, rows):
        r1 = min(B, r0 + rows)
        out[r0:r1] = _strict_counts_rows(sorted_v if shared else sorted_v[r0:r1], v[r0:r1], eps[r0:r1])
    return out


def _strict_counts_rows(sorted_v: torch.Tensor, v: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``strict_counts_sorted`` for a few rows."""
    shared = sorted_v.dim() == 1
    n = sorted_v.shape[-1]
    m = v.shape[1]
    flat = sorted_v.reshape(-1)
    hi = torch.searchsorted(sorted_v, v + eps, side="left")  # first j with s_j >= v + eps
    lo = torch.searchsorted(sorted_v, v - eps, side="right")  # first j with s_j > v - eps
    # hi must be the first j with s_j >= v and not pred(j); lo the first j with s_j >= v or pred(j)
    for bound, cur in (("hi", hi), ("lo", lo)):
        pos = torch.stack([cur, cur - 1]).clamp_(0, n - 1)  # [2, b, m]
        val = flat.index_select(0, pos.view(-1)).view(pos.shape) if shared else torch.stack([sorted_v.gather(1, pos[0]), sorted_v.gather(1, pos[1])])
        up, down = _boundary_moves(bound, cur, n, val[0], val[1], v, eps)
        move = up | down
        if bool(move.any()):
            idx = move.view(-1).nonzero().squeeze(1)
            cur.view(-1)[idx] = _fix_bound(flat, n, shared, cur.view(-1)[idx], idx, v.reshape(-1)[idx], eps.reshape(-1)[idx], m, bound)
    return (hi - lo).clamp_(min=0)


def _boundary_moves(
    bound: str, cur: torch.Tensor, n: int, here: torch.Tensor, prev: torch.Tensor, v: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which boundaries must move up or down, from the values at ``cur`` and ``cur - 1``.

    ``hi`` must be the first j with ``s_j >= v`` and not ``|s_j - v| < eps``; ``lo`` the first
    j with ``s_j >= v`` or ``|s_j - v| < eps`` (both predicates are monotone in j)."""
    p_here, p_prev = (here - v).abs() < eps, (prev - v).abs() < eps
    if bound == "hi":
        up = (cur < n) & ((here < v) | p_here)
        down = (cur > 0) & (prev >= v) & ~p_prev & ~up
    else:
        up = (cur < n) & (here < v) & ~p_here
        down = (cur > 0) & ((prev >= v) | p_prev) & ~up
    return up, down


def _fix_bound(flat: torch.Tensor, n: int, shared: bool, cur: torch.Tensor, idx: torch.Tensor, v: torch.Tensor, eps: torch.Tensor, m: int, bound: str) -> torch.Tensor:
    """Move the boundaries ``cur`` of the queries ``idx`` (flat in [B, m]) until they hold (see
    ``strict_counts_sorted``), a run of equal values at a time."""
    row = torch.zeros_like(idx) if shared else (idx // m) * n
    todo = torch.arange(idx.numel(), device=idx.device)
    while todo.numel():
        c, r, x, e = cur[todo], row[todo], v[todo], eps[todo]
        here = flat[r + c.clamp(0, n - 1)]
        prev = flat[r + (c - 1).clamp(0, n - 1)]
        up, down = _boundary_moves(bound, c, n, here, prev, x, e)
        move = up | down
        if not bool(move.any()):
            break
        todo, up, here, prev, r = todo[move], up[move], here[move], prev[move], r[move]
        # jump over the whole run of values equal to the boundary value
        cur[todo] = torch.where(up, _bsearch(flat, r, n, here, right=True), _bsearch(flat, r, n, prev, right=False))
    return cur


def kth_1d_sorted(sorted_v: torch.Tensor, k: int | torch.Tensor, start: torch.Tensor | None = None, end: torch.Tensor | None = None) -> torch.Tensor:
    """Distance from each sorted value to its k-th nearest other value within its segment.

    sorted_v: [B, n] ascending within each segment ``[start_i, end_i)`` (default the whole
    row); k: int or [n] long (per point, 1 <= k_i < segment size). In one dimension the k
    nearest are among the k neighbours on each side in sorted order. -> [B, n].
    """
    B, n = sorted_v.shape
    kmax = int(k) if not isinstance(k, torch.Tensor) else int(k.max())
    device = sorted_v.device
    pos = torch.arange(n, device=device)
    start = torch.zeros(n, dtype=torch.long, device=device) if start is None else start
    end = torch.full((n,), n, dtype=torch.long, device=device) if end is None else end
    offs = torch.cat([torch.arange(-kmax, 0, device=device), torch.arange(1, kmax + 1, device=device)])
    cand = pos[:, None] + offs[None, :]  # [n, 2k]
    valid = (cand >= start[:, None]) & (cand < end[:, None])
    cand = cand.clamp(0, n - 1)
    out = torch.empty_like(sorted_v)
    rows = _tile_rows(n, 4 * kmax)
    for b0 in range(0, B, rows):
        sv = sorted_v[b0 : b0 + rows]
        d = (sv[:, cand] - sv[:, :, None]).abs()
        d = torch.where(valid[None], d, torch.full_like(d, math.inf))
        top = d.topk(kmax, dim=-1, largest=False).values  # [b, n, kmax] ascending
        if isinstance(k, torch.Tensor):
            out[b0 : b0 + rows] = top.gather(-1, (k - 1).view(1, n, 1).expand(top.shape[0], n, 1)).squeeze(-1)
        else:
            out[b0 : b0 + rows] = top[..., k - 1]
    return out


# ----------------------------------------------------------------------------- 2-D strips

STRIP_SCALE = 1.0  # strip height h = STRIP_SCALE * sqrt(k n) points
WINDOW_EXTRA = 1  # slots examined on each side of x in each strip: w = k + WINDOW_EXTRA
BAND = 1  # strips searched on each side of a point's own strip


def _kth_smallest_rows(d: torch.Tensor, k: int) -> torch.Tensor:
    """k-th smallest of each column of ``d [C, m]`` -> [m] (a running k-list: elementwise
    ops over contiguous rows, far cheaper than ``topk`` over many short rows)."""
    if k > d.shape[0]:
        return torch.full_like(d[0], math.inf)
    if k > 8:
        return d.kthvalue(k, dim=0).values
    best = [torch.full_like(d[0], math.inf) for _ in range(k)]
    lo = torch.empty_like(d[0])
    for c in range(d.shape[0]):
        v = d[c]
        for j in range(k - 1):
            torch.minimum(best[j], v, out=lo)
            v = torch.maximum(best[j], v)
            best[j], lo = lo, best[j]
        torch.minimum(best[k - 1], v, out=best[k - 1])
    return best[k - 1]


class _Strips:
    """The strip layout of a batch of 2-D point sets sharing ``y`` (see the module docstring).

    Flat arrays ``X``, ``Y`` hold rows of ``H = h + 2 (w + 1)`` slots: ``w + 1`` sentinels
    (``x = -inf``), the strip's ``h`` points sorted by ``x`` (``+inf`` past the last point),
    ``w + 1`` sentinels (``x = +inf``). Each set has ``S + 2 A`` rows: ``A`` empty strips (all
    ``+inf``) below and above its ``S`` real ones, so every window and every gap read in the
    search lands on a slot and sentinels are infinitely far: no masks, no clamps.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, k: int):
        B, n = x.shape
        device, dtype = x.device, x.dtype
        inf = math.inf
        self.B, self.n, self.k = B, n, k
        self.h = h = min(n, max(2 * k + 2, round(STRIP_SCALE * math.sqrt(k * n))))
        self.w = w = k + WINDOW_EXTRA
        self.A = A = BAND
        self.S = S = -(-n // h)
        self.M = M = S * h
        self.H = H = h + 2 * (w + 1)
        self.oy = oy = torch.sort(y, stable=True).indices
        ys = torch.cat([y[oy], torch.full((M - n,), inf, dtype=dtype, device=device)])
        self.ys = ys  # [M] y order, padded
        # ys with A h + 1 sentinels each side (so y-order index i is at i + A h + 1): the y
        # gaps to the strips beyond a band never index out
        pad = torch.full((A * h + 1,), inf, dtype=dtype, device=device)
        self.ys_ext = torch.cat([-pad, ys, pad])
        self.xy = torch.cat([x.index_select(1, oy), torch.full((B, M - n), inf, dtype=dtype, device=device)], 1)  # [B, M]
        xs3, perm = torch.sort(self.xy.view(B, S, h), dim=-1)
        self.yorder = perm + (torch.arange(S, device=device) * h)[:, None]  # [B, S, h] y-order index per slot
        real = torch.full((B, S + 2 * A, h), inf, dtype=dtype, device=device)
        real[:, A:-A] = xs3
        # insertion slot (first x >= the point's x) of every point in the strips o = -A..A (o != 0)
        self.offsets = [o for o in range(-A, A + 1) if o != 0]
        self.ins = {o: torch.searchsorted(real[:, A + o : A + o + S].contiguous(), xs3, side="left").view(-1) for o in self.offsets}
        X = torch.empty(B, S + 2 * A, H, dtype=dtype, device=device)
        X[..., : w + 1] = -inf
        X[..., w + 1 : w + 1 + h] = real
        X[..., w + 1 + h :] = inf
        Y = torch.zeros(B, S + 2 * A, H, dtype=dtype, device=device)
        Y[:, A:-A, w + 1 : w + 1 + h] = ys[self.yorder]
        self.X, self.Y = X.view(-1), Y.view(-1)
        self._x_order: tuple[torch.Tensor, torch.Tensor] | None = None

    def x_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every set in x order (computed once, when first needed): flat ``x`` and ``y`` [B M]."""
        if self._x_order is None:
            xsorted, xo = torch.sort(self.xy, dim=1)
            self._x_order = (xsorted.reshape(-1), self.ys[xo].reshape(-1))
        return self._x_order

    def slot(self, j: torch.Tensor) -> torch.Tensor:
        """Flat slot of the ``j``-th point slot ``(b, s, q)`` (``j`` in ``[0, B S h)``)."""
        bs, q = j // self.h, j % self.h
        return (bs + 2 * self.A * (bs // self.S) + self.A) * self.H + (self.w + 1) + q

    def ys_at(self, i: torch.Tensor) -> torch.Tensor:
        """``y`` at y-order indices ``i`` (``-inf`` below 0, ``+inf`` from ``n`` on, within a band)."""
        return self.ys_ext.index_select(0, (i + self.A * self.h + 1).view(-1)).view(i.shape)

    def round1(self, j0: int, j1: int, eps: torch.Tensor) -> torch.Tensor | None:
        """Candidate search for point slots ``j0 .. j1``: writes the bound into ``eps[j0:j1]``
        and returns the slots whose bound is not certified exact (None if there are none)."""
        w, h, H, k, A = self.w, self.h, self.H, self.k, self.A
        X, Y = self.X, self.Y
        j = torch.arange(j0, j1, device=X.device)
        p = self.slot(j)
        xq, yq = X.index_select(0, p), Y.index_select(0, p)
        start = p - j % h  # the own strip's first slot
        # first candidate in each other strip: w slots either side of the insertion slot
        first = torch.stack([start + o * H + self.ins[o][j0:j1] - w for o in self.offsets])  # [2A, m]
        runs = torch.cat([torch.stack([p - w, p + 1]), first, first + w])  # runs of w slots
        idx = (runs[:, None, :] + torch.arange(w, device=X.device)[None, :, None]).view(-1)
        shape = (runs.shape[0] * w, j1 - j0)
        d = torch.maximum((X.index_select(0, idx).view(shape) - xq).abs_(), (Y.index_select(0, idx).view(shape) - yq).abs_())
        ub = _kth_smallest_rows(d, k)
        # lower bounds on the distance to unexamined points: in each strip the x gap to its
        # first unexamined slot on either side, raised to the strip's own y distance for the
        # other strips of the band; beyond the band, the y gap to the next strips
        lo_slot = torch.cat([(p - w - 1)[None], first - 1])
        hi_slot = torch.cat([(p + w + 1)[None], first + 2 * w])
        gap = torch.minimum(xq - X.index_select(0, lo_slot.view(-1)).view(lo_slot.shape), X.index_select(0, hi_slot.view(-1)).view(hi_slot.shape) - xq)
        s = (j // h) % self.S
        # nearest y of strip s + o: its first point for o > 0, its last for o < 0 (o = +-(A+1): beyond the band)
        outer = [o for o in range(-A - 1, A + 2) if o != 0]
        near = torch.stack([(s + o) * h if o > 0 else (s + o + 1) * h - 1 for o in outer])
        dy = (self.ys_at(near) - yq).abs_()  # [2A + 2, m]
        bound = torch.minimum(gap[0], torch.maximum(gap[1:], dy[1:-1]).amin(0))
        bound = torch.minimum(bound, torch.minimum(dy[0], dy[-1]))
        eps[j0:j1] = ub
        miss = (ub > bound) & torch.isfinite(xq)
        return j[miss] if bool(miss.any()) else None


def strip_kth_2d(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Exact max-norm distance from each point to its k-th nearest other point, for a batch of
    2-D point sets sharing their ``y`` coordinates.

    x: [B, n]; y: [n] (point i of set b is ``(x[b, i], y[i])``); 1 <= k < n -> eps [B, n].
    See the module docstring for the algorithm; the work is O(B n (log n + k^2)). The
    candidate search runs in chunks, on as many threads as torch uses (each chunk writes
    its own slice, so the result does not depend on the thread count).
    """
    B, n = x.shape
    st = _Strips(x, y, k)
    total = B * st.M
    eps = torch.empty(total, dtype=x.dtype, device=x.device)
    bad = [t for t in _map_chunks(lambda a, b: st.round1(a, b, eps), total, _chunk(x.device), x.device) if t is not None]
    if bad:
        j = torch.cat(bad)
        ub = eps[j]
        fixed = _map_chunks(lambda a, b: _square_search(st, j[a:b], ub[a:b]), j.numel(), 4 * _chunk(x.device), x.device)
        eps[j] = torch.cat(fixed)
    out = torch.empty(B, st.M, dtype=x.dtype, device=x.device)
    order = torch.cat([st.oy, torch.arange(n, st.M, device=x.device)])[st.yorder.view(B, st.M)]  # original index per slot
    out.scatter_(1, order, eps.view(B, st.M))
    return out[:, :n]


def _segments(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For runs of the given lengths laid end to end: the run of every element and its
    position in the run -> ([sum], [sum])."""
    run = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    start = torch.cumsum(lengths, 0) - lengths
    return run, torch.arange(run.numel(), device=lengths.device) - start[run]


def _map_chunks(fn, total: int, chunk: int, device: torch.device) -> list:
    """``[fn(a, b) for each chunk [a, b) of range(total)]``, on a pool of as many threads as
    torch uses when on the CPU (torch ops release the GIL; every chunk writes only its own
    outputs, so results do not depend on the thread count)."""
    bounds = [(a, min(total, a + chunk)) for a in range(0, total, chunk)]
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    if threads < 2 or len(bounds) < 2:
        return [fn(a, b) for a, b in bounds]
    with ThreadPoolExecutor(min(threads, len(bounds))) as pool:
        return list(pool.map(lambda ab: fn(*ab), bounds))


def _square_search(st: _Strips, j: torch.Tensor, ub: torch.Tensor) -> torch.Tensor:
    """Exact k-th neighbour distances of the point slots ``j`` whose bound ``ub`` was not
    certified. Every point closer than ``ub`` lies in the square of half-side ``ub`` around
    the query: its strips are a range of the y order, and in each of them its slots a range
    of the x order, so the square is enumerated exactly (a small margin keeps rounding on
    the safe side) and the k-th smallest distance over it is the answer. Squares spanning
    more than ``8`` strips (far outliers, degenerate data) are answered by brute force over
    the shorter of the query's whole x and y ranges instead."""
    h, H, w, S, M, k = st.h, st.H, st.w, st.S, st.M, st.k
    X, Y = st.X, st.Y
    p = st.slot(j)
    xq, yq = X.index_select(0, p), Y.index_select(0, p)
    b = j // M
    ub = torch.where(torch.isfinite(ub), ub, torch.full_like(ub, 1e300))
    margin = 1e-9 * ub + 1e-12 * (ub + torch.maximum(xq.abs(), yq.abs()))
    ylo = torch.searchsorted(st.ys, yq - ub - margin, side="left")
    yhi = torch.searchsorted(st.ys, yq + ub + margin, side="right")
    s_lo, s_hi = ylo // h, (yhi - 1).clamp(min=0) // h
    nstrips = s_hi - s_lo + 1
    out = torch.empty_like(xq)
    square = (nstrips <= 8).nonzero().squeeze(1)
    if square.numel():
        # (query, strip) pairs, then the x range of the square in each strip
        run, t = _segments(nstrips.index_select(0, square))
        q = square.index_select(0, run)
        row = (b.index_select(0, q) * (S + 2 * st.A) + s_lo.index_select(0, q) + t + st.A) * H + (w + 1)
        xr, ur, mr = xq.index_select(0, q), ub.index_select(0, q), margin.index_select(0, q)
        a = _bsearch(X, row, h, xr - ur - mr, right=False)
        e = _bsearch(X, row, h, xr + ur + mr, right=True)
        size = torch.zeros(square.numel(), dtype=torch.long, device=X.device).index_add_(0, run, e - a)
        run2, t2 = _segments(e - a)
        slots = (row + a).index_select(0, run2) + t2  # every slot of every square, grouped by query
        first = torch.cumsum(size, 0) - size
        out[square] = _kth_in_runs(X, Y, slots, first, size, xq.index_select(0, square), yq.index_select(0, square), k + 1)
    rest = (nstrips > 8).nonzero().squeeze(1)
    if rest.numel():
        out[rest] = _brute_lines(st, j[rest], xq[rest], yq[rest], ub[rest], margin[rest], ylo[rest], yhi[rest])
    return out


def _kth_in_runs(
    X: torch.Tensor, Y: torch.Tensor, slots: torch.Tensor | None, first: torch.Tensor, size: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor, k: int
) -> torch.Tensor:
    """k-th smallest max-norm distance from query i to the points ``(X, Y)[slots[first_i : first_i + size_i]]``
    (``slots=None``: the points ``first_i .. first_i + size_i - 1`` themselves), inf if there
    are fewer -> [m]; queries are grouped by power-of-two run length."""
    out = torch.empty_like(xq)
    width = torch.pow(2, torch.ceil(torch.log2(size.clamp(min=1).to(torch.float64)))).long().clamp(min=k)
    for W in torch.unique(width).tolist():
        sel = (width == W).nonzero().squeeze(1)
        t = torch.arange(W, device=X.device)[:, None]
        for r0 in range(0, sel.numel(), max(1, TILE_ELEMENTS // (4 * W))):
            s = sel[r0 : r0 + max(1, TILE_ELEMENTS // (4 * W))]
            pos = first[s] + t  # [W, m]
            valid = t < size[s]
            if slots is None:
                sl = pos.clamp(max=X.numel() - 1)
            else:
                sl = slots[pos.clamp(max=max(0, slots.numel() - 1))] if slots.numel() else torch.zeros_like(pos)
            sl = sl.view(-1)
            d = torch.maximum(
                (X.index_select(0, sl).view(pos.shape) - xq.index_select(0, s)).abs_(),
                (Y.index_select(0, sl).view(pos.shape) - yq.index_select(0, s)).abs_(),
            )
            d.masked_fill_(~valid, math.inf)
            # few rows: a running k-list over them; many: kthvalue along each query's row
            out[s] = _kth_smallest_rows(d, k) if W <= 32 else d.T.kthvalue(k, dim=1).values
    return out


def _brute_lines(
    st: _Strips, j: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor, ub: torch.Tensor, margin: torch.Tensor, ylo: torch.Tensor, yhi: torch.Tensor
) -> torch.Tensor:
    """Brute force over the shorter of each query's x range and y range of half-width ``ub``
    (the (k+1)-th smallest distance, the query itself being among them at 0)."""
    M, k = st.M, st.k
    b = j // M
    xflat, yx = st.x_order()
    xlo = _bsearch(xflat, b * M, M, xq - ub - margin, right=False)
    xhi = _bsearch(xflat, b * M, M, xq + ub + margin, right=True)
    use_y = (yhi - ylo) <= (xhi - xlo)
    out = torch.empty_like(xq)
    s = use_y.nonzero().squeeze(1)
    if s.numel():  # the y order of every set: x from st.xy, y shared
        out[s] = _kth_in_runs(st.xy.reshape(-1), st.ys.repeat(st.B), None, b[s] * M + ylo[s], yhi[s] - ylo[s], xq[s], yq[s], k + 1)
    s = (~use_y).nonzero().squeeze(1)
    if s.numel():  # the x order of every set
        out[s] = _kth_in_runs(xflat, yx, None, b[s] * M + xlo[s], xhi[s] - xlo[s], xq[s], yq[s], k + 1)
    return out


# ----------------------------------------------------------------------------- engines

_NUMBA: ModuleType | bool | None = None


def numba_kernels() -> ModuleType | None:
    """The compiled CPU kernels (``arr_coc.info._numba_knn``), or None where numba is not
    installed or the environment sets ``ARR_COC_NUMBA=0`` (read on every call, so the torch
    engines can be selected at any time). Imported on first use."""
    global _NUMBA
    if os.environ.get("ARR_COC_NUMBA", "1") == "0":
        return None
    if _NUMBA is None:
        try:
            from arr_coc.info import _numba_knn

            _NUMBA = _numba_knn
        except ImportError:
            _NUMBA = False
    return _NUMBA or None


def ksg_counts_2d(x: torch.Tensor, y: torch.Tensor, k: int, engine: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KSG strict marginal counts of scalar point sets ``(x[b], y)``: ``x [B, n]``, ``y [n]``.

    Returns ``n_x, n_y [B, n]`` long: for each point, the other points strictly closer than
    ``eps_i`` (its max-norm distance to its k-th nearest other point) in x and in y, in no
    particular point order (the estimators only average them); and ``tied [B]`` bool, whether
    ``x[b]`` holds repeated values (found on the way, for callers that de-tie). engine: ``"numba"`` (CPU
    tensors; compiled grid search), ``"torch"`` (``strip_kth_2d`` and binary searches, any
    device) or ``"auto"`` (numba for CPU tensors where it is installed). Both are exact.
    """
    if engine not in ("auto", "numba", "torch"):
        raise ValueError(f"engine: expected 'auto', 'numba' or 'torch', got {engine!r}")
    kernels = numba_kernels() if x.device.type == "cpu" and engine != "torch" else None
    if engine == "numba" and kernels is None:
        raise ValueError("engine: 'numba' needs CPU tensors and numba installed")
    if kernels is not None:
        # as many threads as torch uses (torch.set_num_threads(1) keeps the kernels serial)
        xn, yn = x.detach().to(torch.float64).numpy(), y.detach().to(torch.float64).numpy()
        nx, ny, _, tied = kernels.ksg_counts(xn, yn, k, threads=torch.get_num_threads())
        return torch.from_numpy(nx), torch.from_numpy(ny), torch.from_numpy(tied)
    eps = strip_kth_2d(x, y, k)
    xs, ox = torch.sort(x, dim=1)
    eps_x = eps.gather(1, ox)
    nx = strict_counts_sorted(xs, xs, eps_x) - (eps_x > 0).long()
    oy = torch.sort(y, stable=True).indices
    ys = y[oy]
    eps_y = eps.index_select(1, oy)
    ny = strict_counts_sorted(ys, ys.expand_as(eps_y), eps_y) - (eps_y > 0).long()
    return nx, ny, (xs[:, 1:] == xs[:, :-1]).any(1)


# ----------------------------------------------------------------------------- k-d trees


def use_tree(variables: list[torch.Tensor]) -> bool:
    """Whether ``tree_radius_counts`` serves these ``[n, d_v]`` variables: CPU tensors, numba
    installed, at most ``TREE_MAX_DIM`` coordinates in all and at least ``TREE_MIN_N`` points."""
    dims = sum(v.shape[1] for v in variables)
    return (
        variables[0].device.type == "cpu" and dims <= TREE_MAX_DIM and variables[0].shape[0] >= TREE_MIN_N and numba_kernels() is not None
    )


def tree_radius_counts(
    variables: list[torch.Tensor], k: int, count_sets: list[tuple[int, ...]]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``brute_radius_counts`` by k-d trees (CPU tensors, numba installed): the same ``eps [n]``
    and strict counts, bit for bit, for float64 variables. Runs on as many threads as torch uses."""
    kernels = numba_kernels()
    if kernels is None or variables[0].device.type != "cpu":
        raise ValueError("variables: the k-d tree engine needs CPU tensors and numba installed")
    widths = [v.shape[1] for v in variables]
    starts = [sum(widths[:i]) for i in range(len(widths))]
    V = torch.cat([v.detach().to(torch.float64) for v in variables], dim=1).contiguous().numpy()
    cols = [[starts[j] + c for j in cs for c in range(widths[j])] for cs in count_sets]
    eps, counts = kernels.tree_radius_counts(V, k, cols, threads=torch.get_num_threads())
    dt = variables[0].dtype
    return torch.from_numpy(eps).to(dt), [torch.from_numpy(c) for c in counts]


def tree_knn_indices(v: torch.Tensor, k: int) -> torch.Tensor:
    """``[n, k]`` long: the k nearest rows (max-norm, itself included, nearest first, ties by
    the smaller index) of every row of ``v [n, d]`` (CPU tensors, numba installed)."""
    kernels = numba_kernels()
    if kernels is None or v.device.type != "cpu":
        raise ValueError("v: the k-d tree engine needs a CPU tensor and numba installed")
    return torch.from_numpy(kernels.tree_knn_indices(v.detach().to(torch.float64).contiguous().numpy(), k, threads=torch.get_num_threads()))
