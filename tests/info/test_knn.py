"""Exact k-NN engines: the rank-space grid must agree bit for bit with brute-force tiles."""

import math

import pytest
import torch

from arr_coc.info.knn import brute_radius_counts, grid_kth_2d, kth_1d_sorted, strict_counts_sorted


def _pairs():
    g = torch.Generator().manual_seed(0)
    out = []
    for n, rho in [(40, 0.0), (500, 0.9), (800, 0.0), (600, 0.999)]:
        x = torch.randn(n, generator=g, dtype=torch.float64)
        out.append((x, rho * x + math.sqrt(1 - rho**2) * torch.randn(n, generator=g, dtype=torch.float64)))
    # heavy tails and a far cluster
    c = torch.distributions.Cauchy(0.0, 1.0).sample((500,)).double()
    out.append((c, torch.randn(500, generator=g, dtype=torch.float64) + 0.01 * c))
    far = torch.cat([torch.randn(200, generator=g), 1e9 + torch.randn(200, generator=g)]).double()
    out.append((far, torch.randn(400, generator=g, dtype=torch.float64)))
    # heavy ties (integer data) and exact duplicate points
    out.append((torch.randint(0, 5, (500,), generator=g).double(), torch.randint(0, 3, (500,), generator=g).double()))
    d = torch.randn(200, generator=g, dtype=torch.float64)
    out.append((d.repeat(3), (2 * d).repeat(3)))
    return out


@pytest.mark.parametrize("k", [1, 4])
def test_grid_equals_brute(k):
    for x, y in _pairs():
        eps, xs, ys = grid_kth_2d(x[None], y[None], k)
        ref, (cx, cy) = brute_radius_counts([x[:, None], y[:, None]], k, [(0,), (1,)])
        assert torch.equal(eps[0], ref)
        self_in = (eps > 0).long()
        assert torch.equal((strict_counts_sorted(xs, x[None], eps) - self_in)[0], cx)
        assert torch.equal((strict_counts_sorted(ys, y[None], eps) - self_in)[0], cy)


def test_grid_batched_rows_are_independent():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 400, generator=g, dtype=torch.float64)
    y = x[0] * 0.5 + torch.randn(5, 400, generator=g, dtype=torch.float64)
    eps, _, _ = grid_kth_2d(x, y, 3)
    for b in range(5):
        assert torch.equal(eps[b], grid_kth_2d(x[b : b + 1], y[b : b + 1], 3)[0][0])


def test_counts_use_the_exact_float_predicate():
    # values whose sum with eps rounds across the boundary: the count must follow |v_j - v_i| < eps
    v = torch.tensor([0.1, 0.2, 0.3, 0.30000000000000004, 0.7], dtype=torch.float64)
    eps = (v[3] - v[0]).expand(5).clone()
    got = strict_counts_sorted(v[None], v[None], eps[None])[0]
    ref = ((v[None, :] - v[:, None]).abs() < eps[:, None]).sum(1)
    assert torch.equal(got, ref)


def test_kth_1d_sorted_matches_brute():
    g = torch.Generator().manual_seed(2)
    v = torch.sort(torch.randint(0, 50, (300,), generator=g).double() + torch.rand(300, generator=g).double().round()).values
    for k in (1, 4):
        got = kth_1d_sorted(v[None], k)[0]
        d = (v[:, None] - v[None, :]).abs()
        d.fill_diagonal_(math.inf)
        assert torch.equal(got, d.kthvalue(k, dim=1).values)
