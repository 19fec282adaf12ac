"""Forward-hook recording (hooks removed), and the two information-plane coordinates."""

import math

import pytest
import torch
from torch import nn

from arr_coc.analysis import ActivationRecorder, information_plane, noisy_gaussian_information, probe_information


def test_hooks_are_removed_and_activations_pooled():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 7, 4)
    with ActivationRecorder(model, ["0", "2"]) as rec:
        model(x)
        model(x[:2])
        assert rec.num_hooks == 2
    assert rec.num_hooks == 0
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert rec.activations["0"].shape == (7, 8)  # 5 + 2 examples, tokens mean-pooled
    assert torch.allclose(rec.activations["2"][:5], model(x).mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="layers"):
        ActivationRecorder(model, ["nope"])


def test_noisy_gaussian_information_closed_form():
    # isotropic Gaussian T with variance v in d dims, noise sigma = noise * rms = noise * sqrt(v)
    g = torch.Generator().manual_seed(0)
    d, n, noise = 4, 20000, 0.5
    t = torch.randn(n, d, generator=g, dtype=torch.float64) * 3.0
    expected = 0.5 * d * math.log(1 + 1 / noise**2)
    assert noisy_gaussian_information(t, noise=noise, dims=d).item() == pytest.approx(expected, rel=0.03)
    assert noisy_gaussian_information(torch.ones(10, 3)).item() == 0.0


def test_probe_information_bounds():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 4, (1200,), generator=g)
    informative = torch.nn.functional.one_hot(y, 4).double() * 5 + 0.1 * torch.randn(1200, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(1200, 4, generator=g, dtype=torch.float64)
    hi = probe_information(informative, y, generator=g).item()
    lo = probe_information(noise, y, generator=g).item()
    assert hi == pytest.approx(math.log(4), abs=0.05)
    assert lo < 0.05
    rows = information_plane({"good": informative, "bad": noise}, y, generator=g)
    assert [r.layer for r in rows] == ["good", "bad"]
    assert rows[0].i_label > rows[1].i_label


def test_flow_refuses_non_finite_activations():
    # NaN activations used to raise torch.linalg.LinAlgError from the SVD
    t = torch.randn(20, 4)
    t[3, 1] = float("nan")
    y = torch.randint(0, 2, (20,))
    with pytest.raises(ValueError, match="t"):
        noisy_gaussian_information(t)
    with pytest.raises(ValueError, match="t"):
        probe_information(t, y)
    with pytest.raises(ValueError, match="activations"):
        information_plane({"l": t}, y)
    with pytest.raises(ValueError, match="noise"):
        noisy_gaussian_information(torch.randn(20, 4), noise=float("nan"))


@pytest.mark.parametrize(
    "labels",
    [torch.rand(20), torch.zeros(19, dtype=torch.long), torch.zeros(20, 2, dtype=torch.long)],
    ids=["float", "short", "2d"],
)
def test_flow_refuses_bad_labels(labels):
    t = torch.randn(20, 4)
    with pytest.raises(ValueError, match="y"):
        probe_information(t, labels)
    with pytest.raises(ValueError, match="labels"):
        information_plane({"l": t}, labels)


def test_label_values_only_name_the_classes():
    # negative or sparse label values used to raise IndexError in the probe's cross-entropy;
    # I(T; Y) does not depend on the names of the classes
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 3, (300,), generator=g)
    t = torch.nn.functional.one_hot(y, 3).double() * 4 + 0.3 * torch.randn(300, 3, generator=g, dtype=torch.float64)
    a = probe_information(t, y, generator=torch.Generator().manual_seed(0))
    b = probe_information(t, torch.tensor([-7, 10**6, 42])[y], generator=torch.Generator().manual_seed(0))
    assert a.item() > 0.5 and b.item() == pytest.approx(a.item(), abs=1e-4)  # classes permuted: LBFGS round-off only


def test_flow_is_scale_free():
    # both coordinates are invariant to the activations' scale, also where squares overflow
    g = torch.Generator().manual_seed(4)
    t = torch.randn(50, 3, generator=g, dtype=torch.float64)
    a = noisy_gaussian_information(t)
    b = noisy_gaussian_information(t * 1e300)
    assert torch.isfinite(b) and b.item() == pytest.approx(a.item(), rel=1e-9)
