"""Stage planning against brute force, the bubble formula, and gradient SNR scaling."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from arr_coc.analysis import bubble_fraction, gradient_snr, per_example_gradients, plan_stages


def test_bubble_fraction_values():
    assert bubble_fraction(1, 8) == 0.0
    assert bubble_fraction(4, 1) == pytest.approx(3 / 4)
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    # more micro-batches always shrink the bubble
    fr = [bubble_fraction(4, m) for m in (1, 2, 4, 8, 16, 32)]
    assert fr == sorted(fr, reverse=True)


def brute_force(compute, nbytes, s, tol):
    L = len(compute)
    best = None
    splits = []
    for cut in itertools.combinations(range(1, L), s - 1):
        edges = [0, *cut, L]
        stages = [sum(compute[a:b]) for a, b in zip(edges[:-1], edges[1:])]
        splits.append((max(stages), sum(nbytes[c - 1] for c in cut), list(cut)))
    opt = min(m for m, _, _ in splits)
    feasible = [(b, m) for m, b, _ in splits if m <= opt * (1 + tol) + 1e-12]
    return opt, min(b for b, _ in feasible)


@settings(max_examples=40, deadline=None)
@given(
    compute=st.lists(st.integers(1, 20), min_size=2, max_size=8),
    data=st.data(),
)
def test_plan_matches_brute_force(compute, data):
    L = len(compute)
    nbytes = data.draw(st.lists(st.integers(0, 50), min_size=L, max_size=L))
    s = data.draw(st.integers(1, L))
    plan = plan_stages(compute, nbytes, s, tolerance=0.1)
    opt, fewest = brute_force(compute, nbytes, s, 0.1)
    assert plan.max_compute <= opt * 1.1 + 1e-9
    assert plan.bytes_sent == pytest.approx(fewest)
    assert len(plan.stage_compute) == s and sum(plan.stage_compute) == pytest.approx(sum(compute))


def test_plan_prefers_narrow_boundaries():
    # two equally balanced cuts; the one after the small activation wins
    plan = plan_stages([1, 1, 1, 1], [10, 100, 1, 10], 2, tolerance=0.5)
    assert plan.boundaries == [3]
    strict = plan_stages([1, 1, 1, 1], [10, 100, 1, 10], 2, tolerance=0.0)
    assert strict.boundaries == [2] and strict.balance == 1.0


def test_plan_bad_input():
    with pytest.raises(ValueError, match="num_stages"):
        plan_stages([1, 2], [1, 1], 3)
    with pytest.raises(ValueError, match="activation_bytes"):
        plan_stages([1, 2], [1], 1)


def test_gradient_snr_is_linear_in_batch_size_and_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    sigma = 3.0
    grads = mu + sigma * torch.randn(20000, 3, generator=g, dtype=torch.float64)
    snr = gradient_snr(grads, [1, 4, 16])
    expected_1 = mu.pow(2).sum().item() / (3 * sigma**2)
    assert snr[1] == pytest.approx(expected_1, rel=0.08)
    assert snr[4] == pytest.approx(4 * snr[1]) and snr[16] == pytest.approx(16 * snr[1])


def test_per_example_gradients_of_a_linear_model():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    y = torch.tensor([0.0, 1.0])

    def loss(m, i):
        return 0.5 * (m(x[i]).squeeze() - y[i]) ** 2

    grads = per_example_gradients(model, loss, 2)
    # d/dw 1/2 (w.x - y)^2 = (w.x - y) x
    assert torch.allclose(grads, torch.tensor([[-1.0, -2.0], [6.0, 0.0]], dtype=torch.float64))
