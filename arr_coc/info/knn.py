"""Exact k-nearest-neighbour search in the max-norm, with bounded memory, on any device.

Two engines answer the same question - for every point, the distance ``eps_i`` to its
k-th nearest other point - and the strict neighbour counts the KSG estimators need:

- ``brute_radius_counts``: tiles of the full distance matrix (chunked so a tile holds at
  most ``TILE_ELEMENTS`` entries). O(n^2) work, any dimension; the right tool on a GPU or
  at small n.
- ``grid_kth_2d``: the two-dimensional case ``(x, y)`` (both scalar), batched over a
  leading dimension (the features of ``mi_features``), in about O(n log n) work and O(n)
  memory. Points sit on a hierarchy of grids in rank space (cell ``rank >> shift``), so the
  cells adapt to the marginal densities. Phase 1: each point's finest 3 x 3 block of cells
  holding k other points gives an upper bound ``ub`` on ``eps_i`` (a k-th smallest distance
  over a subset); it is exact when a certificate holds (``ub`` is no larger than the
  distance to the nearest point outside the block, read off the sorted marginals). Phase 2,
  for the other points: every point within ``ub`` lies in a rank rectangle found by binary
  search on the sorted marginals; the rectangle is enumerated as at most three column
  ranges of cells across its short side, and the k-th distance over them is exact.

``strict_counts_sorted`` counts ``#{j : |v_j - v_i| < eps_i}`` with binary search on
sorted marginals; the boundary is then corrected so that the count uses exactly the
floating-point predicate ``abs(v_j - v_i) < eps_i`` (the same one the brute engine uses).
"""

from __future__ import annotations

import math

import torch

__all__ = ["TILE_ELEMENTS", "brute_radius_counts", "grid_kth_2d", "strict_counts_sorted", "kth_1d_sorted"]

TILE_ELEMENTS = 1 << 22  # entries per distance tile (32 MiB in float64)
DENSE_CELLS = 1 << 26  # grid levels with at most this many cells (and <= 16 per point) use a dense offset table


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


def strict_counts_sorted(sorted_v: torch.Tensor, v: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``#{j : |sorted_v[b, j] - v[b, i]| < eps[b, i]}`` (the point itself included when eps > 0).

    sorted_v: [B, n] ascending rows; v, eps: [B, m] -> [B, m] long.
    """
    n = sorted_v.shape[1]
    sorted_v = sorted_v.contiguous()
    hi = torch.searchsorted(sorted_v, v + eps, side="left")
    lo = torch.searchsorted(sorted_v, v - eps, side="right")

    def pred(pos: torch.Tensor) -> torch.Tensor:
        val = sorted_v.gather(1, pos.clamp(0, n - 1))
        return (val - v).abs() < eps, val

    for _ in range(64):  # each pass moves a boundary across one run of equal values
        p_hi, v_hi = pred(hi)
        inc_hi = (hi < n) & p_hi
        p_hm, v_hm = pred(hi - 1)
        dec_hi = (hi > 0) & ~p_hm & (v_hm >= v) & ~inc_hi
        p_lo, v_lo = pred(lo)
        inc_lo = (lo < n) & ~p_lo & (v_lo <= v)
        p_lm, v_lm = pred(lo - 1)
        dec_lo = (lo > 0) & p_lm & ~inc_lo
        if not bool((inc_hi | dec_hi | inc_lo | dec_lo).any()):
            break
        hi = torch.where(inc_hi, torch.searchsorted(sorted_v, v_hi, side="right"), hi)
        hi = torch.where(dec_hi, torch.searchsorted(sorted_v, v_hm, side="left"), hi)
        lo = torch.where(inc_lo, torch.searchsorted(sorted_v, v_lo, side="right"), lo)
        lo = torch.where(dec_lo, torch.searchsorted(sorted_v, v_lm, side="left"), lo)
    return (hi - lo).clamp(min=0)


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


# ----------------------------------------------------------------------------- 2-D grid


class _Levels:
    """Rank-space grids of a batch of 2-D point sets, built lazily and cached per level.

    At level L the grid has ``G = 2**L`` cells per side and point i sits in cell
    ``(rank_x >> shift, rank_y >> shift)`` with ``shift = lmax - L``. Cells are stored in
    column-major order along either axis (``axis`` 0: columns along x, 1: along y), so the
    cells of one column form one contiguous range of points. A level with at most
    ``DENSE_CELLS`` cells in all keeps a dense table of cell offsets (lookups are gathers);
    finer levels keep the sorted cell keys (binary search).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        B, n = x.shape
        self.B, self.n = B, n
        self.device = x.device
        self.vf = (x.reshape(-1), y.reshape(-1))
        self.xy = torch.stack(self.vf, 1)  # [N, 2]
        ox = torch.sort(x, dim=1, stable=True)
        oy = torch.sort(y, dim=1, stable=True)
        self.sorted = (ox.values, oy.values)
        ar = torch.arange(n, device=self.device).expand(B, n)
        self.ranks = (
            torch.empty_like(ox.indices).scatter_(1, ox.indices, ar).reshape(-1),
            torch.empty_like(oy.indices).scatter_(1, oy.indices, ar).reshape(-1),
        )
        self.batch = torch.arange(B, device=self.device).repeat_interleave(n)
        self.lmax = max(1, math.ceil(math.log2(n)))
        self._offsets: dict[tuple[int, int], tuple[bool, torch.Tensor]] = {}
        self._perm: dict[tuple[int, int], torch.Tensor] = {}

    def _keys(self, level: int, axis: int) -> torch.Tensor:
        G = 1 << level
        shift = self.lmax - level
        return (self.batch * G + (self.ranks[axis] >> shift)) * G + (self.ranks[1 - axis] >> shift)

    def offsets(self, level: int, axis: int) -> tuple[bool, torch.Tensor]:
        """(dense?, table): exclusive prefix counts per cell, or the sorted cell keys."""
        key = (level, axis)
        if key not in self._offsets:
            G = 1 << level
            keys = self._keys(level, axis)
            if self.B * G * G <= min(DENSE_CELLS, max(1 << 16, 16 * self.B * self.n)):
                cnt = torch.bincount(keys, minlength=self.B * G * G)
                cum = torch.zeros(cnt.numel() + 1, dtype=torch.long, device=self.device)
                torch.cumsum(cnt, 0, out=cum[1:])
                self._offsets[key] = (True, cum)
            else:
                s = torch.sort(keys)
                self._offsets[key] = (False, s.values)
                self._perm[key] = s.indices
        return self._offsets[key]


    def perm(self, level: int, axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Points in cell order: (coordinates ``[N, 2]`` in that order, the position of each
        point in it ``[N]``, the order itself ``[N]``)."""
        key = (level, axis)
        if key not in self._perm:
            self._perm[key] = torch.sort(self._keys(level, axis), stable=True).indices
        p = self._perm[key]
        if not isinstance(p, tuple):
            where = torch.empty_like(p)
            where[p] = torch.arange(p.numel(), device=self.device)
            p = (self.xy[p], where, p)
            self._perm[key] = p
        return p

    def ranges(
        self, level: int, axis: int, pts: torch.Tensor, c_lo: torch.Tensor, c_hi: torch.Tensor, r_lo: torch.Tensor, r_hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Point ranges ``[m, 3]`` (start, length) of columns ``c_lo .. min(c_lo + 2, c_hi)``,
        rows ``r_lo .. r_hi`` (inclusive cell indices, already clamped to ``[0, G)``)."""
        G = 1 << level
        dense, table = self.offsets(level, axis)
        b = self.batch[pts]
        starts, lens = [], []
        for dc in range(3):
            col = c_lo + dc
            ok = col <= c_hi
            base = (b * G + col.clamp(max=G - 1)) * G
            if dense:
                s, e = table[base + r_lo], table[base + r_hi + 1]
            else:
                s = torch.searchsorted(table, base + r_lo)
                e = torch.searchsorted(table, base + r_hi + 1)
            starts.append(s)
            lens.append(torch.where(ok, e - s, torch.zeros_like(s)))
        return torch.stack(starts, 1), torch.stack(lens, 1)

    def block(self, level: int, pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ranges of each point's 3 x 3 block of cells (columns along x)."""
        G = 1 << level
        shift = self.lmax - level
        cx, cy = self.ranks[0][pts] >> shift, self.ranks[1][pts] >> shift
        return self.ranges(level, 0, pts, (cx - 1).clamp(min=0), (cx + 1).clamp(max=G - 1), (cy - 1).clamp(min=0), (cy + 1).clamp(max=G - 1))

    def outside_distance(self, level: int, pts: torch.Tensor) -> torch.Tensor:
        """Lower bound on the max-norm distance from each point to any point outside its 3x3 block."""
        shift = self.lmax - level
        n = self.n
        b = self.batch[pts]
        best = None
        for axis in (0, 1):
            c = self.ranks[axis][pts] >> shift
            lo = ((c - 1).clamp(min=0)) << shift
            hi = ((c + 2) << shift).clamp(max=n)
            v = self.vf[axis][pts]
            sv = self.sorted[axis]
            left = torch.where(lo > 0, v - sv[b, (lo - 1).clamp(min=0)], torch.full_like(v, math.inf))
            right = torch.where(hi < n, sv[b, hi.clamp(max=n - 1)] - v, torch.full_like(v, math.inf))
            d = torch.minimum(left, right)
            best = d if best is None else torch.minimum(best, d)
        return best


def _next_pow2(t: torch.Tensor) -> torch.Tensor:
    return torch.pow(2, torch.ceil(torch.log2(t.clamp(min=1).to(torch.float64)))).long()


def _gather_kth(lv: _Levels, level: int, axis: int, pts: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, k: int) -> torch.Tensor:
    """k-th smallest max-norm distance from each point of ``pts`` to the other points in its
    three ranges of the level's cell order (``starts``, ``lens``: [m, 3]); inf if fewer than k."""
    xy_p, where, _ = lv.perm(level, axis)
    total = lens.sum(1)
    width = _next_pow2(total).clamp(min=max(4, k))
    out = torch.empty(pts.shape[0], dtype=xy_p.dtype, device=lv.device)
    for w in torch.unique(width).tolist():
        sel = (width == w).nonzero().squeeze(1)
        rows = max(1, TILE_ELEMENTS // (4 * w))
        t = torch.arange(w, device=lv.device)[None, :]
        for r0 in range(0, sel.shape[0], rows):
            s_idx = sel[r0 : r0 + rows]
            p = pts[s_idx]
            st, ln = starts[s_idx], lens[s_idx]
            c1 = ln[:, :1]
            c2 = c1 + ln[:, 1:2]
            pos = st[:, :1] + t + (t >= c1) * (st[:, 1:2] - st[:, :1] - c1) + (t >= c2) * (st[:, 2:3] - st[:, 1:2] - ln[:, 1:2])
            valid = (t < total[s_idx, None]) & (pos != where[p, None])
            pos = pos.clamp(0, xy_p.shape[0] - 1)
            d = (xy_p[pos] - lv.xy[p, None, :]).abs().amax(dim=-1)
            d = d.masked_fill_(~valid, math.inf)
            out[s_idx] = d.topk(k, dim=1, largest=False).values[:, k - 1]
    return out


def grid_kth_2d(x: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact max-norm k-th neighbour distance of 2-D point sets, batched.

    x, y: [B, n] (point i of set b is ``(x[b, i], y[b, i])``), 1 <= k < n.
    Returns ``eps [B, n]`` and the sorted marginals ``xs, ys [B, n]`` (for the counts).

    Phase 1: each point's finest 3 x 3 block holding k other points gives an upper bound
    ``ub`` (a k-th smallest distance over a subset); it is exact where the certificate holds.
    Phase 2, for the rest: every point within ``ub`` lies in the rank rectangle read off the
    sorted marginals; the rectangle is enumerated as at most three column ranges of cells
    across its short side (cell width >= half that side), so the candidates are the
    rectangle's points plus a bounded margin.
    """
    B, n = x.shape
    lv = _Levels(x, y)
    device = x.device
    N = B * n
    start = min(lv.lmax, max(1, round(math.log2(max(2.0, math.sqrt(9 * n / (2 * (k + 1))))))))
    level = torch.full((N,), start, dtype=torch.long, device=device)

    def block_count(levels: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
        cnt = torch.empty(pts.shape[0], dtype=torch.long, device=device)
        lv_p = levels[pts]
        for L in torch.unique(lv_p).tolist():
            m = (lv_p == L).nonzero().squeeze(1)
            cnt[m] = lv.block(L, pts[m])[1].sum(1)
        return cnt

    allp = torch.arange(N, device=device)
    count = block_count(level, allp)
    ok = count >= k + 1
    # finer while the finer block still holds k other points (only where the block is crowded)
    active = allp[ok & (level < lv.lmax) & (count > 16 * (k + 1))]
    while active.numel():
        trial = level.clone()
        trial[active] += 1
        good = block_count(trial, active) >= k + 1
        level[active[good]] += 1
        active = active[good & (level[active] < lv.lmax)]
    # coarser until the block holds k other points (level 1 holds everything)
    active = allp[~ok]
    while active.numel():
        level[active] -= 1
        good = block_count(level, active) >= k + 1
        active = active[~good & (level[active] > 1)]

    # phase 1: upper bounds, exact where certified
    eps = torch.empty(N, dtype=x.dtype, device=device)
    todo = []
    for L in torch.unique(level).tolist():
        pts = allp[level == L]
        st, ln = lv.block(L, pts)
        e = _gather_kth(lv, L, 0, pts, st, ln, k)
        eps[pts] = e
        todo.append(pts[(e > lv.outside_distance(L, pts)) & (L > 1)])
    pts = torch.sort(torch.cat(todo)).values  # grouped by batch row
    if pts.numel() == 0:
        return eps.view(B, n), lv.sorted[0], lv.sorted[1]

    # phase 2: exact rectangle queries
    ub = eps[pts]
    b = lv.batch[pts]
    per_row = torch.bincount(b, minlength=B)
    col = torch.arange(pts.shape[0], device=device) - (torch.cumsum(per_row, 0) - per_row)[b]
    width = int(per_row.max())
    lo, hi = [], []
    for axis in (0, 1):
        v = lv.vf[axis][pts]
        margin = 1e-9 * ub + 1e-12 * (v.abs() + ub)
        sv = lv.sorted[axis]
        for side, val, out in (("left", v - ub - margin, lo), ("right", v + ub + margin, hi)):
            q = torch.full((B, width), math.inf, dtype=v.dtype, device=device)
            q[b, col] = val
            out.append(torch.searchsorted(sv, q, side=side)[b, col])
    ext = torch.stack([hi[0] - lo[0], hi[1] - lo[1]], 1)  # rank extents [m, 2]
    short_axis = (ext[:, 1] < ext[:, 0]).long()  # columns across the short side
    short = ext.gather(1, short_axis[:, None]).squeeze(1).clamp(min=2)
    shift = torch.ceil(torch.log2(short.to(torch.float64) / 2)).long().clamp(0, lv.lmax)
    lvl = (lv.lmax - shift).clamp(max=max(start, 1))  # never finer than the start level: fewer grids to build
    for axis in (0, 1):
        for L in torch.unique(lvl[short_axis == axis]).tolist():
            m = ((short_axis == axis) & (lvl == L)).nonzero().squeeze(1)
            sh = lv.lmax - L
            lo_c, hi_c = lo[axis][m] >> sh, (hi[axis][m] - 1).clamp(min=0) >> sh
            lo_r, hi_r = lo[1 - axis][m] >> sh, (hi[1 - axis][m] - 1).clamp(min=0) >> sh
            st, ln = lv.ranges(L, axis, pts[m], lo_c, hi_c, lo_r, hi_r)
            eps[pts[m]] = _gather_kth(lv, L, axis, pts[m], st, ln, k)
    return eps.view(B, n), lv.sorted[0], lv.sorted[1]
