"""Stage planning against brute force, the bubble fraction against a simulated schedule, and
gradient SNR scaling."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from arr_coc.analysis import bubble_fraction, gradient_snr, per_example_gradients, plan_stages


def simulate_pipeline(num_stages, num_microbatches, order, t_fwd=1, t_bwd=1):
    """Idle fraction of a simulated flushed pipeline: a timeline, not the formula.

    Every stage runs its own ordered task list (forward F_j, backward B_j of micro-batch j),
    each task as soon as its dependency is done and the stage is free; F_j on stage s needs
    F_j on s - 1, B_j on s needs B_j on s + 1 (the last stage: its own F_j). GPipe: all
    forwards, then all backwards. 1F1B (PipeDream-Flush): S - s - 1 warm-up forwards, then
    one forward / one backward alternately, then the remaining backwards. Idle = stage-time
    slots in [0, makespan) that run nothing.
    """
    s_count, m = num_stages, num_microbatches

    def tasks(s):
        if order == "gpipe":
            return [("F", j) for j in range(m)] + [("B", j) for j in range(m)]
        warm = min(s_count - s - 1, m)
        seq, f, b = [("F", j) for j in range(warm)], warm, 0
        while b < m:
            if f < m:
                seq.append(("F", f))
                f += 1
            seq.append(("B", b))
            b += 1
        return seq

    lists = [tasks(s) for s in range(s_count)]
    pos, free, busy, end = [0] * s_count, [0] * s_count, [0] * s_count, {}
    remaining = sum(map(len, lists))
    while remaining:
        progressed = False
        for s in range(s_count):
            if pos[s] == len(lists[s]):
                continue
            kind, j = lists[s][pos[s]]
            if kind == "F":
                dep = end.get(("F", s - 1, j)) if s > 0 else 0
            else:
                dep = end.get(("B", s + 1, j)) if s < s_count - 1 else end.get(("F", s, j))
            if dep is None:
                continue
            dur = t_fwd if kind == "F" else t_bwd
            end[(kind, s, j)] = free[s] = max(dep, free[s]) + dur
            busy[s] += dur
            pos[s] += 1
            remaining -= 1
            progressed = True
        assert progressed, "deadlocked schedule"
    makespan = max(free)
    return (s_count * makespan - sum(busy)) / (s_count * makespan)


@pytest.mark.parametrize("order", ["gpipe", "1f1b"])
@pytest.mark.parametrize("t_bwd", [1, 2])
def test_bubble_fraction_matches_a_simulated_schedule(order, t_bwd):
    for stages in (1, 2, 3, 4, 7):
        for micro in (1, 2, 3, 5, 8, 16):
            simulated = simulate_pipeline(stages, micro, order, t_fwd=1, t_bwd=t_bwd)
            assert bubble_fraction(stages, micro) == pytest.approx(simulated, abs=1e-12), (stages, micro)


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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, "1", None, 1e308])
def test_plan_rejects_non_finite_or_negative_costs(bad):
    # NaN / inf compute used to give boundaries [-1] and bytes_sent inf; 1e308 overflows the sum
    compute = [1.0, bad, 1e308 if bad == 1e308 else 2.0]
    with pytest.raises(ValueError, match="compute"):
        plan_stages(compute, [1, 1, 1], 2)
    with pytest.raises(ValueError, match="activation_bytes"):
        plan_stages([1, 1, 1], [1.0, bad, 1e308 if bad == 1e308 else 2.0], 2)


@pytest.mark.parametrize("tol", [-0.5, float("nan"), float("inf"), "0.1"])
def test_plan_rejects_bad_tolerance(tol):
    with pytest.raises(ValueError, match="tolerance"):
        plan_stages([1, 2, 3], [1, 1, 1], 2, tolerance=tol)


@pytest.mark.parametrize("s", [2.0, True, "2"])
def test_plan_rejects_non_int_stage_count(s):
    with pytest.raises(ValueError, match="num_stages"):
        plan_stages([1, 2, 3], [1, 1, 1], s)
    with pytest.raises(ValueError, match="num_stages"):
        bubble_fraction(s, 4)
    with pytest.raises(ValueError, match="num_microbatches"):
        bubble_fraction(4, s)


def test_plan_is_scale_free():
    # an absolute slack of 1e-12 once made every split "within tolerance" for tiny costs
    compute, nbytes = [1, 1, 1, 5], [1, 100, 100, 1]
    big = plan_stages(compute, nbytes, 2, tolerance=0.0)
    tiny = plan_stages([c * 1e-13 for c in compute], nbytes, 2, tolerance=0.0)
    assert big.boundaries == tiny.boundaries == [3]
    assert tiny.max_compute == pytest.approx(5e-13)


def test_gradient_snr_bad_and_degenerate_input():
    with pytest.raises(ValueError, match="per_example"):
        gradient_snr(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), [1])
    with pytest.raises(ValueError, match="batch_sizes"):
        gradient_snr(torch.randn(4, 2), [0])
    with pytest.raises(ValueError, match="batch_sizes"):
        gradient_snr(torch.randn(4, 2), [1.5])
    # identical gradients: no noise; infinite SNR with a signal, 0 without one
    assert gradient_snr(torch.ones(3, 2), [2]) == {2: float("inf")}
    assert gradient_snr(torch.zeros(3, 2), [2]) == {2: 0.0}
    # float64 extremes: the squares no longer overflow to inf / NaN
    g = torch.tensor([[1e200, 0.0], [3e200, 0.0], [2e200, 0.0]], dtype=torch.float64)
    # mu = 2e200, tr(Sigma) = 1e400 -> SNR(1) = (4 - 1/3) / 1 in units of 1e400
    assert gradient_snr(g, [1])[1] == pytest.approx((4 - 1 / 3) / 1)


def test_per_example_gradients_bad_input():
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="num_examples"):
        per_example_gradients(model, lambda m, i: m(torch.ones(2)).sum(), 0)
    with pytest.raises(ValueError, match="loss_fn"):
        per_example_gradients(model, lambda m, i: m(torch.ones(3, 2)), 1)  # not a scalar
    with pytest.raises(ValueError, match="loss_fn"):
        per_example_gradients(model, lambda m, i: m(torch.full((2,), float("nan"))).sum(), 1)


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
