"""How much information survives quantization of weights or activations.

Schemes: FP8 (torch's ``float8_e4m3fn`` and ``float8_e5m2``) and int8 (symmetric, round to
nearest), each with a per-tensor or a per-channel scale (absmax calibration: the scale maps
the largest magnitude onto the format's largest finite value).

What is reported, per scheme, for features ``x`` of shape [n, C] (C channels):

- ``snr_db``: reconstruction signal-to-noise ratio ``10 log10(sum x^2 / sum (x - q)^2)``.
- ``code_entropy``: the quantizer is a deterministic function Q, so I(X; Q(X)) = H(Q(X))
  exactly; we report the plug-in entropy of each channel's codes, averaged over channels
  (nats). It is bounded by the number of bits of the format (8 ln 2 = 5.55 nats).
- ``gaussian_mi``: the additive-noise (Gaussian channel) view, ``-1/2 log(1 - rho^2)`` per
  channel from the correlation of x and Q(x), averaged over channels (what
  ``arr_coc.info.gaussian_mi`` gives for a scalar pair, computed for all channels at once in
  float64). Equal to ``1/2 log(1 + SNR)`` when the error is uncorrelated with the signal. A
  constant channel (or constant codes) carries 0; a channel reproduced exactly (rho = 1)
  carries ``inf``, as does ``snr_db`` when the whole tensor is reproduced exactly.
- ``ksg_mi``: the KSG estimate of I(x_c; Q(x_c)) per channel on a subsample, averaged. For a
  deterministic quantizer this estimates H(Q(X)) from continuous data and inherits KSG's
  small-sample bias; it is reported beside the exact code entropy so the two can be compared.

Per-channel scales matter when channels have very different ranges: a per-tensor scale is set
by the widest channel, and the narrow channels fall onto few codes. For int8 (uniform steps)
that costs information at any spread of scales; a floating-point format is scale-free inside
its dynamic range, so for FP8 it costs only once the narrow channels drop below the format's
smallest normal number (e4m3: 2^-6 of the scale; e5m2: 2^-14, five decades more).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from arr_coc.info import discrete_entropy, ksg_mi

__all__ = ["QuantizationReport", "SCHEMES", "dequantize", "quantization_report", "quantize"]

Granularity = Literal["tensor", "channel"]
SCHEMES: dict[str, torch.dtype | None] = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "int8": None,
}
_INT8_MAX = 127.0


def _format_max(scheme: str) -> float:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {sorted(SCHEMES)}, got {scheme!r}")
    dtype = SCHEMES[scheme]
    return _INT8_MAX if dtype is None else float(torch.finfo(dtype).max)


def _check_axis(axis: object, ndim: int) -> int:
    """A channel axis in [-ndim, ndim) -> its non-negative index (no silent wrap-around)."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise ValueError(f"axis: expected an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis: expected an int in [-{ndim}, {ndim}) for a {ndim}-d x, got {axis}")
    return axis % ndim


def _scale(x: torch.Tensor, scheme: str, granularity: Granularity, axis: int) -> torch.Tensor:
    if granularity == "tensor":
        amax = x.abs().amax()
    elif granularity == "channel":
        dims = [d for d in range(x.dim()) if d != axis]
        amax = x.abs().amax(dim=dims, keepdim=True) if dims else x.abs()
    else:
        raise ValueError(f"granularity: expected 'tensor' or 'channel', got {granularity!r}")
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))  # an all-zero channel stays zero
    return amax / _format_max(scheme)


def quantize(
    x: torch.Tensor, scheme: str = "fp8_e4m3", granularity: Granularity = "channel", *, axis: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` -> (codes, scale). Codes are float8 tensors or int8 tensors.

    ``axis`` is the channel axis for ``granularity="channel"`` (the last one by default), an
    int in ``[-x.dim(), x.dim())``; an axis outside that range is a ValueError, not a wrap.
    x must be finite in float32 (the scales are float32).
    """
    if not isinstance(x, torch.Tensor) or x.numel() == 0 or x.dim() == 0:
        raise ValueError(f"x: expected a non-empty tensor with at least one dim, got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("x: expected finite values")
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {sorted(SCHEMES)}, got {scheme!r}")
    if granularity not in ("tensor", "channel"):
        raise ValueError(f"granularity: expected 'tensor' or 'channel', got {granularity!r}")
    axis = _check_axis(axis, x.dim())
    xf = x.float()
    if not torch.isfinite(xf).all():
        raise ValueError("x: values overflow float32 (the quantizer computes in float32)")
    scale = _scale(xf, scheme, granularity, axis)
    dtype = SCHEMES[scheme]
    if dtype is None:
        codes = torch.round(xf / scale).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    else:
        codes = (xf / scale).clamp(-_format_max(scheme), _format_max(scheme)).to(dtype)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes and scale (as :func:`quantize` returns them) back to float32."""
    code_types = (torch.int8, *(d for d in SCHEMES.values() if d is not None))
    if not isinstance(codes, torch.Tensor) or codes.dtype not in code_types:
        raise ValueError(f"codes: expected an int8 or float8 tensor, got {getattr(codes, 'dtype', type(codes))}")
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point() or scale.dim() > codes.dim():
        raise ValueError(f"scale: expected a floating-point tensor broadcastable to codes, got {getattr(scale, 'shape', type(scale))}")
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise ValueError("scale: expected finite positive values")
    try:
        shape = torch.broadcast_shapes(codes.shape, scale.shape)
    except RuntimeError:
        raise ValueError(f"scale: shape {tuple(scale.shape)} does not broadcast to codes {tuple(codes.shape)}") from None
    if shape != codes.shape:
        raise ValueError(f"scale: shape {tuple(scale.shape)} does not broadcast to codes {tuple(codes.shape)}")
    out = codes.to(torch.float32) * scale.float()
    if not torch.isfinite(out).all():
        raise ValueError("codes: non-finite codes or values that overflow float32")
    return out


@dataclass
class QuantizationReport:
    scheme: str
    granularity: str
    snr_db: float
    code_entropy: float
    gaussian_mi: float
    ksg_mi: float
    mse: float

    def as_dict(self) -> dict:
        return asdict(self)


def _channel_code_entropy(codes: torch.Tensor) -> torch.Tensor:
    """Plug-in entropy (nats) of each column's codes: codes [n, C] -> [C]."""
    as_int = codes.view(torch.uint8).long() if codes.element_size() == 1 else codes.long()
    return torch.stack([discrete_entropy(as_int[:, c]) for c in range(as_int.shape[1])])


def _channel_gaussian_mi(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """-1/2 log(1 - rho_c^2) per column of x, q [n, C] -> [C] (0 for a constant column)."""
    xd, qd = x.double(), q.double()
    xd = xd - xd.mean(0)
    qd = qd - qd.mean(0)
    # scale each column by its peak first: products cannot overflow, rho is scale-free
    xd = xd / xd.abs().amax(0).clamp_min(torch.finfo(torch.float64).tiny)
    qd = qd / qd.abs().amax(0).clamp_min(torch.finfo(torch.float64).tiny)
    vx, vq = xd.pow(2).sum(0), qd.pow(2).sum(0)
    constant = (vx == 0) | (vq == 0)
    rho2 = ((xd * qd).sum(0).pow(2) / (vx * vq).clamp_min(torch.finfo(torch.float64).tiny)).clamp(0.0, 1.0)
    return torch.where(constant, torch.zeros_like(rho2), -0.5 * torch.log1p(-rho2))


def quantization_report(
    features: torch.Tensor,
    schemes: tuple[str, ...] = ("fp8_e4m3", "fp8_e5m2", "int8"),
    granularities: tuple[Granularity, ...] = ("tensor", "channel"),
    *,
    ksg_samples: int = 2000,
    ksg_channels: int = 16,
    k: int = 3,
    generator: torch.Generator | None = None,
) -> list[QuantizationReport]:
    """One row per (scheme, granularity) for features [n, C] (channels last).

    KSG runs on ``ksg_samples`` rows and ``ksg_channels`` evenly spaced channels to bound
    its cost; the other measures use everything.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or min(features.shape) < 2:
        raise ValueError(f"features: expected a [n, C] tensor with n >= 2 and C >= 2, got {getattr(features, 'shape', type(features))}")
    if not features.is_floating_point():
        raise ValueError(f"features: expected a floating-point tensor, got {features.dtype}")
    x = features.float()
    if not torch.isfinite(x).all():
        raise ValueError("features: expected finite values (in float32), found NaN or inf")
    for name, v, lo in (("ksg_samples", ksg_samples, 2), ("ksg_channels", ksg_channels, 1), ("k", k, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    n, c = x.shape
    if k >= min(n, ksg_samples):
        raise ValueError(f"k: expected < the rows KSG uses, min(n, ksg_samples) = {min(n, ksg_samples)}, got {k}")
    for name, v, allowed in (("schemes", schemes, tuple(SCHEMES)), ("granularities", granularities, ("tensor", "channel"))):
        if isinstance(v, str) or not all(isinstance(e, str) and e in allowed for e in v):
            raise ValueError(f"{name}: expected a tuple of some of {allowed}, got {v!r}")
    rows_idx = torch.randperm(n, generator=generator)[: min(n, ksg_samples)]
    chans = torch.linspace(0, c - 1, min(c, ksg_channels)).round().long().unique()
    out = []
    for scheme in schemes:
        for gran in granularities:
            codes, scale = quantize(x, scheme, gran)
            q = dequantize(codes, scale)
            err = (x.double() - q.double()).pow(2).sum()  # float64: squares of float32 values cannot overflow
            snr = 10 * torch.log10(x.double().pow(2).sum() / err) if err > 0 else torch.tensor(float("inf"))
            code_h = _channel_code_entropy(codes).mean()
            g_mi = _channel_gaussian_mi(x, q).mean()
            k_mi = torch.stack([ksg_mi(x[rows_idx, j], q[rows_idx, j], k=k) for j in chans.tolist()]).mean()
            out.append(
                QuantizationReport(
                    scheme=scheme,
                    granularity=gran,
                    snr_db=float(snr),
                    code_entropy=float(code_h),
                    gaussian_mi=float(g_mi),
                    ksg_mi=float(k_mi),
                    mse=float(err / x.numel()),
                )
            )
    return out
