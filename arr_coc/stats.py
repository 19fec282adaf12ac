"""Intervals and paired tests for accuracy tables (what a reviewer of pruning papers asks for).

```python
lo, hi = bootstrap_interval(correct)                        # correct: [S, Q] 0/1 (seeds x questions)
d, (lo, hi), p = paired_bootstrap(correct_a, correct_b)     # difference of means, interval, two-sided p
b, c, p = mcnemar(correct_a[0], correct_b[0])               # exact McNemar on one seed's questions
```

Resampling: the questions of an evaluation set are a sample of the task's questions and the
training seeds a sample of training runs, so an interval must include both. With ``[S, Q]``
correctness (S seeds, the same Q questions for every seed) one bootstrap draw resamples the
S seeds with replacement *and* the Q questions with replacement (the same questions for every
seed drawn: the questions are shared) and takes the mean. With S = 1 it is the ordinary
question bootstrap. Paired comparisons draw the same seeds and questions for both rows.
"""

from __future__ import annotations

import math

import torch

__all__ = ["bootstrap_interval", "mcnemar", "paired_bootstrap"]


def _as_matrix(name: str, x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] < 1 or x.shape[0] < 1:
        raise ValueError(f"{name}: expected [Q] or [S, Q] with Q >= 1, got shape {tuple(x.shape)}")
    x = x.double()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: expected finite values")
    return x


def _draws(s: int, q: int, num: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    seeds = torch.randint(0, s, (num, s), generator=generator) if s > 1 else torch.zeros(num, 1, dtype=torch.long)
    questions = torch.randint(0, q, (num, q), generator=generator)
    return seeds, questions


def _resampled_means(x: torch.Tensor, seeds: torch.Tensor, questions: torch.Tensor, chunk: int = 200) -> torch.Tensor:
    """x [S, Q]; seeds [R, S]; questions [R, Q] -> [R] means of the resampled matrices."""
    out = []
    for i in range(0, seeds.shape[0], chunk):
        rows = x[seeds[i : i + chunk]]  # [r, S, Q]
        picked = rows.gather(2, questions[i : i + chunk, None, :].expand(-1, rows.shape[1], -1))
        out.append(picked.mean(dim=(1, 2)))
    return torch.cat(out)


def bootstrap_interval(
    correct: torch.Tensor, *, num: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``correct`` ([Q] or [S, Q]), resampling
    questions and (when S > 1) seeds (see the module docstring)."""
    if not 0 < level < 1:
        raise ValueError(f"level: expected in (0, 1), got {level}")
    if num < 1:
        raise ValueError(f"num: expected >= 1, got {num}")
    x = _as_matrix("correct", correct)
    g = torch.Generator().manual_seed(seed)
    means = _resampled_means(x, *_draws(x.shape[0], x.shape[1], num, g))
    a = (1 - level) / 2
    return float(means.quantile(a)), float(means.quantile(1 - a))


def paired_bootstrap(
    correct_a: torch.Tensor, correct_b: torch.Tensor, *, num: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, tuple[float, float], float]:
    """Mean(a) - mean(b), its percentile interval and a two-sided bootstrap p-value.

    ``correct_a`` / ``correct_b``: [Q] or [S, Q] over the same questions (and seeds, where
    both have S > 1; a training-free row with one seed is broadcast against the other's seeds).
    The p-value is 2 min(P(d* <= 0), P(d* >= 0)) over the resampled differences d* (clipped to
    1), the usual bootstrap test of "no difference".
    """
    a, b = _as_matrix("correct_a", correct_a), _as_matrix("correct_b", correct_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"correct_b: expected the same {a.shape[1]} questions as correct_a, got {b.shape[1]}")
    s = max(a.shape[0], b.shape[0])
    if a.shape[0] not in (1, s) or b.shape[0] not in (1, s):
        raise ValueError(f"correct_a / correct_b: seed counts {a.shape[0]} and {b.shape[0]} do not pair")
    diff = a.expand(s, -1) - b.expand(s, -1)
    g = torch.Generator().manual_seed(seed)
    d = _resampled_means(diff, *_draws(s, diff.shape[1], num, g))
    al = (1 - level) / 2
    p = min(1.0, 2.0 * min(float((d <= 0).double().mean()), float((d >= 0).double().mean())))
    return float(diff.mean()), (float(d.quantile(al)), float(d.quantile(1 - al))), p


def mcnemar(correct_a: torch.Tensor, correct_b: torch.Tensor) -> tuple[int, int, float]:
    """Exact (binomial) McNemar test on paired 0/1 outcomes [Q].

    Returns (b, c, p): b = questions a gets right and b wrong, c = the reverse, and the
    two-sided p-value 2 P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), clipped to 1
    (p = 1 when b + c = 0).
    """
    a = torch.as_tensor(correct_a).reshape(-1)
    bb = torch.as_tensor(correct_b).reshape(-1)
    if a.shape != bb.shape or a.numel() == 0:
        raise ValueError(f"correct_b: expected the same non-empty shape as correct_a {tuple(a.shape)}, got {tuple(bb.shape)}")
    for name, t in (("correct_a", a), ("correct_b", bb)):
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name}: expected 0/1 outcomes")
    a, bb = a.bool(), bb.bool()
    b = int((a & ~bb).sum())
    c = int((~a & bb).sum())
    n = b + c
    if n == 0:
        return b, c, 1.0
    k = min(b, c)
    # log-space binomial CDF at k with p = 1/2
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2.0) for i in range(k + 1)]
    m = max(logs)
    cdf = math.exp(m) * sum(math.exp(v - m) for v in logs)
    return b, c, min(1.0, 2.0 * cdf)
