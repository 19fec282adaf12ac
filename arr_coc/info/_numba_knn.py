"""Compiled CPU kernels (numba) for the k-NN estimators (a rank-space grid for scalar pairs,
k-d trees for low-dimensional joint spaces) and 1-D distance covariance.

These are the CPU fast paths behind ``ksg_mi`` / ``mi_features`` (scalar pairs) and
``distance_correlation`` (scalar pairs). They compute exactly what the torch engines in
``arr_coc.info.knn`` and ``arr_coc.info.dependence`` compute (the tests compare them bit for
bit with brute force); they only avoid the temporaries and the per-op overhead that a
vectorised search pays. Reach it through ``arr_coc.info.knn.numba_kernels()``, which imports
it (and numba) on first use; the kernels are compiled on their first call and cached on disk.

KSG counts, per point set (one column of ``x`` against the shared ``y``):

1. Ranks of x and y; a G x G grid in rank space (G ~ sqrt(n / 2), so about 2 points a
   cell, whatever the marginal densities); the points in cell order (counting sort).
2. For each point, rings of cells around its own: after ring r, every unexamined point is
   outside the (2r + 1)^2 block, hence at least as far as the nearest x or y value beyond
   the block's rank range (read off the sorted marginals). Once the k-th smallest distance
   seen is no larger, it is exact.
3. Strict counts ``#{j != i : |v_j - v_i| < eps_i}`` on each sorted marginal: each end of
   the run around the point's own rank is found by galloping from a bucket-table guess and
   bisecting, always with the exact predicate (monotone on either side of the point).

The kernels release the GIL; ``ksg_counts`` runs them on Python threads (whole point sets
per thread, or the queries of one large set split across threads).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

INF = math.inf
# integer division without Python's zero-divisor checks; no fastmath (inf is used as a value).
# The kernels release the GIL and are run on Python threads: numba's own parallel layers
# would share (and reset) the OpenMP thread count that torch uses.
_jit = njit(cache=True, error_model="numpy", nogil=True)
_inline = njit(cache=True, error_model="numpy", nogil=True, inline="always")  # small hot helpers


@_jit
def _inverse(order: np.ndarray) -> np.ndarray:
    rank = np.empty(order.shape[0], np.int64)
    for i in range(order.shape[0]):
        rank[order[i]] = i
    return rank


@_jit
def _buckets(sv: np.ndarray):
    """A lookup table for searches in sorted ``sv``: ``n`` equal-width buckets over its range;
    ``table[b]`` is the first index whose value reaches bucket b. Returns (table, lo, scale)."""
    n = sv.shape[0]
    lo, span = sv[0], sv[n - 1] - sv[0]
    scale = n / span if span > 0 else 0.0
    table = np.empty(n + 1, np.int64)
    j = 0
    for b in range(n + 1):
        while j < n and (sv[j] - lo) * scale < b:
            j += 1
        table[b] = j
    return table, lo, scale


@_inline
def _guess(table, lo, scale, t) -> int:
    """An index near the first with value >= t (the galloping searches below make it exact)."""
    n = table.shape[0] - 1
    f = (t - lo) * scale
    if not f > 0:
        return table[0]
    if f >= n:
        return table[n]
    return table[int(f)]


@_inline
def _bisect(sv, v, e, a, b, holds_at_a) -> int:
    """Where the predicate ``|sv[j] - v| < e`` flips between ``a`` and ``b``: it holds at a and
    fails at b (``holds_at_a``), or the reverse; returns the first index past the flip."""
    while b - a > 1:
        m = (a + b) // 2
        if (abs(sv[m] - v) < e) == holds_at_a:
            a = m
        else:
            b = m
    return b


@_inline
def _strict_count(sv, table, lo, scale, r, v, e) -> int:
    """``#{j != r : |sv[j] - v| < e}`` for sorted ``sv`` with ``sv[r] == v``.

    The predicate holds on a run around r (it is monotone on either side); each end of the
    run is found by galloping from the bucket table's guess, then bisecting, always with
    the exact predicate, so rounding in the guess cannot change the count."""
    n = sv.shape[0]
    if not e > 0.0:
        return 0
    # up: first j in [r + 1, n] where the predicate fails (n: never), from a guess g
    g = min(max(_guess(table, lo, scale, v + e), r + 1), n)
    if g < n and abs(sv[g] - v) < e:  # holds at g: the end is further up
        a, step = g, 1  # a holds
        b = g + 1
        while b < n and abs(sv[b] - v) < e:
            a = b
            step *= 2
            b = g + step
        b = min(b, n)
    else:  # fails at g (or g == n): the end is at or below g
        b, step = g, 1  # b fails (or is n)
        a = g - 1
        while a > r and not abs(sv[a] - v) < e:
            b = a
            step *= 2
            a = g - step
        a = max(a, r)  # r itself holds (e > 0)
    up = _bisect(sv, v, e, a, b, True)
    # down: first j in [0, r] where the predicate holds, from a guess g
    g = min(max(_guess(table, lo, scale, v - e), 0), r)
    if g > 0 and abs(sv[g - 1] - v) < e:  # holds below g: the start is further down
        b, step = g - 1, 1  # b holds
        a = b - 1
        while a >= 0 and abs(sv[a] - v) < e:
            b = a
            step *= 2
            a = g - 1 - step
        a = max(a, -1)
    else:  # fails at g - 1 (or g == 0): the start is at or above g
        a, step = g - 1, 1  # a fails (or is -1)
        b = g
        while b < r and not abs(sv[b] - v) < e:
            a = b
            step *= 2
            b = g - 1 + step
        b = min(b, r)  # r holds
    down = _bisect(sv, v, e, a, b, False)
    return up - down - 1


@_jit
def _layout(x: np.ndarray, ry: np.ndarray, y: np.ndarray, G: int):
    """Sorted x, x ranks, its bucket table, and the points in cell order: cell offsets
    [G*G + 1], their indices, x and y."""
    n = x.shape[0]
    ox = np.argsort(x, kind="mergesort")
    xs = x[ox]
    rx = _inverse(ox)
    xt, xlo, xscale = _buckets(xs)
    offset = np.zeros(G * G + 1, np.int64)
    cell = np.empty(n, np.int64)
    for i in range(n):
        c = (rx[i] * G // n) * G + ry[i] * G // n
        cell[i] = c
        offset[c + 1] += 1
    for c in range(G * G):
        offset[c + 1] += offset[c]
    fill = offset[:-1].copy()
    members = np.empty(n, np.int64)
    px = np.empty(n, np.float64)
    py = np.empty(n, np.float64)
    for i in range(n):
        m = fill[cell[i]]
        members[m] = i
        px[m] = x[i]
        py[m] = y[i]
        fill[cell[i]] += 1
    return xs, rx, (xt, xlo, xscale), offset, members, px, py


@_inline
def _scan(lo, hi, i, xi, yi, members, px, py, kb):
    """Offer the points ``lo .. hi - 1`` (cell order) other than ``i`` to the k-best list."""
    k = kb.shape[0]
    for m in range(lo, hi):
        d = max(abs(px[m] - xi), abs(py[m] - yi))
        if d < kb[k - 1] and members[m] != i:
            p = k - 1
            while p > 0 and kb[p - 1] > d:
                kb[p] = kb[p - 1]
                p -= 1
            kb[p] = d


@_inline
def _kth(i, xi, yi, cx, cy, xs, ys, G, first, offset, members, px, py, kb) -> float:
    """Max-norm distance from point i at ``(xi, yi)``, in cell ``(cx, cy)``, to its k-th
    nearest other point (k = len(kb)); ``first[c]`` is the first rank of column (row) c."""
    k = kb.shape[0]
    for t in range(k):
        kb[t] = INF
    r = 0
    while True:
        x0, x1 = max(0, cx - r), min(G - 1, cx + r)
        y0, y1 = max(0, cy - r), min(G - 1, cy + r)
        for gx in range(x0, x1 + 1):
            base = gx * G
            if gx == cx - r or gx == cx + r:  # a whole column of the ring: one contiguous run
                _scan(offset[base + y0], offset[base + y1 + 1], i, xi, yi, members, px, py, kb)
            else:
                if cy - r >= 0:
                    _scan(offset[base + cy - r], offset[base + cy - r + 1], i, xi, yi, members, px, py, kb)
                if cy + r < G:
                    _scan(offset[base + cy + r], offset[base + cy + r + 1], i, xi, yi, members, px, py, kb)
        # distance to the nearest point outside the block: the values just beyond its rank range
        bound = INF
        if cx - r > 0:
            bound = min(bound, xi - xs[first[cx - r] - 1])
        if cx + r + 1 < G:
            bound = min(bound, xs[first[cx + r + 1]] - xi)
        if cy - r > 0:
            bound = min(bound, yi - ys[first[cy - r] - 1])
        if cy + r + 1 < G:
            bound = min(bound, ys[first[cy + r + 1]] - yi)
        if kb[k - 1] <= bound:
            return kb[k - 1]
        r += 1


@_jit
def _query(m0, m1, n, k, G, xs, ys, rx, ry, xb, yb, offset, members, px, py, nx, ny, eps):
    """eps and counts for the points at cell-order positions ``m0 .. m1 - 1`` (consecutive
    queries share their neighbourhoods: the scans stay in cache)."""
    kb = np.empty(k, np.float64)
    first = np.empty(G + 1, np.int64)  # first rank of each column (row): ceil(c n / G)
    for c in range(G + 1):
        first[c] = (c * n + G - 1) // G
    c = np.searchsorted(offset, m0, side="right") - 1  # the cell holding position m0
    for m in range(m0, m1):
        while offset[c + 1] <= m:
            c += 1
        i = members[m]
        e = _kth(i, px[m], py[m], c // G, c % G, xs, ys, G, first, offset, members, px, py, kb)
        eps[i] = e
        nx[i] = _strict_count(xs, xb[0], xb[1], xb[2], rx[i], px[m], e)
        ny[i] = _strict_count(ys, yb[0], yb[1], yb[2], ry[i], py[m], e)


def _grid_side(n: int) -> int:
    return max(1, min(n, int(math.sqrt(n / 2.0))))


@_jit
def _has_ties(xs) -> bool:
    """Whether sorted ``xs`` holds repeated values."""
    for j in range(xs.shape[0] - 1):
        if xs[j] == xs[j + 1]:
            return True
    return False


@_jit
def _counts_one(x, y, ys, ry, yb, k, G, nx, ny, eps) -> bool:
    """KSG counts of one point set, serially (the batched kernel runs many of these at once);
    returns whether x holds repeated values."""
    xs, rx, xb, offset, members, px, py = _layout(x, ry, y, G)
    _query(0, x.shape[0], x.shape[0], k, G, xs, ys, rx, ry, xb, yb, offset, members, px, py, nx, ny, eps)
    return _has_ties(xs)


@_jit
def _counts_rows(X, y, ys, ry, yb, k, G, NX, NY, EPS, TIED, b0, b1):
    """Point sets ``b0 .. b1 - 1`` of the batch, one after another."""
    for b in range(b0, b1):
        TIED[b] = _counts_one(X[b], y, ys, ry, yb, k, G, NX[b], NY[b], EPS[b])


def ksg_counts(X: np.ndarray, y: np.ndarray, k: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """KSG (estimator 1) quantities of point sets ``(X[b], y)``: X [B, n] float64, y [n].

    Returns ``n_x, n_y`` [B, n] int64 (other points strictly closer than ``eps_i`` in each
    marginal), ``eps`` [B, n] (max-norm distance to the k-th nearest other point) and
    ``tied`` [B] bool (whether X[b] holds repeated values). ``threads``: how many Python
    threads run the (GIL-free) kernels; every output element is written by one of them.
    """
    B, n = X.shape
    X = np.ascontiguousarray(X, dtype=np.float64)
    y = np.ascontiguousarray(y, dtype=np.float64)
    oy = np.argsort(y, kind="mergesort")
    ys = y[oy]
    ry = _inverse(oy)
    yb = _buckets(ys)
    G = _grid_side(n)
    NX = np.empty((B, n), np.int64)
    NY = np.empty((B, n), np.int64)
    EPS = np.empty((B, n), np.float64)
    TIED = np.zeros(B, np.bool_)
    if threads <= 1 or (B == 1 and n < 20_000):
        _counts_rows(X, y, ys, ry, yb, k, G, NX, NY, EPS, TIED, 0, B)
    elif B >= threads:  # whole point sets per thread
        bounds = [(t * B // threads, (t + 1) * B // threads) for t in range(threads)]
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda ab: _counts_rows(X, y, ys, ry, yb, k, G, NX, NY, EPS, TIED, *ab), bounds))
    else:  # few large sets: one layout each, its queries split across threads
        for b in range(B):
            xs, rx, xb, offset, members, px, py = _layout(X[b], ry, y, G)
            bounds = [(t * n // (4 * threads), (t + 1) * n // (4 * threads)) for t in range(4 * threads)]
            args = (n, k, G, xs, ys, rx, ry, xb, yb, offset, members, px, py, NX[b], NY[b], EPS[b])
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda ab: _query(ab[0], ab[1], *args), bounds))
            TIED[b] = _has_ties(xs)
    return NX, NY, EPS, TIED


# ----------------------------------------------------------------------------- distance covariance


@_jit
def _row_sums(v: np.ndarray) -> np.ndarray:
    """``sum_j |v_i - v_j|`` for every i, from prefix sums over the sorted sample."""
    n = v.shape[0]
    order = np.argsort(v, kind="mergesort")
    total = 0.0
    for i in range(n):
        total += v[i]
    out = np.empty(n, np.float64)
    before = 0.0
    for r in range(n):
        s = v[order[r]]
        out[order[r]] = s * r - before + (total - before - s) - s * (n - 1 - r)
        before += s
    return out


@_jit
def dcov_terms_1d(x: np.ndarray, y: np.ndarray):
    """The V-statistics ``dCov^2(x, y), dCov^2(x, x), dCov^2(y, y)`` of scalar samples in
    O(n log n) (Huo & Szekely 2016): row sums from sorted prefix sums, and
    ``sum_{i<j} |x_i - x_j| |y_i - y_j|`` from a Fenwick tree over y ranks, visiting the
    points in x order (the pairs with ``y_i <= y_j`` are a prefix query)."""
    n = x.shape[0]
    ox = np.argsort(x, kind="mergesort")
    oy = np.argsort(y, kind="mergesort")
    ry = np.empty(n, np.int64)
    for r in range(n):
        ry[oy[r]] = r
    tree = np.zeros((n + 1, 4), np.float64)  # Fenwick sums of 1, x, y, xy over inserted points
    alls = np.zeros(4, np.float64)
    cross = 0.0
    q = np.empty(4, np.float64)
    for t in range(n):
        j = ox[t]
        xj, yj = x[j], y[j]
        # sums over the earlier points with y_i <= y_j (ties in y contribute 0 either way)
        q[:] = 0.0
        p = ry[j] + 1
        while p > 0:
            for c in range(4):
                q[c] += tree[p, c]
            p -= p & (-p)
        below = xj * yj * q[0] - xj * q[2] - yj * q[1] + q[3]
        every = xj * yj * alls[0] - xj * alls[2] - yj * alls[1] + alls[3]
        cross += 2.0 * below - every
        w0, w1, w2, w3 = 1.0, xj, yj, xj * yj
        p = ry[j] + 1
        while p <= n:
            tree[p, 0] += w0
            tree[p, 1] += w1
            tree[p, 2] += w2
            tree[p, 3] += w3
            p += p & (-p)
        alls[0] += w0
        alls[1] += w1
        alls[2] += w2
        alls[3] += w3
    a, b = _row_sums(x), _row_sums(y)
    sx = sxx = sy = syy = 0.0
    for i in range(n):
        sx += x[i]
        sxx += x[i] * x[i]
        sy += y[i]
        syy += y[i] * y[i]
    aa = 2.0 * n * sxx - 2.0 * sx * sx
    bb = 2.0 * n * syy - 2.0 * sy * sy
    nf = float(n)
    sa = sb = sab = saa = sbb = 0.0
    for i in range(n):
        sa += a[i]
        sb += b[i]
        sab += a[i] * b[i]
        saa += a[i] * a[i]
        sbb += b[i] * b[i]
    v_xy = 2.0 * cross / nf**2 - 2.0 * sab / nf**3 + sa * sb / nf**4
    v_xx = aa / nf**2 - 2.0 * saa / nf**3 + sa * sa / nf**4
    v_yy = bb / nf**2 - 2.0 * sbb / nf**3 + sb * sb / nf**4
    return v_xy, v_xx, v_yy


# ----------------------------------------------------------------------------- k-d trees (any low dimension)
#
# The multivariate KSG / Frenzel-Pompe quantities: for each point, the max-norm distance
# ``eps_i`` to its k-th nearest other point in the joint space, and the strict counts
# ``#{j != i : max_{c in S} |v_jc - v_ic| < eps_i}`` in subspaces S. A k-d tree (median
# splits along the widest coordinate, leaves of at most LEAF points, each node's exact
# bounding box) answers both exactly: a node is skipped only when the rounded coordinate gap
# to its box already reaches the bound (rounding is monotone, so no point inside can be
# closer), and counted whole only when the rounded farthest corner is strictly inside the
# radius. Every distance that decides anything is ``max_c |v_jc - v_ic|`` computed as the
# brute-force engine computes it, so eps and the counts are the brute-force ones bit for bit.

LEAF = 12


@_jit
def _select(order, P, dim, s, e, m):
    """Reorder ``order[s:e]`` so that ``order[m]`` holds the row whose ``P[., dim]`` has rank
    ``m - s`` there, smaller-or-equal ones before it and larger-or-equal ones after
    (quickselect with a median-of-three pivot; deterministic)."""
    lo, hi = s, e - 1
    while hi > lo:
        a, b, c = P[order[lo], dim], P[order[(lo + hi) // 2], dim], P[order[hi], dim]
        pivot = max(min(a, b), min(max(a, b), c))
        i, j = lo, hi
        while i <= j:
            while P[order[i], dim] < pivot:
                i += 1
            while P[order[j], dim] > pivot:
                j -= 1
            if i <= j:
                order[i], order[j] = order[j], order[i]
                i += 1
                j -= 1
        if m <= j:
            hi = j
        elif m >= i:
            lo = i
        else:
            return


@_jit
def _tree_layout(n: int, leaf: int):
    """The shape of the tree over ``n`` points, which depends on n alone: heap-numbered nodes
    (children of ``i``: ``2i + 1``, ``2i + 2``), node i covering tree positions
    ``start[i] .. end[i] - 1``, split at the middle until at most ``leaf`` points remain.
    Returns start, end, left (first child, -1 for a leaf or an unused slot) and the number of levels."""
    depth, m = 0, n
    while m > leaf:
        m = (m + 1) // 2
        depth += 1
    M = (1 << (depth + 1)) - 1
    start = np.zeros(M, np.int64)
    end = np.zeros(M, np.int64)
    left = np.full(M, -1, np.int64)
    end[0] = n
    for i in range(M):
        s, e = start[i], end[i]
        if e - s > leaf:
            mid = (s + e) // 2
            c = 2 * i + 1
            left[i] = c
            start[c], end[c] = s, mid
            start[c + 1], end[c + 1] = mid, e
    return start, end, left, depth + 1


@_jit
def _build_nodes(P, order, lo, hi, start, end, left, a, b):
    """Nodes ``a .. b - 1`` (one level): their exact bounding boxes, and for the inner ones the
    split along the widest coordinate (the lower half of the positions gets the smaller values)."""
    D = P.shape[1]
    for nd in range(a, b):
        s, e = start[nd], end[nd]
        if e <= s:
            continue
        for c in range(D):
            x0 = INF
            x1 = -INF
            for t in range(s, e):
                v = P[order[t], c]
                if v < x0:
                    x0 = v
                if v > x1:
                    x1 = v
            lo[nd, c], hi[nd, c] = x0, x1
        if left[nd] >= 0:
            dim, width = 0, -1.0
            for c in range(D):
                w = hi[nd, c] - lo[nd, c]
                if w > width:
                    dim, width = c, w
            if width > 0:
                _select(order, P, dim, s, e, (s + e) // 2)


@_jit
def _build_levels(P, order, lo, hi, start, end, left, l0, l1):
    """All nodes of levels ``l0 .. l1 - 1``, one after another."""
    M = start.shape[0]
    for level in range(l0, l1):
        _build_nodes(P, order, lo, hi, start, end, left, (1 << level) - 1, min(M, (1 << (level + 1)) - 1))


@_jit
def _build_subtrees(P, order, lo, hi, start, end, left, r0, r1, levels):
    """The subtrees rooted at nodes ``r0 .. r1 - 1`` (one level), ``levels`` levels deep, each
    top-down (a subtree's nodes at relative depth j are ``(r + 1) 2^j - 1 ...``, 2^j of them)."""
    M = start.shape[0]
    for r in range(r0, r1):
        for j in range(levels):
            a = ((r + 1) << j) - 1
            if a >= M:
                break
            _build_nodes(P, order, lo, hi, start, end, left, a, min(M, a + (1 << j)))


@_jit
def _gather_rows(P, order, Pt, a, b):
    for t in range(a, b):
        for c in range(P.shape[1]):
            Pt[t, c] = P[order[t], c]


def tree_build(P: np.ndarray, leaf: int, pool: ThreadPoolExecutor | None = None):
    """A k-d tree over the rows of ``P [n, D]``. Returns ``order`` (tree position -> row),
    ``Pt = P[order]``, and per node: box ``lo``, ``hi`` [M, D], point range ``start``, ``end``
    (tree positions) and first child ``left`` (-1 for a leaf; the right child is left + 1).
    The top levels are built serially until there are about 2 nodes per thread of ``pool``,
    then each of those subtrees by one task (a node is always built by one thread: the
    result does not depend on the thread count)."""
    P = np.ascontiguousarray(P, dtype=np.float64)
    n, D = P.shape
    start, end, left, levels = _tree_layout(n, leaf)
    M = start.shape[0]
    order = np.arange(n, dtype=np.int64)
    lo = np.zeros((M, D), np.float64)
    hi = np.zeros((M, D), np.float64)
    threads = pool._max_workers if pool is not None else 1
    top = levels if threads <= 1 else min(levels, (2 * threads - 1).bit_length())
    _build_levels(P, order, lo, hi, start, end, left, 0, top)
    if top < levels:
        a, b = (1 << top) - 1, min(M, (1 << (top + 1)) - 1)
        _chunks(b - a, pool, lambda u, v: _build_subtrees(P, order, lo, hi, start, end, left, a + u, a + v, levels - top), grain=1)
    Pt = np.empty((n, D), np.float64)
    _chunks(n, pool, lambda u, v: _gather_rows(P, order, Pt, u, v), grain=8192)
    return order, Pt, lo, hi, start, end, left


@_inline
def _box_lower(lo, hi, nd, q) -> float:
    """Rounded max-norm distance from ``q`` to node ``nd``'s box (a lower bound on the rounded
    distance to every point inside: rounding is monotone)."""
    b = 0.0
    for c in range(q.shape[0]):
        if q[c] < lo[nd, c]:
            t = lo[nd, c] - q[c]
        elif q[c] > hi[nd, c]:
            t = q[c] - hi[nd, c]
        else:
            t = 0.0
        if t > b:
            b = t
    return b


@_inline
def _box_upper(lo, hi, nd, q) -> float:
    """Rounded max-norm distance from ``q`` to the farthest corner of node ``nd``'s box (an
    upper bound on the rounded distance to every point inside)."""
    b = 0.0
    for c in range(q.shape[0]):
        t = max(q[c] - lo[nd, c], hi[nd, c] - q[c])
        if t > b:
            b = t
    return b


@_jit
def _tree_kth(m0, m1, k, order, Pt, lo, hi, start, end, left, eps):
    """``eps[order[m]]`` = max-norm distance from the point at tree position m to its k-th
    nearest other point, for tree positions ``m0 .. m1 - 1``."""
    D = Pt.shape[1]
    kb = np.empty(k, np.float64)
    stack = np.empty(128, np.int64)
    bound = np.empty(128, np.float64)  # each stacked node's box distance
    for m in range(m0, m1):
        q = Pt[m]
        for t in range(k):
            kb[t] = INF
        stack[0] = 0
        bound[0] = 0.0
        top = 1
        while top > 0:
            top -= 1
            nd = stack[top]
            if bound[top] >= kb[k - 1]:
                continue
            if left[nd] < 0:
                for j in range(start[nd], end[nd]):
                    d = 0.0
                    for c in range(D):
                        t = abs(Pt[j, c] - q[c])
                        if t > d:
                            d = t
                    if d < kb[k - 1] and j != m:
                        p = k - 1
                        while p > 0 and kb[p - 1] > d:
                            kb[p] = kb[p - 1]
                            p -= 1
                        kb[p] = d
            else:  # the nearer child is examined first (pushed last)
                a, b = left[nd], left[nd] + 1
                la, lb = _box_lower(lo, hi, a, q), _box_lower(lo, hi, b, q)
                if la < lb:
                    a, b, la, lb = b, a, lb, la
                if la < kb[k - 1]:
                    stack[top] = a
                    bound[top] = la
                    top += 1
                if lb < kb[k - 1]:
                    stack[top] = b
                    bound[top] = lb
                    top += 1
        eps[order[m]] = kb[k - 1]


@_jit
def _tree_count(i0, i1, rows, Q, radius, order, Qt, lo, hi, start, end, left, out):
    """``out[i] = #{j != i : max_c |Q[j, c] - Q[i, c]| < radius[i]}`` for the rows
    ``rows[i0 .. i1 - 1]``, by a tree over ``Q`` (``Qt = Q[order]``)."""
    D = Q.shape[1]
    stack = np.empty(128, np.int64)
    for r in range(i0, i1):
        i = rows[r]
        q = Q[i]
        e = radius[i]
        cnt = 0
        if e > 0.0:
            stack[0] = 0
            top = 1
            while top > 0:  # every stacked node's box is nearer than e
                top -= 1
                nd = stack[top]
                if _box_upper(lo, hi, nd, q) < e:
                    cnt += end[nd] - start[nd]
                elif left[nd] < 0:
                    for j in range(start[nd], end[nd]):
                        d = 0.0
                        for c in range(D):
                            t = abs(Qt[j, c] - q[c])
                            if t > d:
                                d = t
                        if d < e:
                            cnt += 1
                else:
                    a = left[nd]
                    if _box_lower(lo, hi, a, q) < e:
                        stack[top] = a
                        top += 1
                    if _box_lower(lo, hi, a + 1, q) < e:
                        stack[top] = a + 1
                        top += 1
            cnt -= 1  # the point itself (distance 0 < e)
        out[i] = cnt


@_jit
def _sorted_counts(i0, i1, rows, v, sv, rank, tb, radius, out):
    """The 1-D case of ``_tree_count``: ``#{j != i : |v_j - v_i| < radius_i}`` on sorted ``sv``."""
    for r in range(i0, i1):
        i = rows[r]
        out[i] = _strict_count(sv, tb[0], tb[1], tb[2], rank[i], v[i], radius[i])


@_jit
def _tree_knn_idx(m0, m1, k, order, Pt, lo, hi, start, end, left, idx):
    """``idx[order[m]]`` = the rows of the k nearest points (itself included) to the point at
    tree position m, nearest first, ties by row index, for positions ``m0 .. m1 - 1``."""
    D = Pt.shape[1]
    kb = np.empty(k, np.float64)
    kr = np.empty(k, np.int64)
    stack = np.empty(128, np.int64)
    for m in range(m0, m1):
        q = Pt[m]
        for t in range(k):
            kb[t] = INF
            kr[t] = -1
        stack[0] = 0
        top = 1
        while top > 0:
            top -= 1
            nd = stack[top]
            if _box_lower(lo, hi, nd, q) > kb[k - 1]:
                continue
            if left[nd] < 0:
                for j in range(start[nd], end[nd]):
                    d = 0.0
                    for c in range(D):
                        t = abs(Pt[j, c] - q[c])
                        if t > d:
                            d = t
                    row = order[j]
                    if d < kb[k - 1] or (d == kb[k - 1] and row < kr[k - 1]):
                        p = k - 1
                        while p > 0 and (kb[p - 1] > d or (kb[p - 1] == d and kr[p - 1] > row)):
                            kb[p] = kb[p - 1]
                            kr[p] = kr[p - 1]
                            p -= 1
                        kb[p] = d
                        kr[p] = row
            else:
                a, b = left[nd], left[nd] + 1
                if _box_lower(lo, hi, a, q) < _box_lower(lo, hi, b, q):
                    a, b = b, a
                stack[top] = a
                stack[top + 1] = b
                top += 2
        for t in range(k):
            idx[order[m], t] = kr[t]


def _chunks(total: int, pool: ThreadPoolExecutor | None, fn, grain: int = 2048) -> None:
    """Run ``fn(a, b)`` over consecutive chunks of ``range(total)`` (4 per thread, at least
    ``grain`` items each) on ``pool``, or at once without one."""
    parts = min(4 * pool._max_workers, max(1, total // grain)) if pool is not None else 1
    if parts <= 1:
        fn(0, total)
        return
    bounds = [(t * total // parts, (t + 1) * total // parts) for t in range(parts)]
    list(pool.map(lambda ab: fn(*ab), bounds))


def _sorted_marginal(v: np.ndarray):
    """What the 1-D strict counts need: the sorted values, each value's rank, a bucket table."""
    o = np.argsort(v, kind="mergesort")
    sv = v[o]
    return sv, _inverse(o), _buckets(sv)


def tree_radius_counts(V: np.ndarray, k: int, count_sets: list[list[int]], threads: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
    """The quantities of ``arr_coc.info.knn.brute_radius_counts`` by k-d trees: ``V [n, D]``
    float64 (the joint space, columns of all variables), ``count_sets``: for each count, the
    columns of its subspace. Returns ``eps [n]`` and one ``[n]`` int64 count per set, equal
    to the brute-force ones bit for bit. Queries run in the joint tree's order (neighbouring
    queries share their nodes). On ``threads`` Python threads (GIL-free kernels; every output
    element is written by one of them): the subspace trees (and sorted 1-D marginals) are
    built, each on one thread, while the joint tree is built on the others; then the queries
    are split."""
    V = np.ascontiguousarray(V, dtype=np.float64)
    n = V.shape[0]
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        subs = [np.ascontiguousarray(V[:, cols]) if len(cols) > 1 else np.ascontiguousarray(V[:, cols[0]]) for cols in count_sets]

        def prepare(sub):
            return tree_build(sub, LEAF) if sub.ndim == 2 else _sorted_marginal(sub)

        pending = [pool.submit(prepare, sub) for sub in subs] if pool is not None else None
        order, Vt, lo, hi, start, end, left = tree_build(V, LEAF, pool)
        eps = np.empty(n, np.float64)
        _chunks(n, pool, lambda a, b: _tree_kth(a, b, k, order, Vt, lo, hi, start, end, left, eps), grain=512)
        counts = []
        for j, sub in enumerate(subs):
            ready = pending[j].result() if pending is not None else prepare(sub)
            out = np.empty(n, np.int64)
            if sub.ndim == 1:
                sv, rank, tb = ready
                _chunks(n, pool, lambda a, b: _sorted_counts(a, b, order, sub, sv, rank, tb, eps, out), grain=512)
            else:
                qo, Qt, qlo, qhi, qs, qe, ql = ready
                _chunks(n, pool, lambda a, b: _tree_count(a, b, order, sub, eps, qo, Qt, qlo, qhi, qs, qe, ql, out), grain=512)
            counts.append(out)
    finally:
        if pool is not None:
            pool.shutdown()
    return eps, counts


def tree_knn_indices(V: np.ndarray, k: int, threads: int = 1) -> np.ndarray:
    """``[n, k]`` int64: for each row of ``V [n, D]``, the rows of its k nearest points in the
    max-norm (itself included), nearest first, ties broken by the smaller row index."""
    V = np.ascontiguousarray(V, dtype=np.float64)
    n = V.shape[0]
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        order, Vt, lo, hi, start, end, left = tree_build(V, LEAF, pool)
        idx = np.empty((n, k), np.int64)
        _chunks(n, pool, lambda a, b: _tree_knn_idx(a, b, k, order, Vt, lo, hi, start, end, left, idx), grain=512)
    finally:
        if pool is not None:
            pool.shutdown()
    return idx
