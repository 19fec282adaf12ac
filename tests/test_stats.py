"""arr_coc.stats: intervals and paired tests against scipy and closed forms."""

import math

import pytest
import torch
from scipy import stats as sps

from arr_coc.stats import bootstrap_interval, mcnemar, paired_bootstrap


def test_mcnemar_matches_scipy_binomtest():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(500, generator=g) < 0.8
    b = torch.rand(500, generator=g) < 0.7
    nb, nc, p = mcnemar(a, b)
    assert nb == int((a & ~b).sum()) and nc == int((~a & b).sum())
    ref = sps.binomtest(min(nb, nc), nb + nc, 0.5, alternative="two-sided").pvalue
    assert p == pytest.approx(ref, rel=1e-9)


def test_mcnemar_degenerate_and_bad_input():
    a = torch.tensor([1, 0, 1])
    assert mcnemar(a, a) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="correct_b"):
        mcnemar(a, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="correct_a"):
        mcnemar(torch.tensor([0.5, 1.0, 0.0]), a)


def test_bootstrap_interval_matches_binomial_standard_error():
    # one seed: the question bootstrap's spread is the binomial standard error sqrt(p(1-p)/Q)
    q, p = 2000, 0.86
    correct = torch.zeros(q)
    correct[: int(p * q)] = 1
    lo, hi = bootstrap_interval(correct, num=4000)
    se = math.sqrt(p * (1 - p) / q)
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.1)
    assert lo < p < hi


def test_bootstrap_interval_includes_seed_spread():
    # seeds that disagree widen the interval beyond the question-only one
    q = 1000
    base = (torch.arange(q) % 10 < 8).double()
    spread = torch.stack([base, base.roll(1) * 0 + (torch.arange(q) % 10 < 6).double()])
    lo1, hi1 = bootstrap_interval(spread[:1])
    lo2, hi2 = bootstrap_interval(spread)
    assert hi2 - lo2 > 2 * (hi1 - lo1)


def test_paired_bootstrap_detects_a_real_difference_and_not_a_null_one():
    g = torch.Generator().manual_seed(1)
    q = 1000
    a = (torch.rand(q, generator=g) < 0.8).double()
    flip = torch.rand(q, generator=g) < 0.05
    b = torch.where(flip, torch.zeros(q, dtype=torch.float64), a)  # b = a with 5% of answers made wrong
    d, (lo, hi), p = paired_bootstrap(a, b)
    assert d == pytest.approx(float((a - b).mean()))
    assert 0 < lo < d < hi and p < 0.01
    d0, (lo0, hi0), p0 = paired_bootstrap(a, a.clone())
    assert d0 == 0 and lo0 == 0 and hi0 == 0 and p0 == 1.0


def test_paired_bootstrap_broadcasts_one_seed_and_checks_shapes():
    a = torch.ones(3, 50)
    b = torch.zeros(1, 50)
    d, _, _ = paired_bootstrap(a, b)
    assert d == 1.0
    with pytest.raises(ValueError, match="questions"):
        paired_bootstrap(torch.ones(50), torch.ones(40))
    with pytest.raises(ValueError, match="pair"):
        paired_bootstrap(torch.ones(3, 50), torch.ones(2, 50))
    with pytest.raises(ValueError, match="finite"):
        bootstrap_interval(torch.tensor([1.0, float("nan")]))
