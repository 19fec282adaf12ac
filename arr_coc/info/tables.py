"""Information measures of probability tables.

A table is a probability tensor whose trailing dimensions are the variables and whose
leading dimensions are a batch: ``pmf [..., X]``, ``joint [..., X, Y]``,
``joint [..., X, Y, Z]``. Every function returns ``[...]`` in the unit of ``base``
(e: nats, the default; 2: bits), computed in float64 (float32 for large float32 tables),
on the table's device. ``0 log 0 = 0``, and its gradient there is taken as 0 (finite; the
one-sided derivative of ``-p log p`` at 0 is ``+inf``).

Each table must sum to 1 within a tolerance that fits its dtype and length (see
``arr_coc.info._validate.table_tolerance``: about 1.6e-2 for bfloat16, 3.5e-4 for float32
tables of up to a million entries, growing as the square root of the length); it is then
renormalised by its float64 sum and measured in float64, so the results are exactly those
of a probability table. Mutual informations are clipped at 0: a negative value could only
be rounding (``-1e-17`` for an exact product table).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from arr_coc.info._validate import check_table, from_nats

__all__ = [
    "conditional_entropy",
    "conditional_mutual_information",
    "entropy",
    "joint_entropy",
    "mutual_information",
    "normalized_mutual_information",
]


def _h(p: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Entropy in nats of an already validated table over ``dims``; ``0 log 0 = 0`` with a
    zero gradient there (``xlogy`` would give ``0 / 0 = NaN`` for it)."""
    pos = p > 0
    return -torch.where(pos, p * torch.log(torch.where(pos, p, torch.ones_like(p))), torch.zeros_like(p)).sum(dim=dims)


def entropy(pmf: torch.Tensor, *, base: float = math.e) -> torch.Tensor:
    """H(X) of ``pmf [..., X]`` -> ``[...]``."""
    p = check_table("pmf", pmf, 1)
    return from_nats(_h(p, (-1,)), base)


def joint_entropy(joint: torch.Tensor, *, base: float = math.e) -> torch.Tensor:
    """H(X, Y) of ``joint [..., X, Y]`` -> ``[...]``."""
    p = check_table("joint", joint, 2)
    return from_nats(_h(p, (-2, -1)), base)


def conditional_entropy(joint: torch.Tensor, *, base: float = math.e) -> torch.Tensor:
    """H(X | Y) = H(X, Y) - H(Y) of ``joint [..., X, Y]`` -> ``[...]``."""
    p = check_table("joint", joint, 2)
    h = _h(p, (-2, -1)) - _h(p.sum(-2), (-1,))
    return from_nats(h, base)


def mutual_information(joint: torch.Tensor, *, base: float = math.e) -> torch.Tensor:
    """I(X; Y) = H(X) + H(Y) - H(X, Y) of ``joint [..., X, Y]`` -> ``[...]``."""
    p = check_table("joint", joint, 2)
    i = _h(p.sum(-1), (-1,)) + _h(p.sum(-2), (-1,)) - _h(p, (-2, -1))
    return from_nats(i.clamp(min=0.0), base)


def conditional_mutual_information(joint: torch.Tensor, *, base: float = math.e) -> torch.Tensor:
    """I(X; Y | Z) = H(X,Z) + H(Y,Z) - H(X,Y,Z) - H(Z) of ``joint [..., X, Y, Z]`` -> ``[...]``."""
    p = check_table("joint", joint, 3)
    i = _h(p.sum(-2), (-2, -1)) + _h(p.sum(-3), (-2, -1)) - _h(p, (-3, -2, -1)) - _h(p.sum((-3, -2)), (-1,))
    return from_nats(i.clamp(min=0.0), base)


def normalized_mutual_information(
    joint: torch.Tensor, *, average: Literal["arithmetic", "geometric", "min", "max"] = "arithmetic"
) -> torch.Tensor:
    """I(X; Y) / mean(H(X), H(Y)) of ``joint [..., X, Y]`` -> ``[...]`` in [0, 1] (unitless).

    ``average`` picks the normaliser as in scikit-learn's ``normalized_mutual_info_score``
    (arithmetic by default). A constant variable carries no information: the result is 0
    (not NaN) whenever the normaliser is 0.
    """
    p = check_table("joint", joint, 2)
    hx, hy = _h(p.sum(-1), (-1,)), _h(p.sum(-2), (-1,))
    i = hx + hy - _h(p, (-2, -1))
    if average == "arithmetic":
        norm = (hx + hy) / 2
    elif average == "geometric":
        norm = (hx * hy).sqrt()
    elif average == "min":
        norm = torch.minimum(hx, hy)
    elif average == "max":
        norm = torch.maximum(hx, hy)
    else:
        raise ValueError(f"average: expected 'arithmetic', 'geometric', 'min' or 'max', got {average!r}")
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    return torch.where(norm > 0, (i / safe).clamp(0.0, 1.0), torch.zeros_like(i))
