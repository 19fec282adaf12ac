"""Hypothesis helpers for the fuzz tests of arr_coc.analysis and arr_coc.inference.

``tensors()`` draws hostile tensors (any rank / size / dtype, a poisoned NaN or inf entry,
huge or tiny magnitudes); ``check(fn, names, ...)`` calls fn and accepts only a ValueError
whose message names one of ``names`` or a result without NaN (and without inf unless
allowed).
"""

from __future__ import annotations

import math
import re

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

__all__ = ["DTYPES", "FUZZ", "check", "tensors"]

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.bool, torch.complex64]
POISON = [None, None, math.nan, math.inf, -math.inf]
MAGNITUDE = [1.0, 1.0, 1e-30, 1e30, 1e300, 0.0]


@st.composite
def tensors(draw, shape=None, dtypes=DTYPES, rank=(0, 3), size=(0, 4)):
    """A tensor of the given (or a random) shape, dtype, magnitude and one poisoned entry."""
    if shape is None:
        shape = tuple(draw(st.integers(*size)) for _ in range(draw(st.integers(*rank))))
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * draw(st.sampled_from(MAGNITUDE))
    poison = draw(st.sampled_from(POISON))
    if poison is not None and x.numel():
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = poison
    if dtype == torch.bool:
        return x > 0
    if not (dtype.is_floating_point or dtype.is_complex):
        return torch.nan_to_num(x, nan=0.0, posinf=2**40, neginf=-(2**40)).clamp(-(2**40), 2**40).round().to(dtype)
    return x.to(dtype)


def _leaves(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _leaves(o)
    elif isinstance(out, dict):
        for o in out.values():
            yield from _leaves(o)
    elif isinstance(out, (int, float)) and not isinstance(out, bool):
        yield torch.tensor(float(out), dtype=torch.float64)
    elif hasattr(out, "__dataclass_fields__"):
        for f in out.__dataclass_fields__:
            yield from _leaves(getattr(out, f))


def _name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def check(fn, names, *args, allow_inf=False, **kwargs):
    """Call fn: a ValueError naming one of ``names``, or a result with no NaN (and no inf)."""
    try:
        out = fn(*args, **kwargs)
    except ValueError as e:
        assert any(re.search(rf"\b{re.escape(n)}\b", str(e)) for n in names), f"{_name(fn)}: {e!s} names none of {names}"
        return None
    for t in _leaves(out):
        if t.is_floating_point() and t.element_size() == 1:
            t = t.float()  # float8 codes: torch has no isfinite for them; the upcast is exact
        if t.is_floating_point() or t.is_complex():
            assert not torch.isnan(t).any(), f"{_name(fn)} returned NaN"
            if not allow_inf:
                assert torch.isfinite(t).all(), f"{_name(fn)} returned inf"
    return out
