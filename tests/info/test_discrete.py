"""Estimators from integer samples: plug-in (scikit-learn oracle), Miller-Madow, James-Stein."""

import math

import pytest
import torch

from arr_coc.info import discrete_cmi, discrete_entropy, discrete_mi, information_gain


def _samples(seed=0, n=600):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 4, (n,), generator=g)
    b = (a + torch.randint(0, 3, (n,), generator=g)) % 5
    c = torch.randint(-2, 1, (n,), generator=g)  # negative symbols are fine
    return a, b, c


def test_plugin_matches_sklearn_exactly():
    from sklearn.metrics import mutual_info_score

    a, b, c = _samples()
    assert discrete_mi(a, b).item() == pytest.approx(mutual_info_score(a.numpy(), b.numpy()), abs=1e-12)
    assert discrete_mi(a, c, base=2).item() == pytest.approx(mutual_info_score(a.numpy(), c.numpy()) / math.log(2), abs=1e-12)


def test_entropy_plugin_and_miller_madow():
    x = torch.tensor([0, 0, 1, 2, 2, 2])
    p = torch.tensor([2, 1, 3], dtype=torch.float64) / 6
    h = -(p * p.log()).sum().item()
    assert discrete_entropy(x).item() == pytest.approx(h, abs=1e-12)
    assert discrete_entropy(x, correction="miller_madow").item() == pytest.approx(h + 2 / 12, abs=1e-12)
    assert discrete_entropy(torch.zeros(5, dtype=torch.long)).item() == 0.0


def test_james_stein_hand_computed():
    # counts (3, 1), n = 4, target 1/2: lambda = (1 - (9+1)/16) / (3 * 2 * (1/4)^2) = 0.375/0.375 = 1
    x = torch.tensor([0, 0, 0, 1])
    assert discrete_entropy(x, correction="james_stein").item() == pytest.approx(math.log(2), abs=1e-12)
    # counts (6, 2), n = 8: lambda = (1 - 40/64) / (7 * 2 * 1/16) = 0.375 / 0.875
    x = torch.tensor([0] * 6 + [1] * 2)
    lam = 0.375 / 0.875
    q = torch.tensor([lam * 0.5 + (1 - lam) * 0.75, lam * 0.5 + (1 - lam) * 0.25], dtype=torch.float64)
    assert discrete_entropy(x, correction="james_stein").item() == pytest.approx(-(q * q.log()).sum().item(), abs=1e-12)
    # unobserved categories in the target raise the estimate towards log K
    assert discrete_entropy(x, correction="james_stein", num_categories=4).item() > discrete_entropy(x, correction="james_stein").item()


def test_james_stein_less_biased_on_small_samples():
    # uniform over 20 symbols, n = 15: plug-in is biased low; shrinkage towards the known
    # alphabet recovers most of it on average
    g = torch.Generator().manual_seed(3)
    errs_plug, errs_js = [], []
    for _ in range(200):
        x = torch.randint(0, 20, (15,), generator=g)
        errs_plug.append(discrete_entropy(x).item() - math.log(20))
        errs_js.append(discrete_entropy(x, correction="james_stein", num_categories=20).item() - math.log(20))
    assert abs(sum(errs_js) / 200) < abs(sum(errs_plug) / 200) / 3


def test_mi_miller_madow_combines_entropies():
    a, b, _ = _samples(1)
    mm = discrete_mi(a, b, correction="miller_madow").item()
    ha = discrete_entropy(a, correction="miller_madow").item()
    hb = discrete_entropy(b, correction="miller_madow").item()
    hab = discrete_entropy(torch.stack([a, b], 1), correction="miller_madow").item()
    assert mm == pytest.approx(ha + hb - hab, abs=1e-12)


def test_xor_and_cmi():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 2, (4000,), generator=g)
    y = torch.randint(0, 2, (4000,), generator=g)
    z = x ^ y
    assert discrete_mi(x, y, base=2).item() == pytest.approx(0.0, abs=2e-3)
    assert discrete_cmi(x, y, z, base=2).item() == pytest.approx(1.0, abs=2e-3)
    # exact on the balanced design
    x = torch.tensor([0, 0, 1, 1])
    y = torch.tensor([0, 1, 0, 1])
    assert discrete_mi(x, y).item() == pytest.approx(0.0, abs=1e-15)
    assert discrete_cmi(x, y, x ^ y, base=2).item() == pytest.approx(1.0, abs=1e-14)


def test_information_gain_is_group_formula():
    a, b, c = _samples(4)
    t, f = a, c
    h_t = discrete_entropy(t).item()
    cond = 0.0
    for v in torch.unique(f):
        m = f == v
        cond += m.double().mean().item() * discrete_entropy(t[m]).item()
    assert information_gain(t, f).item() == pytest.approx(h_t - cond, abs=1e-12)
    # Miller-Madow per group equals the joint-based correction
    cond_mm = 0.0
    for v in torch.unique(f):
        m = f == v
        cond_mm += m.double().mean().item() * discrete_entropy(t[m], correction="miller_madow").item()
    ig_mm = discrete_entropy(t, correction="miller_madow").item() - cond_mm
    assert information_gain(t, f, correction="miller_madow").item() == pytest.approx(ig_mm, abs=1e-12)


def test_vector_symbols_and_bool():
    a, b, _ = _samples(5)
    pair = torch.stack([a, b], 1)
    assert discrete_mi(pair, a).item() == pytest.approx(discrete_entropy(a).item(), abs=1e-12)
    flag = a > 1
    assert discrete_entropy(flag).item() == pytest.approx(discrete_entropy(flag.long()).item(), abs=0)


def test_constant_is_exactly_zero():
    a, _, _ = _samples(6)
    const = torch.full_like(a, 7)
    assert discrete_mi(a, const).item() == 0.0
    assert discrete_mi(a, const, correction="miller_madow").item() == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: discrete_mi(torch.tensor([0, 1, 1]), torch.tensor([0, 1])), "y: expected 3 samples"),
        (lambda: discrete_entropy(torch.tensor([0.5, 1.0])), "integer"),
        (lambda: discrete_entropy(torch.zeros(0, dtype=torch.long)), "non-empty"),
        (lambda: discrete_entropy(torch.zeros(2, 2, 2, dtype=torch.long)), "shape"),
        (lambda: discrete_mi(torch.tensor([0, 1]), torch.tensor([0, 1]), correction="james_stein"), "correction"),
        (lambda: discrete_entropy(torch.tensor([0, 1, 2]), correction="james_stein", num_categories=2), "num_categories"),
        (lambda: discrete_cmi(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0])), "z: expected 2"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
