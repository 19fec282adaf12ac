"""Information flow through the layers of a network, recorded with forward hooks.

``ActivationRecorder`` registers forward hooks on named submodules, keeps what they output
(pooled to one vector per example), and removes every hook on ``eject()`` (or on leaving the
``with`` block): the model is never edited.

``information_plane`` turns the recorded activations T_k into the two coordinates of the
information plane for each layer:

- ``I(X; T_k)``: a deterministic network gives I(X; T) = infinity for continuous X, so the
  quantity is only meaningful for a noisy view ``T + eps``, eps ~ N(0, sigma^2 I) (the
  convention of Saxe et al. 2018 and Goldfeld et al. 2019). We report the Gaussian upper
  bound ``h(T + eps) - h(eps) <= 1/2 log det(I + Cov(T) / sigma^2)`` on the top principal
  components of T (the rest carry little variance), with sigma set relative to the layer's
  scale (``noise`` times the RMS of T), so layers of different scales are comparable.
- ``I(T_k; Y)`` for a discrete label Y: a lower bound from a linear probe,
  ``H(Y) - CE(probe)`` (held-out cross-entropy of a multinomial logistic regression on the
  principal components), never above H(Y).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from arr_coc.info import discrete_entropy

__all__ = ["ActivationRecorder", "LayerInformation", "information_plane", "probe_information", "noisy_gaussian_information"]


def _pool(out) -> torch.Tensor:
    """Module output -> [B, D] (mean over token/space dims; first element of tuples)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"layer output: expected a tensor, got {type(out).__name__}")
    t = out.detach().float()
    if t.dim() == 1:
        return t[:, None]
    if t.dim() == 4:  # [B, C, H, W]
        return t.mean(dim=(2, 3))
    return t.reshape(t.shape[0], -1, t.shape[-1]).mean(1) if t.dim() > 2 else t


class ActivationRecorder:
    """Record pooled outputs of named submodules; hooks removed by ``eject()``.

    >>> with ActivationRecorder(model, ["blocks.0", "blocks.3"]) as rec:
    ...     model(x)
    >>> rec.activations["blocks.0"]  # [B, D]
    """

    def __init__(self, model: nn.Module, layers: Iterable[str], pool: Callable = _pool):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
        if isinstance(layers, str) or not isinstance(layers, Iterable):
            raise ValueError(f"layers: expected an iterable of submodule names, got {layers!r}")
        if not callable(pool):
            raise ValueError(f"pool: expected a callable, got {type(pool).__name__}")
        modules = dict(model.named_modules())
        layers = list(layers)
        if not all(isinstance(n, str) for n in layers):
            raise ValueError(f"layers: expected submodule names (str), got {layers!r}")
        missing = [n for n in layers if n not in modules]
        if missing:
            raise ValueError(f"layers: {missing} are not submodules of the model")
        self.activations: dict[str, torch.Tensor] = {}
        self._chunks: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        self._handles = [
            modules[n].register_forward_hook(self._make_hook(n, pool)) for n in layers
        ]

    def _make_hook(self, name: str, pool: Callable):
        def hook(_module, _inputs, output):
            self._chunks[name].append(pool(output))
            self.activations[name] = torch.cat(self._chunks[name])

        return hook

    @property
    def num_hooks(self) -> int:
        return len(self._handles)

    def eject(self) -> None:
        """Remove every hook this recorder added."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "ActivationRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.eject()


def _check_activations(name: str, t: object) -> torch.Tensor:
    """Activations [n, D] (n >= 3, D >= 1), real and finite -> float64, divided by the peak
    magnitude (both coordinates are scale-free; this keeps squares from overflowing)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] < 3 or t.shape[1] < 1:
        raise ValueError(f"{name}: expected activations [n, D] with n >= 3, D >= 1, got {getattr(t, 'shape', type(t))}")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected real activations, got {t.dtype}")
    t = t.detach().double()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: expected finite activations, found NaN or inf")
    peak = t.abs().amax()
    return t / peak if peak > 0 else t


def _check_positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    return v


def _check_noise(noise: object) -> float:
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise <= 0:
        raise ValueError(f"noise: expected a finite positive relative noise level, got {noise!r}")
    return float(noise)


def _check_labels(labels: object, n: int, name: str = "y") -> torch.Tensor:
    """Integer labels [n] -> consecutive class ids 0..K-1 (the label values are names only)."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name}: expected integer labels [n={n}] matching the activations, got {getattr(labels, 'shape', type(labels))}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor of class labels, got {labels.dtype}")
    return torch.unique(labels, return_inverse=True)[1].long()


def _pca(t: torch.Tensor, dims: int) -> torch.Tensor:
    t = t.double() - t.double().mean(0)
    dims = min(dims, t.shape[0] - 1, t.shape[1])
    _, _, v = torch.linalg.svd(t, full_matrices=False)
    return t @ v[:dims].T


def noisy_gaussian_information(t: torch.Tensor, *, noise: float = 0.1, dims: int = 32) -> torch.Tensor:
    """Gaussian upper bound on I(X; T + eps) in nats for activations t [n, D] (see module doc).

    Constant activations carry 0. Bad input (NaN / inf, wrong shape): ValueError naming it.
    """
    t = _check_activations("t", t)
    noise = _check_noise(noise)
    dims = _check_positive_int("dims", dims)
    z = _pca(t, dims)
    rms = t.sub(t.mean(0)).pow(2).mean().sqrt()
    if rms == 0:
        return torch.zeros((), dtype=torch.float64)
    sigma2 = (noise * rms) ** 2
    cov = z.T @ z / (z.shape[0] - 1)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    return 0.5 * torch.linalg.slogdet(eye + cov / sigma2)[1]


def probe_information(
    t: torch.Tensor,
    y: torch.Tensor,
    *,
    dims: int = 32,
    steps: int = 300,
    weight_decay: float = 1e-3,
    holdout: float = 0.3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Lower bound on I(T; Y) in nats: H(Y) - held-out cross-entropy of a linear probe.

    t [n, D] activations (n >= 3), y [n] integer labels (any integer values: they only name
    the classes, so they are mapped to 0..K-1 first). Clipped below at 0 only in the sense
    that a probe that does worse than the prior is replaced by the prior (a valid bound: 0).
    holdout: fraction of rows held out, in (0, 1), leaving at least one row on each side.
    """
    t = _check_activations("t", t)
    n = t.shape[0]
    y = _check_labels(y, n)
    dims = _check_positive_int("dims", dims)
    steps = _check_positive_int("steps", steps)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay: expected a finite number >= 0, got {weight_decay!r}")
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
        raise ValueError(f"holdout: expected a fraction in (0, 1), got {holdout!r}")
    n_test = max(1, int(round(holdout * n)))
    if n_test >= n:
        raise ValueError(f"holdout: {holdout} of n = {n} rows leaves no training row")
    z = _pca(t, dims).float()
    z = z / z.std(0).clamp_min(1e-8)
    perm = torch.randperm(n, generator=generator)
    test, train = perm[:n_test], perm[n_test:]
    classes = int(y.max()) + 1
    probe = nn.Linear(z.shape[1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(probe(z[train]), y[train]) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        ce = nn.functional.cross_entropy(probe(z[test]), y[test]).double()
    h_y = discrete_entropy(y[test])
    if not torch.isfinite(ce):  # a diverged probe is no better than the prior: the bound 0
        return torch.zeros((), dtype=torch.float64)
    return torch.clamp(h_y - ce, min=0.0)


@dataclass
class LayerInformation:
    layer: str
    i_input: float  # I(X; T_k) Gaussian noisy-channel bound, nats
    i_label: float  # I(T_k; Y) probe lower bound, nats
    dim: int


def information_plane(
    activations: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    noise: float = 0.1,
    dims: int = 32,
    generator: torch.Generator | None = None,
) -> list[LayerInformation]:
    """Both coordinates for every recorded layer, in the order given.

    activations: {layer: [n, D]}; labels: [n] integer labels. Bad input: ValueError naming
    ``activations[layer]``, ``labels``, ``noise`` or ``dims``.
    """
    if not isinstance(activations, Mapping):
        raise ValueError(f"activations: expected a mapping of layer -> [n, D] tensors, got {type(activations).__name__}")
    noise = _check_noise(noise)
    dims = _check_positive_int("dims", dims)
    rows = []
    for name, t in activations.items():
        _check_activations(f"activations[{name!r}]", t)
        _check_labels(labels, t.shape[0], "labels")
        rows.append(
            LayerInformation(
                layer=name,
                i_input=float(noisy_gaussian_information(t, noise=noise, dims=dims)),
                i_label=float(probe_information(t, labels, dims=dims, generator=generator)),
                dim=int(t.shape[1]),
            )
        )
    return rows
