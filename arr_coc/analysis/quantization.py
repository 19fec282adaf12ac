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
  channel from the correlation of x and Q(x), averaged over channels; the log-det estimator
  ``arr_coc.info.gaussian_mi`` on each channel pair. Equal to ``1/2 log(1 + SNR)`` when the
  error is uncorrelated with the signal.
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

from arr_coc.info import discrete_entropy, gaussian_mi, ksg_mi

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


def _scale(x: torch.Tensor, scheme: str, granularity: Granularity, axis: int) -> torch.Tensor:
    if granularity == "tensor":
        amax = x.abs().amax()
    elif granularity == "channel":
        dims = [d for d in range(x.dim()) if d != axis % x.dim()]
        amax = x.abs().amax(dim=dims, keepdim=True)
    else:
        raise ValueError(f"granularity: expected 'tensor' or 'channel', got {granularity!r}")
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))  # an all-zero channel stays zero
    return amax / _format_max(scheme)


def quantize(
    x: torch.Tensor, scheme: str = "fp8_e4m3", granularity: Granularity = "channel", *, axis: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` -> (codes, scale). Codes are float8 tensors or int8 tensors.

    ``axis`` is the channel axis for ``granularity="channel"`` (the last one by default).
    """
    if not isinstance(x, torch.Tensor) or x.numel() == 0:
        raise ValueError("x: expected a non-empty tensor")
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("x: expected finite values")
    xf = x.float()
    scale = _scale(xf, scheme, granularity, axis)
    dtype = SCHEMES[scheme]
    if dtype is None:
        codes = torch.round(xf / scale).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    else:
        codes = (xf / scale).clamp(-_format_max(scheme), _format_max(scheme)).to(dtype)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes and scale back to float32."""
    return codes.to(torch.float32) * scale


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
        raise ValueError("features: expected a [n, C] tensor with n >= 2 and C >= 2")
    x = features.float()
    n, c = x.shape
    rows_idx = torch.randperm(n, generator=generator)[: min(n, ksg_samples)]
    chans = torch.linspace(0, c - 1, min(c, ksg_channels)).round().long().unique()
    out = []
    for scheme in schemes:
        for gran in granularities:
            codes, scale = quantize(x, scheme, gran)
            q = dequantize(codes, scale)
            err = (x - q).pow(2).sum()
            snr = 10 * torch.log10(x.pow(2).sum() / err) if err > 0 else torch.tensor(float("inf"))
            code_h = _channel_code_entropy(codes).mean()
            g_mi = torch.stack(
                [gaussian_mi(x[:, j], q[:, j]) if x[:, j].std() > 0 else torch.zeros((), dtype=torch.float64) for j in range(c)]
            ).mean()
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
