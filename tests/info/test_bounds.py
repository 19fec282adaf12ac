"""InfoNCE and NWJ bounds: hand-computed values, the log N ceiling, gradients, a Gaussian check."""

import math

import pytest
import torch

from arr_coc.info import infonce_lower_bound, nwj_lower_bound


def test_infonce_hand_computed_and_ceiling():
    s = torch.tensor([[2.0, 0.0], [1.0, 3.0]], dtype=torch.float64)
    ce = ((math.log(math.exp(2) + 1) - 2) + (math.log(math.exp(1) + math.exp(3)) - 3)) / 2
    assert infonce_lower_bound(s).item() == pytest.approx(math.log(2) - ce, abs=1e-14)
    assert infonce_lower_bound(s, base=2).item() == pytest.approx((math.log(2) - ce) / math.log(2), abs=1e-14)
    perfect = 100.0 * torch.eye(16, dtype=torch.float64)
    assert infonce_lower_bound(perfect).item() == pytest.approx(math.log(16), abs=1e-12)
    assert infonce_lower_bound(torch.zeros(16, 16)).item() == pytest.approx(0.0, abs=1e-12)


def test_nwj_hand_computed():
    s = torch.tensor([[2.0, 0.0], [1.0, 3.0]], dtype=torch.float64)
    ref = 2.5 - math.exp(-1) * (math.exp(0) + math.exp(1)) / 2
    assert nwj_lower_bound(s).item() == pytest.approx(ref, abs=1e-14)


def test_bounds_below_true_mi_with_optimal_gaussian_critic():
    # jointly Gaussian (rho): the optimal critic f = log p(y|x)/p(y) (+1 for NWJ) makes both
    # bounds close to I = -1/2 log(1 - rho^2) (InfoNCE is capped at log N)
    rho, n = 0.8, 512
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, generator=g, dtype=torch.float64)
    v = 1 - rho**2
    log_ratio = -0.5 * math.log(v) - (y[None, :] - rho * x[:, None]) ** 2 / (2 * v) + y[None, :] ** 2 / 2
    truth = -0.5 * math.log(v)
    assert infonce_lower_bound(log_ratio).item() == pytest.approx(truth, abs=0.08)
    assert nwj_lower_bound(log_ratio + 1).item() == pytest.approx(truth, abs=0.15)


def test_batched_and_differentiable():
    s = torch.randn(3, 8, 8, dtype=torch.float32, requires_grad=True)
    out = infonce_lower_bound(s)
    assert out.shape == (3,)
    out.sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    # the gradient pushes the diagonal up
    assert (torch.diagonal(s.grad, dim1=-2, dim2=-1) > 0).all()
    s2 = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    nwj_lower_bound(s2).backward()
    assert torch.allclose(torch.diagonal(s2.grad), torch.full((8,), 1 / 8, dtype=torch.float64))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: infonce_lower_bound(torch.randn(3, 4)), "square"),
        (lambda: infonce_lower_bound(torch.randn(4)), "square"),
        (lambda: nwj_lower_bound(torch.randn(1, 1)), "N >= 2"),
        (lambda: infonce_lower_bound(torch.full((2, 2), math.nan)), "finite"),
        (lambda: infonce_lower_bound(torch.ones(2, 2, dtype=torch.long)), "floating"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
