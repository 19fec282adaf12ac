"""Causal information on the textbook structures, with closed forms computed by hand."""

import math

import pytest
import torch

from arr_coc.info import conditional_mutual_information, entropy, mutual_information
from arr_coc.info.causal import DiscreteSCM, causal_entropy, causal_information_gain, ci_test

LN2 = math.log(2)


def bern(p):
    return torch.tensor([1 - p, p], dtype=torch.float64)


def noisy_copy(eps):
    """p(child | parent) for binary variables: copy the parent, flip with probability eps."""
    return torch.tensor([[1 - eps, eps], [eps, 1 - eps]], dtype=torch.float64)


def h2(p):
    return 0.0 if p in (0.0, 1.0) else -(p * math.log(p) + (1 - p) * math.log(1 - p))


@pytest.fixture
def confounder():
    # temperature Z drives ice-cream sales X and drownings Y; X does not cause Y
    return DiscreteSCM(
        {"Z": 2, "X": 2, "Y": 2},
        {"X": ("Z",), "Y": ("Z",)},
        {"Z": bern(0.5), "X": noisy_copy(0.1), "Y": noisy_copy(0.2)},
    )


def test_confounder_correlated_but_no_causal_control(confounder):
    joint = confounder.marginal("X", "Y", "Z")
    assert mutual_information(joint.sum(-1)) > 0.05
    assert conditional_mutual_information(joint).abs() < 1e-12
    for protocol in ("uniform", "observational"):
        assert causal_information_gain(confounder, "Y", "X", protocol).abs() < 1e-12
    # intervening on the common cause does control Y: H(Y) - H(Y | do(Z)) = ln 2 - h(0.2)
    expected = LN2 - h2(0.2)
    assert torch.isclose(causal_information_gain(confounder, "Y", "Z"), torch.tensor(expected, dtype=torch.float64))


def test_chain_screens_off():
    scm = DiscreteSCM(
        {"X": 2, "Y": 2, "Z": 2},
        {"Y": ("X",), "Z": ("Y",)},
        {"X": bern(0.3), "Y": noisy_copy(0.1), "Z": noisy_copy(0.25)},
    )
    joint = scm.marginal("X", "Z", "Y")
    assert conditional_mutual_information(joint).abs() < 1e-12
    assert mutual_information(joint.sum(-1)) > 0
    # do(X = x) makes Z a noisy copy of x through a channel of flip prob 0.1*0.75+0.9*0.25
    eps = 0.1 * 0.75 + 0.9 * 0.25
    assert torch.isclose(causal_entropy(scm, "Z", "X"), torch.tensor(h2(eps), dtype=torch.float64))
    pz1 = 0.3 * (1 - eps) + 0.7 * eps
    assert torch.isclose(
        causal_information_gain(scm, "Z", "X", base=2), torch.tensor((h2(pz1) - h2(eps)) / LN2, dtype=torch.float64)
    )


def test_collider_explains_away():
    xor = torch.zeros(2, 2, 2, dtype=torch.float64)
    for a in range(2):
        for b in range(2):
            xor[a, b, a ^ b] = 1.0
    scm = DiscreteSCM({"X": 2, "Y": 2, "Z": 2}, {"Z": ("X", "Y")}, {"X": bern(0.5), "Y": bern(0.5), "Z": xor})
    joint = scm.marginal("X", "Y", "Z")
    assert mutual_information(joint.sum(-1)).abs() < 1e-12
    assert torch.isclose(conditional_mutual_information(joint, base=2), torch.tensor(1.0, dtype=torch.float64))
    # X alone does not control the XOR: Z stays a fair coin under do(X=x)
    assert causal_information_gain(scm, "Z", "X").abs() < 1e-12


def test_do_cuts_parents_and_stochastic_intervention(confounder):
    done = confounder.do(X=1)
    assert done.parents["X"] == ()
    assert torch.allclose(done.marginal("X"), torch.tensor([0.0, 1.0], dtype=torch.float64))
    # the original model is untouched
    assert confounder.parents["X"] == ("Z",)
    soft = confounder.do(X=torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert torch.allclose(soft.marginal("X"), torch.tensor([0.25, 0.75], dtype=torch.float64))
    # a stochastic intervention with the protocol's pmf gives the protocol-averaged entropy
    # only when Y does not depend on X; in the confounder it equals H(Y)
    assert torch.isclose(entropy(soft.marginal("Y")), entropy(confounder.marginal("Y")))


def test_sampling_matches_the_joint(confounder):
    g = torch.Generator().manual_seed(0)
    s = confounder.sample(20000, generator=g)
    emp = torch.zeros(2, 2, 2, dtype=torch.float64)
    emp.index_put_((s["Z"], s["X"], s["Y"]), torch.ones(20000, dtype=torch.float64), accumulate=True)
    assert torch.allclose(emp / 20000, confounder.joint(), atol=0.015)


def test_discrete_ci_test_on_the_confounder(confounder):
    g = torch.Generator().manual_seed(1)
    s = confounder.sample(3000, generator=g)
    dependent = ci_test(s["X"], s["Y"], kind="discrete", n_permutations=99, generator=g)
    assert dependent.p_value <= 0.02
    independent = ci_test(s["X"], s["Y"], s["Z"], kind="discrete", n_permutations=99, generator=g)
    assert independent.p_value > 0.05


def test_continuous_ci_test_with_local_permutation():
    g = torch.Generator().manual_seed(2)
    n = 400
    z = torch.randn(n, generator=g, dtype=torch.float64)
    x = z + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    y = z + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    res = ci_test(x, y, z, kind="continuous", n_permutations=49, generator=g)
    assert res.p_value > 0.05
    y_dep = y + 0.8 * x
    res_dep = ci_test(x, y_dep, z, kind="continuous", n_permutations=49, generator=g)
    assert res_dep.p_value <= 0.04


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: DiscreteSCM({"X": 2}, {"X": ("Y",)}, {"X": bern(0.5)}), "parents"),
        (lambda: DiscreteSCM({"X": 2, "Y": 2}, {"X": ("Y",)}, {"X": noisy_copy(0.1), "Y": bern(0.5)}), "topological"),
        (lambda: DiscreteSCM({"X": 2}, {}, {"X": torch.tensor([0.7, 0.7])}), "sum to 1"),
        (lambda: DiscreteSCM({"X": 2}, {}, {"X": torch.tensor([0.5, 0.5, 0.0])}), "shape"),
        (lambda: DiscreteSCM({"X": 2}, {}, {}), "missing"),
    ],
)
def test_bad_models(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_queries(confounder):
    with pytest.raises(ValueError, match="X"):
        confounder.do(X=2)
    with pytest.raises(ValueError, match="unknown"):
        causal_entropy(confounder, "W", "X")
    with pytest.raises(ValueError, match="protocol"):
        causal_entropy(confounder, "Y", "X", protocol="sometimes")
    with pytest.raises(ValueError, match="y"):
        ci_test(torch.zeros(10, dtype=torch.long), torch.zeros(9, dtype=torch.long))


@pytest.mark.parametrize("value", [1.7, 0.5, -1, 2, float("nan"), float("inf"), True, torch.tensor(1.5), torch.tensor([[0.0, 1.0]]), "1"])
def test_do_refuses_values_outside_the_support(confounder, value):
    # do(X=1.7) used to become do(X=1) silently
    with pytest.raises(ValueError, match="X"):
        confounder.do(X=value)


@pytest.mark.parametrize("value", [1, 1.0, torch.tensor(1), torch.tensor(1.0)])
def test_do_accepts_integral_values_in_the_support(confounder, value):
    y = confounder.do(X=value).marginal("X")
    torch.testing.assert_close(y, torch.tensor([0.0, 1.0], dtype=torch.float64))
