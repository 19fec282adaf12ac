"""Pipeline-parallel planning from per-layer measurements, and the gradient-noise trade-off
of the micro-batch size.

Stage split: contiguous layers into S stages, minimising the slowest stage's compute (the
pipeline's clock is set by its slowest stage); among splits within ``tolerance`` of that
optimum, the one that sends the fewest activation bytes across stage boundaries. Solved
exactly by dynamic programming over (layer, stage).

Bubble fraction (GPipe / 1F1B schedules with S equal stages and m micro-batches): each stage
is busy for m micro-batch slots out of the m + S - 1 slots that one pipeline flush takes, so
the idle fraction is ``(S - 1) / (m + S - 1)`` (Huang et al. 2019). Narayanan et al. (2021)
quote the same bubble as ``(S - 1) / m`` of the *ideal* time; ours is the fraction of the
*actual* time, which stays in [0, 1).

Gradient signal-to-noise ratio for a micro-batch of size b: with per-example gradients g_i
of mean mu and total variance tr(Sigma), ``SNR(b) = ||mu||^2 / (tr(Sigma) / b)``, which grows
linearly in b until the micro-batch gradient is mostly signal; measured from per-example
gradients, ``||mu||^2`` estimated without bias (``||mean||^2 - tr(Sigma)/n``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["StagePlan", "bubble_fraction", "gradient_snr", "per_example_gradients", "plan_stages"]


def _check_int(name: str, v: object, lo: int = 1) -> int:
    """An int >= lo (bools and floats refused; numpy / torch integer scalars accepted)."""
    if isinstance(v, bool) or isinstance(v, float):
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    try:
        i = operator.index(v)
    except TypeError:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}") from None
    if i < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    return i


def _check_costs(name: str, values: object) -> list[float]:
    """A sequence of finite non-negative real numbers -> list of floats."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(f"{name}: expected a sequence of finite non-negative numbers, got {type(values).__name__}")
    out = []
    for v in values:
        if isinstance(v, (bool, complex, str, bytes)) or (isinstance(v, torch.Tensor) and (v.numel() != 1 or v.is_complex())):
            raise ValueError(f"{name}: expected finite non-negative real numbers, got {v!r}")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected finite non-negative real numbers, got {v!r}") from None
        if not math.isfinite(f) or f < 0:
            raise ValueError(f"{name}: expected finite non-negative real numbers, got {v!r}")
        out.append(f)
    if not math.isfinite(sum(out)):
        raise ValueError(f"{name}: the total overflows a float")
    return out


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """Idle fraction ``(S - 1) / (m + S - 1)`` of a flushed pipeline."""
    s = _check_int("num_stages", num_stages)
    m = _check_int("num_microbatches", num_microbatches)
    return (s - 1) / (m + s - 1)


@dataclass
class StagePlan:
    boundaries: list[int]  # index of the first layer of each stage after the first
    stage_compute: list[float]
    max_compute: float
    bytes_sent: float  # activation bytes crossing stage boundaries per example
    balance: float  # mean stage compute / max stage compute (1 = perfect)


def plan_stages(
    compute: Sequence[float],
    activation_bytes: Sequence[float],
    num_stages: int,
    *,
    tolerance: float = 0.05,
) -> StagePlan:
    """Split layers 0..L-1 into ``num_stages`` contiguous stages (see module doc).

    compute[l]: cost of layer l (seconds or FLOPs); activation_bytes[l]: size of layer l's
    output, which is sent to the next stage when a boundary follows layer l.
    """
    compute = _check_costs("compute", compute)
    activation_bytes = _check_costs("activation_bytes", activation_bytes)
    L = len(compute)
    if len(activation_bytes) != L:
        raise ValueError(f"activation_bytes: expected {L} entries like compute, got {len(activation_bytes)}")
    num_stages = _check_int("num_stages", num_stages)
    if not 1 <= num_stages <= L:
        raise ValueError(f"num_stages: expected 1 <= S <= {L} layers, got {num_stages}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance: expected a finite number >= 0, got {tolerance!r}")
    prefix = [0.0]
    for c in compute:
        prefix.append(prefix[-1] + c)
    inf = float("inf")

    def best_max() -> float:
        # dp[s][l]: minimal max-stage cost of layers [0, l) in s stages
        dp = [[inf] * (L + 1) for _ in range(num_stages + 1)]
        dp[0][0] = 0.0
        for s in range(1, num_stages + 1):
            for l in range(s, L + 1):
                dp[s][l] = min(max(dp[s - 1][j], prefix[l] - prefix[j]) for j in range(s - 1, l))
        return dp[num_stages][L]

    # relative slack only (an absolute one would admit every split of tiny costs); the
    # optimal split's stage sums are the same float expressions as in best_max, so it passes
    cap = best_max() * (1 + tolerance) * (1 + 1e-12)
    # second pass: fewest bytes sent among splits whose every stage is within the cap
    cost = [[inf] * (L + 1) for _ in range(num_stages + 1)]
    back = [[-1] * (L + 1) for _ in range(num_stages + 1)]
    cost[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for l in range(s, L + 1):
            for j in range(s - 1, l):
                if prefix[l] - prefix[j] > cap or cost[s - 1][j] == inf:
                    continue
                sent = cost[s - 1][j] + (activation_bytes[j - 1] if j > 0 else 0.0)
                if sent < cost[s][l]:
                    cost[s][l], back[s][l] = sent, j
    bounds, l = [], L
    for s in range(num_stages, 0, -1):
        j = back[s][l]
        bounds.append(j)
        l = j
    starts = sorted(bounds)[1:]  # drop the 0 of the first stage
    edges = [0, *starts, L]
    stage_compute = [prefix[b] - prefix[a] for a, b in zip(edges[:-1], edges[1:])]
    mx = max(stage_compute)
    return StagePlan(
        boundaries=starts,
        stage_compute=stage_compute,
        max_compute=mx,
        bytes_sent=cost[num_stages][L],
        balance=(sum(stage_compute) / num_stages / mx) if mx > 0 else 1.0,
    )


def per_example_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, int], torch.Tensor],
    num_examples: int,
    params: Sequence[nn.Parameter] | None = None,
) -> torch.Tensor:
    """[n, P] flattened gradients of ``loss_fn(model, i)`` (the loss of example i), float64.

    ``loss_fn(model, i)`` must return a finite real scalar tensor; a non-finite gradient is an
    error (ValueError naming ``loss_fn``), never a silent NaN row.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise ValueError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
    n = _check_int("num_examples", num_examples)
    params = [p for p in (model.parameters() if params is None else params) if isinstance(p, torch.Tensor) and p.requires_grad]
    if not params:
        raise ValueError("params: no parameter requires a gradient")
    if any(not p.is_floating_point() for p in params):
        raise ValueError("params: expected floating-point parameters")
    rows = []
    for i in range(n):
        loss = loss_fn(model, i)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            raise ValueError(f"loss_fn: expected a real scalar tensor for example {i}, got {getattr(loss, 'shape', type(loss))}")
        if not loss.requires_grad:
            raise ValueError(f"loss_fn: the loss of example {i} does not depend on params")
        grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
        row = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, p in zip(grads, params)])
        if not torch.isfinite(row).all():
            raise ValueError(f"loss_fn: non-finite gradient (NaN or inf) at example {i}")
        rows.append(row)
    return torch.stack(rows)


def gradient_snr(per_example: torch.Tensor, batch_sizes: Sequence[int]) -> dict[int, float]:
    """SNR(b) = ||mu||^2 / (tr(Sigma) / b) from per-example gradients [n, P].

    Identical gradients (tr(Sigma) = 0) give inf for a non-zero mean and 0 for a zero mean.
    """
    if not isinstance(per_example, torch.Tensor) or per_example.dim() != 2 or per_example.shape[0] < 2 or per_example.shape[1] < 1:
        raise ValueError(f"per_example: expected [n, P] gradients with n >= 2, P >= 1, got {getattr(per_example, 'shape', type(per_example))}")
    if per_example.is_complex() or per_example.dtype == torch.bool:
        raise ValueError(f"per_example: expected real gradients, got {per_example.dtype}")
    if not torch.isfinite(per_example).all():
        raise ValueError("per_example: expected finite values, found NaN or inf")
    if isinstance(batch_sizes, (str, bytes)) or not hasattr(batch_sizes, "__iter__"):
        raise ValueError(f"batch_sizes: expected a sequence of ints >= 1, got {batch_sizes!r}")
    sizes = [_check_int("batch_sizes", b) for b in batch_sizes]
    # scale-free: divide by the largest magnitude first so squares cannot overflow float64
    per_example = per_example.double()
    peak = per_example.abs().amax()
    if peak > 0:
        per_example = per_example / peak
    n = per_example.shape[0]
    mean = per_example.mean(0)
    trace = (per_example - mean).pow(2).sum(1).sum() / (n - 1)
    signal = (mean.pow(2).sum() - trace / n).clamp_min(0.0)
    out = {}
    for b in sizes:
        if trace > 0:
            out[b] = float(signal / (trace / b))
        else:  # no noise: infinite SNR unless there is no signal either
            out[b] = float("inf") if signal > 0 else 0.0
    return out
