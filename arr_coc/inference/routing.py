"""Route serving requests by how much their answer depends on the image.

Each request carries a score ``s`` (nats), e.g. the pointwise MI ``pmi(q; x)`` of its question
and image from :func:`arr_coc.inference.critic.pointwise_mi`: a question tied to what this
image shows scores high. Requests with ``s >= threshold`` take the full-token path, the rest
the compressed path (an allocator at a small budget); each path is batched separately
(batches never mix paths), in arrival order, at most ``max_batch_size`` requests a batch.
Lowering the threshold can only move requests to the full path (monotone).

```python
router = MIRouter(full_path=f, compressed_path=c, threshold=0.5, max_batch_size=64)
res = router(batch, scores)      # batch: dict of [R, ...] tensors; f, c: sub-batch -> [n, ...]
res.outputs, res.full, res.batches
```
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

__all__ = ["MIRouter", "RoutedOutput", "plan_batches", "route"]

FULL, COMPRESSED = "full", "compressed"


def _check_scores(scores: object) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or scores.ndim != 1:
        raise ValueError(f"scores: expected a [R] tensor, got {getattr(scores, 'shape', type(scores))}")
    if scores.is_complex() or not scores.is_floating_point() or not torch.isfinite(scores).all():
        raise ValueError("scores: expected finite real values")
    return scores


def _check_threshold(threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"threshold: expected a real number (+-inf allowed), got {threshold!r}")
    return float(threshold)


def route(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """[R] scores -> [R] bool, True = full path (``scores >= threshold``)."""
    return _check_scores(scores) >= _check_threshold(threshold)


def plan_batches(full: torch.Tensor, max_batch_size: int) -> list[tuple[str, torch.Tensor]]:
    """Per-path batches: [(path, request indices [n] long)], each path in arrival order.

    full: [R] bool. Full-path batches first, then compressed ones; every request appears once.
    """
    if not isinstance(full, torch.Tensor) or full.ndim != 1 or full.dtype != torch.bool:
        raise ValueError(f"full: expected a [R] bool tensor, got {getattr(full, 'dtype', type(full))}")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size: expected an int >= 1, got {max_batch_size!r}")
    out = []
    for path, rows in ((FULL, full.nonzero().squeeze(1)), (COMPRESSED, (~full).nonzero().squeeze(1))):
        out.extend((path, chunk) for chunk in rows.split(max_batch_size) if len(chunk))  # no empty batch
    return out


@dataclass
class RoutedOutput:
    """outputs [R, ...] in request order; full [R] bool; batches [(path, indices)]; seconds per path."""

    outputs: torch.Tensor
    full: torch.Tensor
    batches: list[tuple[str, torch.Tensor]]
    seconds: dict[str, float] = field(default_factory=dict)


class MIRouter:
    """Send each request to a full-token or a compressed path by its score.

    full_path / compressed_path: callables taking a sub-batch (the dict of tensors indexed by
    the batch's request rows) and returning a [n, ...] tensor. threshold: nats (``-inf``:
    everything full; ``+inf``: everything compressed). max_batch_size: per path.
    """

    def __init__(
        self,
        full_path: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
        compressed_path: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
        *,
        threshold: float,
        max_batch_size: int = 64,
    ) -> None:
        for name, fn in (("full_path", full_path), ("compressed_path", compressed_path)):
            if not callable(fn):
                raise ValueError(f"{name}: expected a callable, got {type(fn).__name__}")
        self.paths = {FULL: full_path, COMPRESSED: compressed_path}
        self.threshold = _check_threshold(threshold)
        plan_batches(torch.zeros(0, dtype=torch.bool), max_batch_size)  # validates max_batch_size
        self.max_batch_size = max_batch_size

    def __call__(self, batch: Mapping[str, torch.Tensor], scores: torch.Tensor) -> RoutedOutput:
        """Route and serve R >= 1 requests.

        The two paths must return the same trailing shape on the same device; their dtypes
        may differ (the outputs take ``torch.promote_types`` of all of them, e.g. float16 and
        float32 -> float32). No requests (R = 0) is a ValueError: the outputs' trailing shape
        would be unknown without calling a path on an empty batch.
        """
        scores = _check_scores(scores)
        r = scores.shape[0]
        if r == 0:
            raise ValueError("scores: expected at least one request (R >= 1), got R = 0")
        if not isinstance(batch, Mapping) or not batch:
            raise ValueError("batch: expected a non-empty mapping of [R, ...] tensors")
        for k, v in batch.items():
            if not isinstance(v, torch.Tensor) or v.ndim < 1 or v.shape[0] != r:
                raise ValueError(f"batch: entry {k!r} must be a tensor with R={r} rows, got {getattr(v, 'shape', type(v))}")
        full = route(scores, self.threshold)
        plan = plan_batches(full, self.max_batch_size)
        seconds = {FULL: 0.0, COMPRESSED: 0.0}
        results: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        for path, rows in plan:
            t0 = time.perf_counter()
            out = self.paths[path]({k: v[rows] for k, v in batch.items()})
            seconds[path] += time.perf_counter() - t0
            if not isinstance(out, torch.Tensor) or out.ndim < 1 or out.shape[0] != len(rows):
                raise ValueError(f"{path}_path: expected a tensor with {len(rows)} rows, got {getattr(out, 'shape', type(out))}")
            if results:
                first_path, _, first = results[0]
                if out.shape[1:] != first.shape[1:]:
                    raise ValueError(
                        f"{path}_path: returned rows of shape {tuple(out.shape[1:])}, but {first_path}_path "
                        f"returned {tuple(first.shape[1:])}: both paths must return the same per-request shape"
                    )
                if out.device != first.device:
                    raise ValueError(f"{path}_path: returned a tensor on {out.device}, but {first_path}_path on {first.device}")
            results.append((path, rows, out))
        dtype = results[0][2].dtype
        for _, _, out in results[1:]:
            dtype = torch.promote_types(dtype, out.dtype)
        first = results[0][2]
        outputs = torch.zeros((r, *first.shape[1:]), dtype=dtype, device=first.device)
        for _, rows, out in results:
            outputs[rows.to(first.device)] = out.to(dtype)
        return RoutedOutput(outputs=outputs, full=full, batches=plan, seconds=seconds)
