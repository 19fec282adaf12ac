"""Property fuzz over every public function of ``arr_coc.analysis`` (its ``__all__``).

Each function gets valid arguments with one of them replaced by a hostile value: NaN, inf,
huge or tiny magnitudes, empty, wrong rank, wrong dtype, mismatched lengths. The outcome must
be a ValueError whose message names an argument of the function, or a result without NaN
(finite, except where infinity is the documented answer). Any other exception type fails.
"""

from __future__ import annotations

import math

import pytest

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import arr_coc.analysis as analysis
from arr_coc.analysis import (
    ActivationRecorder,
    bubble_fraction,
    dequantize,
    gradient_snr,
    information_plane,
    noisy_gaussian_information,
    per_example_gradients,
    plan_stages,
    probe_information,
    quantization_report,
    quantize,
)
from tests.analysis.fuzzing import FUZZ, check, tensors

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 50),
    st.sampled_from([True, "1", None, 1e308, -0.0, complex(1, 1)]),
)


def test_every_public_function_is_fuzzed():
    fuzzed = {
        "ActivationRecorder", "LayerInformation", "QuantizationReport", "StagePlan", "bubble_fraction", "dequantize",
        "gradient_snr", "information_plane", "noisy_gaussian_information", "per_example_gradients", "plan_stages",
        "probe_information", "quantization_report", "quantize",
    }
    assert set(analysis.__all__) == fuzzed  # the three dataclasses are records the functions return


# ------------------------------------------------------------------ pipeline
@FUZZ
@given(
    compute=st.one_of(st.lists(NUMBERS, min_size=0, max_size=5), st.sampled_from(["abc", None, 3])),
    nbytes=st.lists(NUMBERS, min_size=0, max_size=5),
    stages=st.sampled_from([1, 2, 3, 0, -1, 2.0, True, "2"]),
    tolerance=st.sampled_from([0.0, 0.1, 1e300, -0.1, math.nan, math.inf, "0"]),
)
def test_plan_stages(compute, nbytes, stages, tolerance):
    out = check(plan_stages, ["compute", "activation_bytes", "num_stages", "tolerance"], compute, nbytes, stages, tolerance=tolerance)
    if out is not None:
        layers = len(compute)
        assert len(out.stage_compute) == stages and all(0 < b < layers for b in out.boundaries)
        assert out.boundaries == sorted(set(out.boundaries))
        assert sum(out.stage_compute) == pytest.approx(sum(float(c) for c in compute))
        assert 0 <= out.balance <= 1 + 1e-12


@FUZZ
@given(
    compute=st.lists(st.floats(0, 1e300, allow_subnormal=True), min_size=1, max_size=6),
    data=st.data(),
)
def test_plan_stages_values(compute, data):
    # every finite non-negative input: a valid plan whose slowest stage is the optimum when
    # tolerance is 0 (checked against the single-stage and one-layer-per-stage extremes)
    nbytes = data.draw(st.lists(st.floats(0, 1e300), min_size=len(compute), max_size=len(compute)))
    s = data.draw(st.integers(1, len(compute)))
    out = check(plan_stages, ["compute", "activation_bytes"], compute, nbytes, s, tolerance=0.0)
    if out is not None:
        assert out.max_compute >= max(compute) * (1 - 1e-12)  # no stage splits a layer
        assert out.max_compute <= sum(compute) * (1 + 1e-12)


@FUZZ
@given(stages=st.one_of(st.integers(-2, 10), st.sampled_from([2.0, True, None, "3"])), micro=st.one_of(st.integers(-2, 10), st.just(1.5)))
def test_bubble_fraction(stages, micro):
    out = check(bubble_fraction, ["num_stages", "num_microbatches"], stages, micro)
    if out is not None:
        assert 0 <= out < 1


@FUZZ
@given(grads=tensors(rank=(0, 3), size=(0, 4)), sizes=st.sampled_from([[1], [1, 4], [], [0], [2.5], "4", None]))
def test_gradient_snr(grads, sizes):
    out = check(gradient_snr, ["per_example", "batch_sizes"], grads, sizes, allow_inf=True)
    if out is not None:
        assert set(out) == set(sizes) and all(v >= 0 for v in out.values())


@settings(max_examples=15, deadline=None)
@given(
    x=tensors(shape=(3, 2), dtypes=[torch.float32, torch.float64]),
    n=st.sampled_from([1, 3, 0, -1, 2.0]),
    loss_kind=st.sampled_from(["ok", "vector", "int", "float", "const"]),
)
def test_per_example_gradients(x, n, loss_kind):
    model = nn.Linear(2, 1).double()

    def loss(m, i):
        out = m(x[i % 3].double()).sum()
        return {"ok": out, "vector": m(x.double()), "int": torch.tensor(1), "float": 1.0, "const": torch.tensor(1.0)}[loss_kind]

    out = check(per_example_gradients, ["model", "loss_fn", "num_examples", "params"], model, loss, n)
    if out is not None:
        assert out.shape == (n, 3) and out.dtype == torch.float64


# ------------------------------------------------------------------ quantization
@FUZZ
@given(
    x=tensors(rank=(0, 3), size=(0, 4)),
    scheme=st.sampled_from(["fp8_e4m3", "fp8_e5m2", "int8", "fp4", None]),
    gran=st.sampled_from(["tensor", "channel", "row"]),
    axis=st.sampled_from([-1, 0, 1, 2, -3, 5, 1.0, True]),
)
def test_quantize_and_dequantize(x, scheme, gran, axis):
    out = check(quantize, ["x", "scheme", "granularity", "axis"], x, scheme, gran, axis=axis)
    if out is not None:
        codes, scale = out
        q = check(dequantize, ["codes", "scale"], codes, scale)
        assert q is not None and q.shape == x.shape
        # absmax calibration: the largest magnitude survives (to float32 rounding)
        assert torch.isclose(q.abs().max(), x.float().abs().max(), rtol=1e-5, atol=0)


@FUZZ
@given(codes=tensors(rank=(0, 3), size=(0, 3)), scale=tensors(rank=(0, 3), size=(0, 3)))
def test_dequantize(codes, scale):
    codes = codes.to(torch.int8) if codes.dtype == torch.int64 else codes
    check(dequantize, ["codes", "scale"], codes, scale)


@settings(max_examples=12, deadline=None)
@given(
    features=tensors(rank=(1, 3), size=(0, 6)),
    k=st.sampled_from([1, 3, 0, 2.0]),
    ksg_samples=st.sampled_from([5, 64, 1, 0]),
)
def test_quantization_report(features, k, ksg_samples):
    names = ["features", "k", "ksg_samples", "ksg_channels", "schemes", "granularities"]
    out = check(
        quantization_report, names, features, ("int8",), ("channel",), ksg_samples=ksg_samples, ksg_channels=2, k=k,
        allow_inf=True,  # a channel reproduced exactly carries inf (documented)
    )
    if out is not None:
        (row,) = out
        assert 0 <= row.code_entropy <= 8 * math.log(2) + 1e-9 and row.mse >= 0


# ------------------------------------------------------------------ flow
@FUZZ
@given(t=tensors(rank=(0, 3), size=(0, 6)), noise=st.sampled_from([0.1, 1.0, 0.0, -1.0, math.nan, math.inf, True]), dims=st.sampled_from([1, 32, 0, 2.0]))
def test_noisy_gaussian_information(t, noise, dims):
    out = check(noisy_gaussian_information, ["t", "noise", "dims"], t, noise=noise, dims=dims)
    if out is not None:
        assert out >= -1e-9


@settings(max_examples=15, deadline=None)
@given(
    t=tensors(rank=(1, 3), size=(0, 6)),
    y=tensors(rank=(0, 2), size=(0, 6), dtypes=[torch.int64, torch.float32, torch.bool]),
    holdout=st.sampled_from([0.3, 0.0, 1.0, 0.99, math.nan]),
)
def test_probe_information(t, y, holdout):
    out = check(probe_information, ["t", "y", "holdout", "dims", "steps", "weight_decay"], t, y, holdout=holdout, steps=5)
    if out is not None:
        assert 0 <= out <= math.log(max(2, t.shape[0])) + 1e-9  # <= H(Y) <= log n


@settings(max_examples=12, deadline=None)
@given(
    t=tensors(rank=(1, 3), size=(0, 6)),
    labels=tensors(rank=(0, 2), size=(0, 6), dtypes=[torch.int64, torch.float64]),
    mapping=st.sampled_from(["dict", "list", "empty"]),
)
def test_information_plane(t, labels, mapping):
    acts = {"dict": {"l": t}, "list": [t], "empty": {}}[mapping]
    out = check(information_plane, ["activations", "labels", "noise", "dims"], acts, labels)
    if out is not None:
        assert len(out) == len(acts)


@FUZZ
@given(
    model=st.sampled_from(["module", "tensor", None]),
    layers=st.sampled_from([["0"], ["nope"], "0", [0], None, []]),
    pool=st.sampled_from(["default", None]),
)
def test_activation_recorder(model, layers, pool):
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    m = {"module": net, "tensor": torch.zeros(2), None: None}[model]
    kwargs = {} if pool == "default" else {"pool": pool}
    rec = check(ActivationRecorder, ["model", "layers", "pool"], m, layers, **kwargs)
    if rec is not None:
        with rec:
            net(torch.randn(4, 2))
        assert rec.num_hooks == 0 and all(len(mod._forward_hooks) == 0 for mod in net.modules())
