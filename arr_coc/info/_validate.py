"""Input checks shared by the information measures: every failure is a ``ValueError`` that
names the argument and says what was expected.

Also the two small numeric conventions every module uses: the working dtype (float64, or
float32 for large float32 inputs) and the change of logarithm base.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "LARGE_FLOAT32",
    "check_base",
    "check_k",
    "check_samples",
    "check_same_n",
    "check_table",
    "table_tolerance",
    "check_integer_samples",
    "from_nats",
    "work_dtype",
]

# A float32 input with at least this many elements is computed in float32 (memory and
# speed matter more there than the last digits); everything else in float64.
LARGE_FLOAT32 = 1 << 24


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """float64, or float32 when ``t`` is float32 and large (>= 2**24 elements)."""
    if t.dtype == torch.float32 and t.numel() >= LARGE_FLOAT32:
        return torch.float32
    return torch.float64


def check_base(base: float) -> float:
    """Return ``log(base)`` (to divide nats by); ``base`` must be positive and not 1."""
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 0 or base == 1:
        raise ValueError(f"base: expected a finite positive number other than 1 (e for nats, 2 for bits), got {base!r}")
    return math.log(base)


def from_nats(value: torch.Tensor, base: float) -> torch.Tensor:
    """Convert nats to the unit of ``base`` (e: unchanged)."""
    log_base = check_base(base)
    return value if log_base == 1.0 else value / log_base


def _finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values, found NaN or Inf")


def table_tolerance(dtype: torch.dtype, size: int) -> float:
    """How far from 1 a table of ``size`` entries stored in ``dtype`` may sum.

    ``max(floor, 16 eps_acc sqrt(size))``: the floor is ``sqrt(eps)`` of the dtype for 32- and
    64-bit floats (about 3.5e-4 for float32, 1.5e-8 for float64; tables typed by hand or
    converted from float32 pass) and ``2 eps`` for 16-bit floats (about 1.6e-2 for bfloat16,
    2e-3 for float16: rounding each entry moves the sum by at most ``eps / 2``); the second
    term is the rounding a producer's summation accumulates over ``size`` entries (``eps_acc``
    of float32 for 16- and 32-bit tables, which are normalised in float32, of float64 for
    float64): a float32 softmax over 4 million entries sums to 1 only within about 4e-4.
    """
    eps = torch.finfo(dtype).eps
    floor = math.sqrt(eps) if torch.finfo(dtype).bits >= 32 else 2 * eps
    acc = torch.finfo(torch.float64).eps if dtype == torch.float64 else torch.finfo(torch.float32).eps
    return max(floor, 16 * acc * math.sqrt(size))


def check_table(name: str, p: torch.Tensor, min_dims: int) -> torch.Tensor:
    """A probability table whose last ``min_dims`` dimensions are variables.

    Checks: a floating tensor, at least ``min_dims`` dimensions, non-empty, finite,
    non-negative, each table summing to 1 within ``table_tolerance(dtype, table size)`` (a
    tolerance that fits the input's precision and length). Returns it in the working dtype
    (float64; float32 for large float32 inputs), each table renormalised by its float64 sum,
    so that the measures are those of a probability table (a bfloat16 table's rounding can
    never make a mutual information negative).
    """
    if not isinstance(p, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(p).__name__}")
    if not (p.is_floating_point()):
        raise ValueError(f"{name}: expected a floating-point probability table, got dtype {p.dtype}")
    if p.dim() < min_dims:
        raise ValueError(f"{name}: expected at least {min_dims} dimension(s) (the variables), got shape {tuple(p.shape)}")
    if p.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty table, got shape {tuple(p.shape)}")
    _finite(name, p)
    if bool((p < 0).any()):
        raise ValueError(f"{name}: expected non-negative probabilities, found a negative entry")
    dt = work_dtype(p)
    dims = tuple(range(p.dim() - min_dims, p.dim()))
    total = p.sum(dim=dims, dtype=torch.float64, keepdim=True)
    tol = table_tolerance(p.dtype, math.prod(p.shape[p.dim() - min_dims :]))
    if bool(((total - 1).abs() > tol).any()):
        worst = float((total - 1).abs().max())
        raise ValueError(f"{name}: expected each table to sum to 1 (tolerance {tol:.1e}), off by up to {worst:.3g}")
    return p.to(dt) / total.to(dt)


def check_samples(name: str, x: torch.Tensor, *, n: int | None = None, min_n: int = 1) -> torch.Tensor:
    """Continuous samples ``[n]`` or ``[n, d]``; returns ``[n, d]`` in the working dtype."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (1, 2):
        raise ValueError(f"{name}: expected samples of shape [n] or [n, d], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or (x.dim() == 2 and x.shape[1] == 0):
        raise ValueError(f"{name}: expected a non-empty sample, got shape {tuple(x.shape)}")
    if x.is_complex():
        raise ValueError(f"{name}: expected real values, got dtype {x.dtype}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name}: expected {n} samples (the length of the first argument), got {x.shape[0]}")
    if x.shape[0] < min_n:
        raise ValueError(f"{name}: expected at least {min_n} samples, got {x.shape[0]}")
    if x.is_floating_point():
        _finite(name, x)
    x2 = x.reshape(x.shape[0], -1) if x.dim() == 2 else x.reshape(-1, 1)
    return x2.to(work_dtype(x))


def check_integer_samples(name: str, x: torch.Tensor, *, n: int | None = None) -> torch.Tensor:
    """Discrete samples ``[n]`` or ``[n, d]`` of an integer or bool dtype; returns ``[n, d]`` long."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex():
        raise ValueError(f"{name}: expected integer (or bool) samples, got dtype {x.dtype}; discretize first")
    if x.dim() not in (1, 2):
        raise ValueError(f"{name}: expected samples of shape [n] or [n, d], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or (x.dim() == 2 and x.shape[1] == 0):
        raise ValueError(f"{name}: expected a non-empty sample, got shape {tuple(x.shape)}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name}: expected {n} samples (the length of the first argument), got {x.shape[0]}")
    return (x if x.dim() == 2 else x.reshape(-1, 1)).long()


def check_same_n(**tensors: torch.Tensor) -> int:
    """All tensors have the same first dimension; returns it."""
    ns = {k: v.shape[0] for k, v in tensors.items()}
    first = next(iter(ns.values()))
    for k, v in ns.items():
        if v != first:
            raise ValueError(f"{k}: expected {first} samples like the other inputs, got {v} ({ns})")
    return first


def check_k(k: int, n: int, *, name: str = "k") -> int:
    """Neighbour count: an int with ``1 <= k < n``."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"{name}: expected an int, got {type(k).__name__}")
    if not 1 <= k < n:
        raise ValueError(f"{name}: expected 1 <= {name} < n = {n} (the number of samples), got {k}")
    return k
