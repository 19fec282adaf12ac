"""Dependence measures against scipy and dcor; the permutation test."""

import math

import numpy as np
import pytest
import torch

from arr_coc.info import distance_correlation, pearson, permutation_test, spearman


def _data(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    y = x**2 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


def test_pearson_spearman_match_scipy_with_ties():
    from scipy.stats import pearsonr, spearmanr

    x, y = _data()
    assert pearson(x, y).item() == pytest.approx(pearsonr(x.numpy(), y.numpy())[0], abs=1e-12)
    assert spearman(x, y).item() == pytest.approx(spearmanr(x.numpy(), y.numpy())[0], abs=1e-12)
    xi, yi = torch.round(x * 2), torch.round(y)  # many ties: average ranks as scipy
    assert spearman(xi, yi).item() == pytest.approx(spearmanr(xi.numpy(), yi.numpy())[0], abs=1e-12)
    X = torch.stack([x, xi, -x], 1)
    cols = spearman(X, y)
    assert cols.shape == (3,)
    assert cols[2].item() == pytest.approx(-cols[0].item(), abs=1e-12)


def test_constant_gives_zero_not_nan():
    x, _ = _data()
    c = torch.ones_like(x)
    for f in (pearson, spearman, distance_correlation):
        assert f(x, c).item() == 0.0


@pytest.mark.parametrize("numba", ["1", "0"])  # the compiled CPU kernel and the torch merge levels
@pytest.mark.parametrize("seed", [0, 1])
def test_distance_correlation_fast_1d_matches_dcor(seed, numba, monkeypatch):
    import dcor

    monkeypatch.setenv("ARR_COC_NUMBA", numba)
    x, y = _data(1000, seed)
    ref = dcor.distance_correlation(x.numpy(), y.numpy())
    assert distance_correlation(x, y).item() == pytest.approx(ref, abs=1e-10)
    assert distance_correlation(x, y, method="tiled").item() == pytest.approx(ref, abs=1e-9)
    # ties in both variables, odd n
    xi, yi = torch.round(x[:777] * 2), torch.round(y[:777])
    assert distance_correlation(xi, yi).item() == pytest.approx(dcor.distance_correlation(xi.numpy(), yi.numpy()), abs=1e-10)


@pytest.mark.parametrize("numba", ["1", "0"])
def test_distance_correlation_large_n_no_overflow(numba, monkeypatch):
    import dcor

    monkeypatch.setenv("ARR_COC_NUMBA", numba)
    x, y = _data(60_000, 7)  # n**4 overflows int64 here
    assert distance_correlation(x, y).item() == pytest.approx(dcor.distance_correlation(x.numpy(), y.numpy()), abs=1e-9)


def test_distance_correlation_multivariate_matches_dcor():
    import dcor

    g = torch.Generator().manual_seed(3)
    X = torch.randn(300, 3, generator=g, dtype=torch.float64)
    Y = torch.stack([X[:, 0] * X[:, 1], X[:, 2] ** 2], 1) + 0.3 * torch.randn(300, 2, generator=g, dtype=torch.float64)
    assert distance_correlation(X, Y).item() == pytest.approx(dcor.distance_correlation(X.numpy(), Y.numpy()), abs=1e-8)
    assert distance_correlation(X, X).item() == pytest.approx(1.0, abs=1e-12)


def test_distance_correlation_detects_nonlinear_dependence():
    x, y = _data(800, 4)
    assert abs(pearson(x, y).item()) < 0.15
    assert distance_correlation(x, y).item() > 0.3


def test_permutation_test():
    x, y = _data(120, 5)
    g = torch.Generator().manual_seed(0)
    p_dep = permutation_test(lambda a, b: distance_correlation(a, b), x, y, n_permutations=99, generator=g)
    assert p_dep.item() == pytest.approx(0.01)  # smallest attainable: 1 / (1 + 99)
    z = torch.randn(120, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    p = permutation_test(lambda a, b: pearson(a, b).abs(), x, z, n_permutations=199, generator=torch.Generator().manual_seed(1))
    assert 0.05 < p.item() <= 1.0
    # p-values of independent data are roughly uniform
    ps = []
    for s in range(20):
        gg = torch.Generator().manual_seed(s)
        a = torch.randn(40, generator=gg, dtype=torch.float64)
        b = torch.randn(40, generator=gg, dtype=torch.float64)
        ps.append(permutation_test(lambda u, v: pearson(u, v).abs(), a, b, n_permutations=49, generator=gg).item())
    assert 0.25 < float(np.mean(ps)) < 0.75


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: pearson(torch.randn(5), torch.randn(4)), "y: expected 5"),
        (lambda: spearman(torch.randn(1), torch.randn(1)), "x: expected at least 2"),
        (lambda: distance_correlation(torch.randn(5, 2), torch.randn(5), method="fast"), "method"),
        (lambda: distance_correlation(torch.tensor([1.0, math.nan, 2.0]), torch.randn(3)), "x: expected finite"),
        (lambda: permutation_test(lambda a, b: pearson(a, b), torch.randn(5), torch.randn(5), 0), "n_permutations"),
        (lambda: permutation_test(None, torch.randn(5), torch.randn(5), 9), "statistic"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("when", ["observed", "permuted"])
def test_permutation_test_refuses_a_non_finite_statistic(bad, when):
    # a NaN statistic used to give p = 1/6 silently (NaN >= x is False)
    x = torch.randn(20, generator=torch.Generator().manual_seed(0))
    calls = []

    def stat(a, b):
        calls.append(1)
        if (when == "observed") == (len(calls) == 1):
            return torch.tensor(bad)
        return pearson(a, b)

    with pytest.raises(ValueError, match="statistic"):
        permutation_test(stat, x, x.flip(0), n_permutations=5, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="statistic"):
        permutation_test(lambda a, b: torch.stack([pearson(a, b)] * 2), x, x, n_permutations=5)
