"""Balancing: alpha / price per example, and the information-bottleneck terms."""

import math

import pytest
import torch

from arr_coc.balancing import Balancer, IBLoss, bernoulli_rate, expected_tokens, soft_keep


def test_fixed_values_and_no_query_means_coverage():
    bal = Balancer(alpha=0.7, price=0.1)
    out = bal(torch.randn(3, 5), torch.tensor([True, False, True]))
    torch.testing.assert_close(out.alpha, torch.tensor([0.7, 0.0, 0.7]))
    torch.testing.assert_close(out.price, torch.full((3,), 0.1))
    none = bal(None, batch_size=2)
    assert torch.all(none.alpha == 0)
    assert bal.adaptive and not Balancer(alpha=0.5, price=0.0).adaptive


def test_learned_balancer_starts_at_its_init_and_trains():
    bal = Balancer(alpha=None, price=None, alpha_init=0.8, price_init=0.05)
    assert bal.adaptive
    q = torch.randn(4, 6)
    out = bal(q)
    torch.testing.assert_close(out.alpha, torch.full((4,), 0.8), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.price, torch.full((4,), 0.05), atol=1e-5, rtol=0)
    (out.alpha.sum() + out.price.sum()).backward()
    assert all(p.grad is not None for p in bal.parameters())
    # after a step the prediction depends on the query
    with torch.no_grad():
        for p in bal.parameters():
            p.add_(0.5 * torch.randn_like(p))
    out = bal(q)
    assert out.alpha.std() > 0 and ((out.alpha >= 0) & (out.alpha <= 1)).all() and (out.price >= 0).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        Balancer(alpha=1.5)
    with pytest.raises(ValueError, match="price"):
        Balancer(price=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        Balancer()(None)
    with pytest.raises(ValueError, match="prior"):
        bernoulli_rate(torch.rand(2, 3), 1.0)
    with pytest.raises(ValueError, match="rate"):
        IBLoss(rate="bits")


def test_bernoulli_rate_is_the_kl_sum():
    p = torch.tensor([[0.0, 0.5, 1.0, 0.2]], dtype=torch.float64)
    r = 0.2
    kl = 0.0
    for pi in p[0].tolist():
        for v, pv, rv in ((1, pi, r), (0, 1 - pi, 1 - r)):
            if pv > 0:
                kl += pv * math.log(pv / rv)
    assert bernoulli_rate(p, r).item() == pytest.approx(kl, abs=1e-12)
    assert bernoulli_rate(torch.full((2, 5), 0.3), 0.3).abs().max() < 1e-7  # prior = posterior: rate 0
    mask = torch.tensor([[True, True, False, False]])
    assert bernoulli_rate(p, r, mask).item() == pytest.approx(
        bernoulli_rate(p[:, :2], r).item(), abs=1e-12
    )


def test_soft_keep_expected_tokens_and_ib_loss():
    gains = torch.tensor([[0.5, 0.1, 0.0]])
    price = torch.tensor([0.1])
    k = soft_keep(gains, price, temperature=0.01)
    assert k[0, 0] > 0.99 and k[0, 1] == pytest.approx(0.5) and k[0, 2] < 1e-4
    assert expected_tokens(torch.tensor([[0.2, 0.3, 0.5]])).item() == pytest.approx(1.0)
    price.requires_grad_(True)
    soft_keep(gains, price, temperature=0.1).sum().backward()
    assert price.grad.item() < 0  # a higher price keeps fewer tokens
    loss = IBLoss(beta=0.5, rate="tokens")
    task = torch.tensor(2.0)
    out = loss(task, torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    assert out["rate"].item() == pytest.approx(1.0) and out["loss"].item() == pytest.approx(2.5)
