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

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["StagePlan", "bubble_fraction", "gradient_snr", "per_example_gradients", "plan_stages"]


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """Idle fraction ``(S - 1) / (m + S - 1)`` of a flushed pipeline."""
    if num_stages < 1 or num_microbatches < 1:
        raise ValueError(
            f"num_stages, num_microbatches: expected positive ints, got {num_stages}, {num_microbatches}"
        )
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


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
    L = len(compute)
    if len(activation_bytes) != L:
        raise ValueError(f"activation_bytes: expected {L} entries like compute, got {len(activation_bytes)}")
    if not 1 <= num_stages <= L:
        raise ValueError(f"num_stages: expected 1 <= S <= {L} layers, got {num_stages}")
    if any(c < 0 for c in compute) or any(a < 0 for a in activation_bytes):
        raise ValueError("compute, activation_bytes: expected non-negative numbers")
    prefix = [0.0]
    for c in compute:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")

    def best_max() -> float:
        # dp[s][l]: minimal max-stage cost of layers [0, l) in s stages
        dp = [[inf] * (L + 1) for _ in range(num_stages + 1)]
        dp[0][0] = 0.0
        for s in range(1, num_stages + 1):
            for l in range(s, L + 1):
                dp[s][l] = min(max(dp[s - 1][j], prefix[l] - prefix[j]) for j in range(s - 1, l))
        return dp[num_stages][L]

    cap = best_max() * (1 + tolerance) + 1e-12
    # second pass: fewest bytes sent among splits whose every stage is within the cap
    cost = [[inf] * (L + 1) for _ in range(num_stages + 1)]
    back = [[-1] * (L + 1) for _ in range(num_stages + 1)]
    cost[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for l in range(s, L + 1):
            for j in range(s - 1, l):
                if prefix[l] - prefix[j] > cap or cost[s - 1][j] == inf:
                    continue
                sent = cost[s - 1][j] + (float(activation_bytes[j - 1]) if j > 0 else 0.0)
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
    """[n, P] flattened gradients of ``loss_fn(model, i)`` (the loss of example i)."""
    params = [p for p in (params or model.parameters()) if p.requires_grad]
    if not params:
        raise ValueError("params: no parameter requires a gradient")
    rows = []
    for i in range(num_examples):
        grads = torch.autograd.grad(loss_fn(model, i), params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows).double()


def gradient_snr(per_example: torch.Tensor, batch_sizes: Sequence[int]) -> dict[int, float]:
    """SNR(b) = ||mu||^2 / (tr(Sigma) / b) from per-example gradients [n, P]."""
    if per_example.dim() != 2 or per_example.shape[0] < 2:
        raise ValueError("per_example: expected [n, P] gradients with n >= 2")
    n = per_example.shape[0]
    mean = per_example.mean(0)
    trace = (per_example - mean).pow(2).sum(1).sum() / (n - 1)
    signal = (mean.pow(2).sum() - trace / n).clamp_min(0.0)
    out = {}
    for b in batch_sizes:
        if b < 1:
            raise ValueError(f"batch_sizes: expected positive sizes, got {b}")
        out[int(b)] = float(signal / (trace / b)) if trace > 0 else float("inf")
    return out
