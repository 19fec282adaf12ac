"""FP8 / int8 quantization: round trips, and information kept ordered by precision and scale."""

import math

import pytest
import torch

from arr_coc.analysis import dequantize, quantization_report, quantize


@pytest.mark.parametrize("scheme", ["fp8_e4m3", "fp8_e5m2", "int8"])
@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_round_trip_error_is_within_the_format_step(scheme, gran):
    x = torch.randn(512, 8) * torch.logspace(-2, 1, 8)
    codes, scale = quantize(x, scheme, gran)
    assert codes.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)
    q = dequantize(codes, scale)
    assert torch.isfinite(q).all()
    rel = ((x - q).abs() / x.abs().clamp_min(1e-12))
    if scheme == "int8":
        assert ((x - q).abs() <= scale / 2 + 1e-7).all()  # round to nearest
    else:
        mantissa = 3 if scheme == "fp8_e4m3" else 2
        big = x.abs() > scale * 2.0**-6 * 4  # normal range of the format
        assert (rel[big] <= 2.0 ** -(mantissa + 1) + 1e-6).all()
    # the largest magnitude is represented exactly (absmax calibration)
    assert torch.isclose(q.abs().max(), x.abs().max(), rtol=1e-6)


def test_zero_channel_stays_zero_and_exact_values_survive():
    x = torch.zeros(4, 3)
    x[:, 1] = torch.tensor([1.0, -2.0, 0.5, 4.0])
    for scheme in ("fp8_e4m3", "int8"):
        q = dequantize(*quantize(x, scheme, "channel"))
        assert torch.equal(q[:, 0], torch.zeros(4))
    q = dequantize(*quantize(x, "fp8_e4m3", "channel"))
    assert torch.allclose(q[:, 1], x[:, 1])  # powers of two times a representable scale


def test_information_kept_rises_with_precision_and_per_channel_wins_on_unequal_scales():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 6, generator=g) * torch.tensor([0.001, 0.01, 0.1, 1.0, 10.0, 100.0])
    rows = {(r.scheme, r.granularity): r for r in quantization_report(x, ksg_samples=800, ksg_channels=6, generator=g)}
    # per-channel scales keep more on channels of very different scales: decisively for int8
    # (uniform steps) and for e4m3 (the narrow channels fall below its normal range), while
    # e5m2's 5-bit exponent spans these five decades either way (within 1 %)
    for scheme in ("fp8_e4m3", "int8"):
        assert rows[(scheme, "channel")].code_entropy > rows[(scheme, "tensor")].code_entropy + 0.1
        assert rows[(scheme, "channel")].gaussian_mi > rows[(scheme, "tensor")].gaussian_mi + 0.1
    e5 = rows[("fp8_e5m2", "channel")], rows[("fp8_e5m2", "tensor")]
    assert e5[0].gaussian_mi == pytest.approx(e5[1].gaussian_mi, rel=0.01)
    # e4m3 (3 mantissa bits) keeps more than e5m2 (2 bits) at the same granularity
    assert rows[("fp8_e4m3", "channel")].snr_db > rows[("fp8_e5m2", "channel")].snr_db
    assert rows[("fp8_e4m3", "channel")].gaussian_mi > rows[("fp8_e5m2", "channel")].gaussian_mi
    # a deterministic 8-bit code never carries more than 8 bits
    for r in rows.values():
        assert 0 <= r.code_entropy <= 8 * math.log(2) + 1e-9
    # int8 per-channel on Gaussians: SNR close to the uniform-noise prediction
    snr = rows[("int8", "channel")].snr_db
    assert 30 < snr < 45


def test_bad_input():
    with pytest.raises(ValueError, match="scheme"):
        quantize(torch.randn(3, 3), "fp4")
    with pytest.raises(ValueError, match="granularity"):
        quantize(torch.randn(3, 3), "int8", "row")
    with pytest.raises(ValueError, match="x"):
        quantize(torch.tensor([1.0, float("nan")]), "int8")
    with pytest.raises(ValueError, match="features"):
        quantization_report(torch.randn(10))


@pytest.mark.parametrize("axis", [2, -3, 5])
def test_out_of_range_axis_is_refused_not_wrapped(axis):
    # axis=2 on a 2-d tensor used to wrap to axis 0 silently
    with pytest.raises(ValueError, match="axis"):
        quantize(torch.randn(4, 3), "int8", "channel", axis=axis)


def test_axis_picks_the_channel_dimension():
    x = torch.randn(5, 3) * torch.tensor([[1.0], [10.0], [100.0], [0.1], [1.0]])
    _, scale0 = quantize(x, "int8", "channel", axis=0)
    _, scale_neg = quantize(x, "int8", "channel", axis=-2)
    assert scale0.shape == (5, 1) and torch.equal(scale0, scale_neg)
    assert torch.allclose(scale0[:, 0], x.abs().amax(1) / 127)


def test_values_beyond_float32_and_bad_codes_are_refused():
    with pytest.raises(ValueError, match="x"):
        quantize(torch.tensor([1.0, 1e300], dtype=torch.float64), "int8")
    with pytest.raises(ValueError, match="codes"):
        dequantize(torch.randn(3), torch.ones(1))
    with pytest.raises(ValueError, match="scale"):
        dequantize(torch.zeros(3, dtype=torch.int8), torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="scale"):
        dequantize(torch.zeros(3, dtype=torch.int8), torch.ones(2))


def test_report_on_exact_and_constant_channels():
    # column 0 constant, column 1 exactly representable (so reproduced exactly): 0 and inf,
    # never NaN; column 2 generic. The Gaussian view matches -1/2 log(1 - rho^2).
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.full((64,), 3.0), torch.tensor([1.0, -2.0, 0.5, 4.0] * 16), torch.randn(64, generator=g)], 1)
    rows = quantization_report(x, schemes=("int8",), granularities=("channel",), ksg_samples=64, ksg_channels=3, generator=g)
    r = rows[0]
    q = dequantize(*quantize(x, "int8", "channel"))
    from arr_coc.analysis.quantization import _channel_gaussian_mi

    per = _channel_gaussian_mi(x, q)
    assert per[0] == 0.0
    for c in (1, 2):  # the int8 grid does not hit 0.5 exactly, so column 1 is finite too
        rho = torch.corrcoef(torch.stack([x[:, c].double(), q[:, c].double()]))[0, 1].item()
        assert per[c].item() == pytest.approx(-0.5 * math.log(1 - rho**2), rel=1e-6)
    assert r.gaussian_mi == pytest.approx(float(per.mean()), rel=1e-12)
    exact = _channel_gaussian_mi(x[:, 1:2], x[:, 1:2])
    assert math.isinf(exact.item())
    for v in r.as_dict().values():
        assert not (isinstance(v, float) and math.isnan(v))


def test_report_bad_input():
    with pytest.raises(ValueError, match="features"):
        quantization_report(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="features"):
        quantization_report(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="k"):
        quantization_report(torch.randn(3, 3), k=3)
    with pytest.raises(ValueError, match="schemes"):
        quantization_report(torch.randn(8, 3), schemes="int8")
