"""Information measures of continuous samples: k-NN (KSG, Frenzel-Pompe, Kozachenko-Leonenko),
Gaussian (log-det), and the batched feature-selection workload ``mi_features``.

Samples are ``[n]`` or ``[n, d]``, sample dimension first. Results are tensors on the input's
device, in the unit of ``base`` (e: nats). Estimates are never clipped at zero unless
``clip=True`` is asked for (KSG is nearly unbiased around 0, so independent variables give
small negative values about half the time; clipping would bias averages upwards).

Preprocessing of the k-NN MI estimators (``ksg_mi``, ``ksg_cmi``, ``mi_features``):

1. Every coordinate is centred and scaled to unit standard deviation (as Kraskov et al. and
   scikit-learn do; the max-norm mixes coordinates, so their scales matter at finite n).
   A variable whose samples are all equal carries no information: the estimate is exactly 0.
2. Ties. KSG assumes continuous data; repeated values (integer-valued or rounded data) make
   k-th neighbour distances 0 and the strict counts meaningless. A coordinate with repeated
   values gets deterministic uniform noise of half-width ``jitter`` times the smallest gap
   between its distinct values (default 0.25): ties are broken, the order of distinct values
   is never changed, and the noise is always far above float64 resolution (scikit-learn's
   ``1e-10 * mean|x|`` noise is not - its issue 30772 - and its integer inputs were once
   rounded by the scaling - issue 26696; here integers are converted to floats first).
   Because the noise is narrower than half of every gap, the de-tied variable still
   determines the original one, so the population MI is unchanged (data processing both
   ways); on discrete data the estimate approaches the plug-in discrete MI. Coordinates without
   ties are left untouched, so continuous data give the exact KSG estimate. The noise is
   seeded by ``seed`` and by a hash of the variable's own values (never by the order of the
   samples), so different variables get independent noise - a monotone function of a tied
   variable (``x + 10``, ``x ** 3``) is not given comonotone noise, which would inflate the
   MI several-fold - identical variables are told apart by their position among the
   arguments, ``ksg_mi(x, y) == ksg_mi(y, x)`` and ``mi_features(X, y)[j] == ksg_mi(X[:, j], y)``.
   ``jitter=0`` disables it.
"""

from __future__ import annotations

import hashlib
import math

import torch

from arr_coc.info._validate import (
    check_base,
    check_integer_samples,
    check_k,
    check_same_n,
    check_samples,
    from_nats,
)
from arr_coc.info.knn import (
    TILE_ELEMENTS,
    TREE_MAX_DIM,
    brute_radius_counts,
    ksg_counts_2d,
    kth_1d_sorted,
    numba_kernels,
    strict_counts_sorted,
    tree_radius_counts,
    use_tree,
)

__all__ = ["gaussian_cmi", "gaussian_mi", "kl_entropy", "ksg_cmi", "ksg_mi", "mi_features"]


# ----------------------------------------------------------------------------- preprocessing


def _standardize(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and scale each column of ``v [n, d]``; constant columns become 0.

    Returns the scaled samples and ``[d]`` bool: which columns are constant.
    """
    const = (v == v[:1]).all(dim=0)
    centred = v - v.mean(dim=0, keepdim=True)
    # divide by the largest magnitude first so that tiny or huge scales neither under- nor overflow
    peak = centred.abs().amax(dim=0)
    centred = centred / torch.where(peak > 0, peak, torch.ones_like(peak))
    std = centred.pow(2).mean(dim=0).sqrt()
    safe = torch.where(const | (std == 0), torch.ones_like(std), std)
    return torch.where(const, torch.zeros_like(centred), centred / safe), const


def _value_key(raw: torch.Tensor) -> int:
    """A 63-bit hash of a variable's values (``[n, d]``, as float64 bits; ``-0.0`` counts as
    ``0.0``). Seeds its tie-breaking noise: two variables get independent noise unless their
    values are identical, and a column gets the same noise whether it is passed alone
    (``ksg_mi``) or beside others (``mi_features``)."""
    v = (raw.detach().to(torch.float64) + 0.0).contiguous().cpu().numpy()
    digest = hashlib.blake2b(v.tobytes(), digest_size=8, person=b"arr_coc-ties").digest()
    return int.from_bytes(digest, "little") >> 1 ^ (v.shape[1] << 40)


def _break_ties(v: torch.Tensor, raw: torch.Tensor, jitter: float, seed: int, salt: int = 0) -> torch.Tensor:
    """Add ``U(-a, a)`` noise, ``a = jitter * (smallest gap between distinct values)``, to the
    columns of ``v [n, d]`` (the standardized ``raw [n, d]``) that hold repeated values
    (constant columns are left alone). The noise is seeded by ``seed``, by the hash of ``raw``
    and by ``salt`` (which tells identical variables apart), never by the order of the samples:
    a monotone function of a tied variable must not receive comonotone noise, which would make
    the pair look far more dependent than it is."""
    if jitter == 0 or v.shape[0] < 2:
        return v
    s = torch.sort(v, dim=0).values
    gaps = s[1:] - s[:-1]
    tied = (gaps == 0).any(dim=0)
    pos = torch.where(gaps > 0, gaps, torch.full_like(gaps, math.inf)).amin(dim=0)
    need = tied & torch.isfinite(pos)
    if not bool(need.any()):
        return v
    g = torch.Generator(device=v.device)
    g.manual_seed((seed * 1_000_003 + _value_key(raw) + 7919 * salt) % (1 << 63))
    u = torch.rand(v.shape, generator=g, device=v.device, dtype=v.dtype) * 2 - 1
    amp = torch.where(need, jitter * pos, torch.zeros_like(pos))
    return v + u * amp


def _check_jitter(jitter: float) -> None:
    if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter < 0.5:
        raise ValueError(f"jitter: expected a number in [0, 0.5) (a fraction of the smallest gap), got {jitter!r}")


def _prepare_vars(named: dict[str, torch.Tensor], jitter: float, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Standardize and de-tie several variables; returns them and their per-column constant masks."""
    out, consts = [], []
    for v in named.values():
        z, const = _standardize(v)
        out.append(z)
        consts.append(const)
    if jitter:
        # identical variables get independent noise: the salt counts the identical ones before
        raws = list(named.values())
        out = [
            _break_ties(z, raws[i], jitter, seed, sum(p.shape == raws[i].shape and torch.equal(p, raws[i]) for p in raws[:i]))
            for i, z in enumerate(out)
        ]
    return out, consts


def _digamma_mean(c: torch.Tensor) -> torch.Tensor:
    """``mean(psi(c + 1))`` over the last dimension of integer counts (a table of psi: the
    counts are small integers, and a lookup is far cheaper than psi on every entry)."""
    if c.numel() == 0:
        return torch.special.digamma(c.to(torch.float64) + 1).mean(dim=-1)
    table = torch.special.digamma(torch.arange(1, int(c.max()) + 2, dtype=torch.float64, device=c.device))
    return table.index_select(0, c.reshape(-1)).view(c.shape).mean(dim=-1)


def _finish(value: torch.Tensor, zero: torch.Tensor, base: float, clip: bool) -> torch.Tensor:
    """Exact 0 where ``zero``; optional clipping; unit conversion."""
    value = torch.where(zero, torch.zeros_like(value), value)
    if clip:
        value = value.clamp(min=0.0)
    return from_nats(value, base)


# ----------------------------------------------------------------------------- KSG


def ksg_mi(
    x: torch.Tensor,
    y: torch.Tensor,
    k: int = 3,
    *,
    base: float = math.e,
    clip: bool = False,
    jitter: float = 0.25,
    seed: int = 0,
    method: str = "auto",
) -> torch.Tensor:
    """I(X; Y) by the Kraskov-Stoegbauer-Grassberger estimator 1 -> ``[]``.

    ``I = psi(k) + psi(n) - < psi(n_x + 1) + psi(n_y + 1) >`` with ``eps_i`` the max-norm
    distance to the k-th neighbour in the joint space and ``n_x``, ``n_y`` the numbers of
    other points strictly closer than ``eps_i`` in each marginal (max-norm there too).
    x: [n] or [n, dx]; y: [n] or [n, dy]; 1 <= k < n.

    method: ``"grid"`` (scalar x and y only: the exact O(n log n) search of
    ``arr_coc.info.knn.ksg_counts_2d``, compiled on the CPU, vectorised torch elsewhere;
    bounded memory), ``"tree"`` (CPU tensors with numba, ``dx + dy <= 8``: the exact k-d
    tree search of ``arr_coc.info.knn.tree_radius_counts``), ``"brute"`` (tiled O(n^2), any
    dimension and device) or ``"auto"`` (grid for scalar pairs, tree where it applies and
    n >= 256, brute otherwise). All give the same counts, bit for bit. See the module
    docstring for scaling, ties and ``jitter``.
    """
    check_base(base)
    _check_jitter(jitter)
    xs = check_samples("x", x)
    ys = check_samples("y", y)
    n = check_same_n(x=xs, y=ys)
    check_k(k, n)
    (xz, yz), (cx, cy) = _prepare_vars({"x": xs, "y": ys}, jitter, seed)
    zero = cx.all() | cy.all()
    scalar = xz.shape[1] == 1 and yz.shape[1] == 1
    if method not in ("auto", "grid", "tree", "brute"):
        raise ValueError(f"method: expected 'auto', 'grid', 'tree' or 'brute', got {method!r}")
    if method == "grid" and not scalar:
        raise ValueError("method: 'grid' needs scalar x and y ([n] or [n, 1])")
    _check_tree(method, [xz, yz])
    if method == "grid" or (method == "auto" and scalar):
        nx, ny, _ = ksg_counts_2d(xz[:, 0][None], yz[:, 0], k)
        nx, ny = nx[0], ny[0]
    else:
        nx, ny = _radius_counts(method, [xz, yz], k, [(0,), (1,)])
    return _finish(_ksg1(nx, ny, k, n), zero, base, clip)


def _check_tree(method: str, variables: list[torch.Tensor]) -> None:
    if method == "tree" and (variables[0].device.type != "cpu" or numba_kernels() is None or sum(v.shape[1] for v in variables) > TREE_MAX_DIM):
        raise ValueError(f"method: 'tree' needs CPU tensors, numba installed and at most {TREE_MAX_DIM} coordinates in all")


def _radius_counts(method: str, variables: list[torch.Tensor], k: int, count_sets: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """The strict counts of ``brute_radius_counts`` by the engine ``method`` picks."""
    if method == "tree" or (method == "auto" and use_tree(variables)):
        return tree_radius_counts(variables, k, count_sets)[1]
    return brute_radius_counts(variables, k, count_sets)[1]


def _ksg1(nx: torch.Tensor, ny: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """KSG estimator 1 from the marginal counts ``[..., n]``: ``psi(k) + psi(n) - <psi(n_x + 1) + psi(n_y + 1)>``."""
    return _psi_n(k, nx.device) + _psi_n(n, nx.device) - (_digamma_mean(nx) + _digamma_mean(ny))


def _psi_n(n: int, device: torch.device) -> torch.Tensor:
    """digamma(n) as a float64 tensor on ``device``."""
    return torch.special.digamma(torch.tensor(float(n), dtype=torch.float64, device=device))


def ksg_cmi(
    x: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    k: int = 3,
    *,
    base: float = math.e,
    clip: bool = False,
    jitter: float = 0.25,
    seed: int = 0,
    method: str = "auto",
) -> torch.Tensor:
    """I(X; Y | Z) by the Frenzel-Pompe estimator -> ``[]``.

    ``I = psi(k) - < psi(n_xz + 1) + psi(n_yz + 1) - psi(n_z + 1) >`` with ``eps_i`` the
    max-norm k-th neighbour distance in the joint (x, y, z) space and strict counts in the
    (x, z), (y, z) and z subspaces. method: ``"tree"`` (CPU tensors with numba, at most 8
    coordinates in all: exact k-d tree search), ``"brute"`` (tiled O(n^2), bounded memory,
    any device) or ``"auto"`` (tree where it applies and n >= 256); the counts are the same
    bit for bit. A constant X or Y gives exactly 0; a constant Z gives the KSG estimate of
    I(X; Y).
    """
    check_base(base)
    _check_jitter(jitter)
    xs = check_samples("x", x)
    ys = check_samples("y", y)
    zs = check_samples("z", z)
    n = check_same_n(x=xs, y=ys, z=zs)
    check_k(k, n)
    if method not in ("auto", "tree", "brute"):
        raise ValueError(f"method: expected 'auto', 'tree' or 'brute', got {method!r}")
    (xv, yv, zv), (cx, cy, _) = _prepare_vars({"x": xs, "y": ys, "z": zs}, jitter, seed)
    _check_tree(method, [xv, yv, zv])
    nxz, nyz, nz = _radius_counts(method, [xv, yv, zv], k, [(0, 2), (1, 2), (2,)])
    dev = xv.device
    value = _psi_n(k, dev) - (
        _digamma_mean(nxz) + _digamma_mean(nyz) - _digamma_mean(nz)
    )
    return _finish(value, cx.all() | cy.all(), base, clip)


def kl_entropy(x: torch.Tensor, k: int = 3, *, norm: str = "euclidean", base: float = math.e) -> torch.Tensor:
    """Differential entropy h(X) by the Kozachenko-Leonenko k-NN estimator -> ``[]``.

    ``h = psi(n) - psi(k) + log V_d + d < log r_i >`` with ``r_i`` the distance to the k-th
    nearest other point in the chosen norm and ``V_d`` the volume of that norm's unit ball
    (``pi^(d/2) / Gamma(d/2 + 1)`` Euclidean, ``2^d`` max-norm). x: [n] or [n, d], on its own
    scale (entropy is not scale invariant). If some point has k exact duplicates, ``r_i = 0``
    and the estimate is ``-inf`` - the differential entropy of a distribution with atoms.
    """
    check_base(base)
    if norm not in ("euclidean", "max"):
        raise ValueError(f"norm: expected 'euclidean' or 'max', got {norm!r}")
    xs = check_samples("x", x)
    n, d = xs.shape
    check_k(k, n)
    # a power-of-two rescaling (exact) to magnitudes near 1: the Euclidean distances of values
    # near the float limits would overflow (1e300) or underflow (1e-300) when squared
    peak = float(xs.abs().max())
    log_scale = 0.0
    if peak > 0:
        e = math.frexp(peak)[1]
        xs = torch.ldexp(xs, torch.tensor(-e, dtype=xs.dtype, device=xs.device))
        log_scale = e * math.log(2)
    if d == 1:
        r = kth_1d_sorted(torch.sort(xs[:, 0]).values[None], k)[0]
    else:
        p = 2.0 if norm == "euclidean" else math.inf
        r = torch.empty(n, dtype=xs.dtype, device=xs.device)
        rows = max(1, TILE_ELEMENTS // n)
        for r0 in range(0, n, rows):
            dist = torch.cdist(xs[r0 : r0 + rows], xs, p=p, compute_mode="donot_use_mm_for_euclid_dist")
            dist[torch.arange(dist.shape[0], device=xs.device), torch.arange(r0, r0 + dist.shape[0], device=xs.device)] = math.inf
            r[r0 : r0 + rows] = dist.kthvalue(k, dim=1).values
    log_vd = d / 2 * math.log(math.pi) - math.lgamma(d / 2 + 1) if norm == "euclidean" else d * math.log(2)
    h = _psi_n(n, xs.device) - _psi_n(k, xs.device) + log_vd + d * (torch.log(r.to(torch.float64)).mean() + log_scale)
    return from_nats(h, base)


# ----------------------------------------------------------------------------- Gaussian


def _check_ridge(ridge: float) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge: expected a finite number >= 0 (added to the correlation matrix's diagonal), got {ridge!r}")
    return float(ridge)


class _Corr:
    """The sample correlation matrix of the concatenated ``[n, d_i]`` variables and the log
    determinants of its principal blocks.

    Constant columns are given unit variance and no correlation (they carry nothing). ``ridge``
    is added to the diagonal. A block whose smallest eigenvalue is at most
    ``max(1e-12, 16 eps sqrt(n) d)`` (float64 ``eps``) counts as singular: its columns are
    collinear up to rounding (or there are more of them than samples minus one).
    """

    def __init__(self, named: dict[str, torch.Tensor], ridge: float):
        self.names = list(named)
        self.widths = [v.shape[1] for v in named.values()]
        self.n = next(iter(named.values())).shape[0]
        z, const = _standardize(torch.cat(list(named.values()), dim=1).to(torch.float64))
        c = z.T @ z / z.shape[0]
        c = (c + c.T) / 2 + torch.diag(const.to(c.dtype)) + ridge * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
        self.c, self.ridge = c, ridge

    def logdet(self, *names: str) -> tuple[torch.Tensor, bool, int]:
        """(log det of the block of ``names``, whether it is singular, its numerical rank)."""
        starts = [sum(self.widths[:i]) for i in range(len(self.widths))]
        idx = torch.cat([torch.arange(starts[self.names.index(m)], starts[self.names.index(m)] + self.widths[self.names.index(m)]) for m in names]).to(self.c.device)
        ev = torch.linalg.eigvalsh(self.c.index_select(0, idx).index_select(1, idx))
        d = idx.numel()
        tol = max(1e-12, 16 * torch.finfo(torch.float64).eps * math.sqrt(self.n) * d)
        rank = int((ev > tol).sum())
        if rank < d:
            return torch.full((), -math.inf, dtype=ev.dtype, device=ev.device), True, rank
        return ev.log().sum(), False, rank

    def regular(self, *names: str) -> torch.Tensor:
        """log det of a block that must be non-singular: else a ValueError naming its variables."""
        value, singular, rank = self.logdet(*names)
        if singular:
            d = sum(self.widths[self.names.index(m)] for m in names)
            what = " and ".join(names)
            cause = (
                f"more dimensions ({d}) than samples minus one ({self.n - 1})"
                if d > self.n - 1
                else ("collinear columns" if len(names) == 1 else f"{names[0]} is (partly) a linear function of {' and '.join(names[1:])}")
            )
            raise ValueError(
                f"{what}: the sample correlation matrix of ({', '.join(names)}) is singular (rank {rank} of {d}: {cause}); "
                "the Gaussian MI is undefined there - drop the redundant columns or pass ridge > 0 to regularise"
            )
        return value


def gaussian_mi(x: torch.Tensor, y: torch.Tensor, *, base: float = math.e, ridge: float = 0.0) -> torch.Tensor:
    """I(X; Y) of jointly Gaussian variables from the sample covariance -> ``[]``.

    ``I = 1/2 (log det C_x + log det C_y - log det C_xy)`` on the sample correlation
    matrices (the scale cancels); ``-1/2 log(1 - rho^2)`` for scalars. A constant X or Y gives
    exactly 0; an exact linear relation between X and Y (each non-singular) gives ``inf``.
    If the correlation matrix of X or of Y is itself singular (collinear columns, or more
    columns than samples minus one), the value is undefined: a ValueError naming it, unless
    ``ridge > 0``, which adds ``ridge`` to the diagonal of every correlation matrix (a
    Tikhonov-regularised estimate, always finite, biased towards 0).
    """
    check_base(base)
    ridge = _check_ridge(ridge)
    xs = check_samples("x", x, min_n=2)
    ys = check_samples("y", y, min_n=2)
    check_same_n(x=xs, y=ys)
    if bool((xs == xs[:1]).all() | (ys == ys[:1]).all()):
        return from_nats(torch.zeros((), dtype=torch.float64, device=xs.device), base)
    c = _Corr({"x": xs, "y": ys}, ridge)
    value = 0.5 * (c.regular("x") + c.regular("y") - c.logdet("x", "y")[0])
    return from_nats(value, base)


def gaussian_cmi(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, *, base: float = math.e, ridge: float = 0.0) -> torch.Tensor:
    """I(X; Y | Z) of jointly Gaussian variables: ``1/2 (ld C_xz + ld C_yz - ld C_xyz - ld C_z)`` -> ``[]``.

    A constant X or Y gives exactly 0; an exact linear relation between X and Y given Z gives
    ``inf``. Singular ``C_z``, ``C_xz`` or ``C_yz`` (e.g. ``gaussian_cmi(x, y, x)``, or more
    columns than samples) make the value undefined: a ValueError naming the variables, unless
    ``ridge > 0`` regularises every correlation matrix as in ``gaussian_mi``.
    """
    check_base(base)
    ridge = _check_ridge(ridge)
    xs = check_samples("x", x, min_n=2)
    ys = check_samples("y", y, min_n=2)
    zs = check_samples("z", z, min_n=2)
    check_same_n(x=xs, y=ys, z=zs)
    if bool((xs == xs[:1]).all() | (ys == ys[:1]).all()):
        return from_nats(torch.zeros((), dtype=torch.float64, device=xs.device), base)
    c = _Corr({"x": xs, "y": ys, "z": zs}, ridge)
    ld_z = c.regular("z")
    value = 0.5 * (c.regular("x", "z") + c.regular("y", "z") - c.logdet("x", "y", "z")[0] - ld_z)
    return from_nats(value, base)


# ----------------------------------------------------------------------------- features


def mi_features(
    X: torch.Tensor,
    y: torch.Tensor,
    k: int = 3,
    *,
    discrete_target: bool = False,
    base: float = math.e,
    clip: bool = False,
    jitter: float = 0.25,
    seed: int = 0,
) -> torch.Tensor:
    """MI of every column of ``X [n, F]`` with the target ``y [n]`` -> ``[F]``.

    The workload of scikit-learn's ``mutual_info_regression`` (continuous y: KSG estimator 1
    per feature) and ``mutual_info_classif`` (``discrete_target=True``, y integer labels: the
    Ross (2014) estimator), batched over features instead of a loop. Same preprocessing as
    ``ksg_mi`` (each column standardized, ties broken per column), so column j equals
    ``ksg_mi(X[:, j], y, k)``. With ``clip=True`` negative estimates become 0, as in
    scikit-learn. Constant columns give exactly 0.

    Ross: for each point, ``d_i`` is the distance to its ``k_i = min(k, N_c - 1)``-th
    neighbour among the points of its own class (size ``N_c``), ``m_i`` the number of points
    of any class strictly closer than ``d_i``, itself included;
    ``I = psi(N) + <psi(k_i)> - <psi(N_c)> - <psi(m_i)>`` over the points whose class has at
    least two members (``N`` of them).
    """
    check_base(base)
    _check_jitter(jitter)
    if not isinstance(X, torch.Tensor) or X.dim() != 2:
        raise ValueError(f"X: expected a [n, F] tensor, got {getattr(X, 'shape', type(X).__name__)}")
    Xs = check_samples("X", X)
    n, F = Xs.shape
    if not isinstance(y, torch.Tensor) or y.dim() != 1:
        raise ValueError(f"y: expected a [n] tensor, got {getattr(y, 'shape', type(y).__name__)}")
    check_k(k, n)
    Xz, const = _standardize(Xs)
    if discrete_target:
        if jitter and _any_ties(Xz):
            Xz = torch.stack([_break_ties(Xz[:, j : j + 1], Xs[:, j : j + 1], jitter, seed)[:, 0] for j in range(F)], dim=1)
        labels = check_integer_samples("y", y, n=n)[:, 0]
        value = _ross(Xz, labels, k)
        zero = const | (labels == labels[0]).all()
    else:
        ys = check_samples("y", y, n=n)
        (yz,), (cy,) = _prepare_vars({"y": ys}, 0, seed)
        if jitter:
            yz = _break_ties(yz, ys, jitter, seed)
        xb = Xz.T.contiguous()  # [F, n]
        nx, ny, tied = ksg_counts_2d(xb, yz[:, 0], k)
        if jitter and bool(tied.any()):  # the search sorts every column anyway: de-tie those with ties, count again
            redo = tied.nonzero().squeeze(1).tolist()
            # a column identical to y gets the second noise stream (as the second of two identical
            # variables does in ksg_mi; KSG is symmetric in x and y, so the values agree exactly)
            xt = torch.stack(
                [_break_ties(Xz[:, j : j + 1], Xs[:, j : j + 1], jitter, seed, int(torch.equal(Xs[:, j : j + 1], ys)))[:, 0] for j in redo]
            )
            nx[redo], ny[redo], _ = ksg_counts_2d(xt, yz[:, 0], k)
        value = _ksg1(nx, ny, k, n)
        zero = const | cy.all()
    return _finish(value, zero, base, clip)


def _any_ties(v: torch.Tensor) -> bool:
    s = torch.sort(v, dim=0).values
    return bool((s[1:] == s[:-1]).any())


def _ross(Xz: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Ross (2014) MI between each column of ``Xz [n, F]`` and discrete ``labels [n]`` -> [F]."""
    codes = torch.unique(labels, return_inverse=True)[1]
    counts = torch.bincount(codes)
    keep = counts[codes] > 1
    if not bool(keep.any()):
        return torch.zeros(Xz.shape[1], dtype=torch.float64, device=Xz.device)
    Xk, ck = Xz[keep], codes[keep]
    N = Xk.shape[0]
    class_size = counts[ck]  # [N]
    k_i = class_size.clamp(max=k + 1) - 1
    k_i = torch.minimum(k_i, torch.full_like(k_i, k))
    # sort each column by (class, value): class blocks are the same for every column
    v = Xk.T  # [F, N]
    order_v = torch.sort(v, dim=1, stable=True).indices
    cls_sorted = ck[order_v]  # [F, N]
    order_c = torch.sort(cls_sorted, dim=1, stable=True).indices
    order = order_v.gather(1, order_c)  # [F, N] point indices sorted by (class, value)
    vs = v.gather(1, order)
    cls_s = torch.sort(ck).values  # class of each sorted position (same for all columns)
    start = torch.searchsorted(cls_s, cls_s, side="left")
    end = torch.searchsorted(cls_s, cls_s, side="right")
    ks = k_i[torch.sort(ck, stable=True).indices]  # k per sorted position (depends on class only)
    d = kth_1d_sorted(vs, ks, start, end)  # [F, N]
    full_sorted = torch.sort(v, dim=1).values
    m = strict_counts_sorted(full_sorted, vs, d) + (d == 0).long()  # itself included
    dev = Xz.device
    psi = torch.special.digamma
    value = psi(torch.tensor(float(N), dtype=torch.float64, device=dev)) + psi(ks.to(torch.float64)).mean()
    value = value - psi(class_size.to(torch.float64)).mean() - psi(m.to(torch.float64)).mean(dim=1)
    return value
