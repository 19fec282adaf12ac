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
