"""Property-based fuzz of every public function of ``arr_coc.info`` (issue 17, item 15).

Inputs: NaN, inf, empty, wrong rank, wrong dtype, mismatched lengths, huge and tiny
magnitudes, ties, constants - and valid ones. The outcome must be a ``ValueError`` whose
message starts with the argument it is about (``"x: expected ..."``), or a value with no NaN; never another
exception type. Values must be finite too, except for the infinities the docstrings document
(``kl_entropy`` of data with atoms: ``-inf``; ``gaussian_mi`` / ``gaussian_cmi`` of an exact
linear relation: ``+inf``).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import arr_coc.info as info
from arr_coc.info import pearson

FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPES = FLOATS + [torch.int64, torch.int32, torch.bool, torch.complex64]


KINDS = ["normal", "ties", "constant", "huge", "tiny", "mixed"]


def _values(kind: str, shape: list[int], g: torch.Generator) -> torch.Tensor:
    """float64 values of the given kind: Gaussian, tied integers, a constant, magnitudes near
    the float64 limits, or magnitudes spread over 400 orders."""
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "ties":
        return torch.randint(-2, 3, shape, generator=g).double()
    if kind == "constant":
        return torch.full(shape, 3.5, dtype=torch.float64)
    if kind == "huge":
        return v * 1e300
    if kind == "tiny":
        return v * 1e-300
    if kind == "mixed":
        return v * torch.tensor(10.0, dtype=torch.float64) ** torch.randint(-200, 200, shape, generator=g).double()
    return v


@st.composite
def samples(draw, n: int, integer: bool = False, broken: bool = False) -> torch.Tensor:
    """A sample tensor ``[n]`` or ``[n, d]`` with valid but nasty values (huge, tiny, tied,
    constant), or, if ``broken``, one with a fault: NaN or inf, empty, wrong rank, wrong
    dtype, or a mismatched length."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = "ties" if integer else draw(st.sampled_from(KINDS))
    dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.bool] if integer else FLOATS + [torch.int64]))
    shape = [n] if draw(st.booleans()) else [n, draw(st.integers(1, 3))]
    special = None
    if broken:
        fault = draw(st.sampled_from(["special", "empty", "rank", "dtype", "length"]))
        if fault == "special":
            dtype = draw(st.sampled_from(FLOATS))
            special = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        elif fault == "empty":
            shape = [0] if draw(st.booleans()) else [n, 0]
        elif fault == "rank":
            shape = [] if draw(st.booleans()) else [n, 2, 2]
        elif fault == "dtype":
            dtype = draw(st.sampled_from([torch.complex64, torch.complex128] + (FLOATS if integer else [])))
        else:
            shape[0] = draw(st.integers(0, 12).filter(lambda m: m != n))
    v = _values(kind, shape, g)
    if special is not None and v.numel():
        v.view(-1)[draw(st.integers(0, v.numel() - 1))] = special
    if dtype == torch.bool:
        return v > 0
    if not dtype.is_floating_point and not dtype.is_complex:
        return v.clamp(-1e6, 1e6).to(dtype)
    return v.to(dtype)


@st.composite
def tables(draw, dims: int) -> torch.Tensor:
    """A probability table with ``dims`` variable dimensions (plus maybe a batch) in a float
    dtype, with zeros and tiny entries; half of the time broken: NaN, inf, a negative or huge
    entry, not normalised, empty, too few dimensions or an integer/bool/complex dtype."""
    shape = [draw(st.integers(1, 4)) for _ in range(dims + draw(st.integers(0, 1)))]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    p = torch.rand(shape, generator=g, dtype=torch.float64) ** draw(st.sampled_from([1, 8, 40]))
    if draw(st.booleans()):
        p = p * (torch.rand(shape, generator=g, dtype=torch.float64) > 0.5)
        p.view(-1)[0] = 1.0  # never all zero
    vd = tuple(range(len(shape) - dims, len(shape)))
    s = p.sum(dim=vd, keepdim=True)
    p = torch.where(s > 0, p / torch.where(s > 0, s, torch.ones_like(s)), torch.full_like(p, 1.0 / math.prod(shape[-dims:])))
    dtype = draw(st.sampled_from(FLOATS))
    if draw(st.booleans()):
        fault = draw(st.sampled_from(["special", "scale", "empty", "rank", "dtype"]))
        if fault == "special":
            p.view(-1)[draw(st.integers(0, p.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -0.5, 1e300]))
        elif fault == "scale":
            p = p * draw(st.sampled_from([0.5, 1.1, 1e-300]))
        elif fault == "empty":
            p = p[..., :0]
        elif fault == "rank":
            p = p.reshape(-1)[: shape[-1]] if dims > 1 else p.sum()
        else:
            dtype = draw(st.sampled_from([torch.int64, torch.bool, torch.complex64]))
    return p > 0 if dtype == torch.bool else p.to(dtype)


@st.composite
def scores(draw) -> torch.Tensor:
    n = draw(st.integers(0, 6))
    shape = [draw(st.integers(1, 2))] * draw(st.integers(0, 1)) + [n, n if draw(st.integers(0, 5)) else n + 1]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    s = torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([1.0, 1e3, 1e300, 1e-300]))
    special = draw(st.sampled_from([None, None, math.nan, math.inf, -math.inf]))
    if special is not None and s.numel():
        s.view(-1)[draw(st.integers(0, s.numel() - 1))] = special
    return s.to(draw(st.sampled_from(FLOATS * 2 + DTYPES)))


@st.composite
def call_args(draw, fn: str):
    """(positional args, argument names) for one call of ``fn``; half of the calls have one
    broken sample argument."""
    n = draw(st.integers(1, 12))
    bad = draw(st.integers(0, 5))  # which sample argument is broken (none if past the last)
    smp = lambda i, integer=False: samples(n, integer=integer, broken=bad == i)  # noqa: E731
    if fn in ("entropy",):
        return (draw(tables(1)),), ["pmf"]
    if fn in ("joint_entropy", "conditional_entropy", "mutual_information", "normalized_mutual_information"):
        return (draw(tables(2)),), ["joint"]
    if fn == "conditional_mutual_information":
        return (draw(tables(3)),), ["joint"]
    if fn == "discrete_entropy":
        return (draw(smp(0, True)),), ["x"]
    if fn == "discrete_mi":
        return (draw(smp(0, True)), draw(smp(1, True))), ["x", "y"]
    if fn == "discrete_cmi":
        return tuple(draw(smp(i, True)) for i in range(3)), ["x", "y", "z"]
    if fn == "information_gain":
        return (draw(smp(0, True)), draw(smp(1, True))), ["target", "feature"]
    if fn in ("ksg_mi", "gaussian_mi", "pearson", "spearman", "distance_correlation"):
        return (draw(smp(0)), draw(smp(1))), ["x", "y", "k"]
    if fn in ("ksg_cmi", "gaussian_cmi"):
        return tuple(draw(smp(i)) for i in range(3)), ["x", "y", "z", "k"]
    if fn == "kl_entropy":
        return (draw(smp(0)),), ["x", "k"]
    if fn == "mi_features":
        X = draw(smp(0))
        X = X[:, None] if X.dim() == 1 and draw(st.booleans()) else X
        y = draw(smp(1, draw(st.booleans())))
        y = y[:, 0] if y.dim() == 2 and y.shape[1] and draw(st.booleans()) else y
        discrete = y.dtype in (torch.int64, torch.int32, torch.bool) and draw(st.booleans())
        return (X, y, 3, discrete), ["X", "y", "k"]
    if fn == "permutation_test":
        return (lambda a, b: pearson(a, b).abs().sum(), draw(smp(0)), draw(smp(1)), 5), ["statistic", "x", "y"]
    if fn in ("infonce_lower_bound", "nwj_lower_bound"):
        return (draw(scores()),), ["scores"]
    raise AssertionError(f"no fuzz inputs for {fn}")


# the infinities the docstrings document
ALLOWED_INF = {"kl_entropy": -math.inf, "gaussian_mi": math.inf, "gaussian_cmi": math.inf}


def test_every_public_function_is_fuzzed():
    assert set(info.__all__) <= set(_FUNCTIONS)


_FUNCTIONS = sorted(info.__all__)


@pytest.mark.parametrize("fn", _FUNCTIONS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzz(fn, data):
    args, names = data.draw(call_args(fn))
    if fn == "mi_features":
        *args, discrete = args
        call = lambda: info.mi_features(*args, discrete_target=discrete)  # noqa: E731
    else:
        call = lambda: getattr(info, fn)(*args)  # noqa: E731
    try:
        out = call()
    except ValueError as exc:
        msg = str(exc)
        alt = "|".join(map(re.escape, names))
        assert re.match(rf"({alt})( and ({alt}))*:", msg), f"{fn}: the error does not start with the argument it is about: {msg}"
        return
    out = torch.as_tensor(out)
    assert not torch.isnan(out).any(), f"{fn} returned NaN"
    finite = torch.isfinite(out)
    if not bool(finite.all()):
        assert fn in ALLOWED_INF and bool((out[~finite] == ALLOWED_INF[fn]).all()), f"{fn} returned {out}"


# ----------------------------------------------------------------------------- what the fuzz found


def test_correlations_of_values_near_the_float_limits():
    # pearson and distance_correlation used to square values of 1e300 into inf and return NaN
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=g, dtype=torch.float64)
    y = x + torch.randn(50, generator=g, dtype=torch.float64)
    for scale in (1e300, 1e-300):
        assert info.pearson(x * scale, y * scale).item() == pytest.approx(info.pearson(x, y).item(), abs=1e-12)
        assert info.distance_correlation(x * scale, y).item() == pytest.approx(info.distance_correlation(x, y).item(), abs=1e-10)
        X = torch.stack([x, y], 1)
        assert info.distance_correlation(X * scale, y, method="tiled").item() == pytest.approx(
            info.distance_correlation(X, y, method="tiled").item(), abs=1e-10
        )


def test_nwj_overflow_is_a_value_error_not_minus_inf():
    s = torch.zeros(4, 4, dtype=torch.float64)
    s[0, 1] = 800.0  # e^799 overflows float64
    with pytest.raises(ValueError, match="scores: the NWJ bound overflows"):
        info.nwj_lower_bound(s)
    s[0, 1] = 1e308
    s[1, 1] = -1e308
    with pytest.raises(ValueError, match="scores: the InfoNCE bound overflows"):
        info.infonce_lower_bound(s)


def test_kl_entropy_near_the_float_limits():
    # squared Euclidean distances of 1e300 overflowed (+inf) and of 1e-300 underflowed (-inf)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 2, generator=g, dtype=torch.float64)
    h = info.kl_entropy(x).item()
    for scale in (1e300, 1e-300):
        assert info.kl_entropy(x * scale).item() == pytest.approx(h + 2 * math.log(scale), abs=1e-9)
