"""Input checks shared by the inference modules: each bad input is a ValueError naming it."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["check_int", "check_matrix", "check_real", "check_vlm_pixels", "check_vlm_question"]


def check_int(name: str, v: object, lo: int = 1) -> int:
    """An int >= lo (bools refused)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    return v


def check_real(name: str, v: object, *, lo: float = -math.inf, lo_open: bool = False) -> float:
    """A finite real number >= lo (> lo when lo_open); bools refused."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or (lo_open and v == lo):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise ValueError(f"{name}: expected a finite number {bound}, got {v!r}")
    return float(v)


def check_matrix(name: str, x: object, dim: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A finite real [N, D] tensor (D = dim when given), cast to ``dtype`` when given.

    Integer and bool matrices are read as numbers; complex ones are refused. Values finite in
    their own dtype but not in ``dtype`` (float64 1e300 -> float32) are refused too.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        want = f"[*, {dim}]" if dim is not None else "[*, D]"
        raise ValueError(f"{name}: expected a {want} tensor, got {getattr(x, 'shape', type(x))}")
    if x.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one column, got {tuple(x.shape)}")
    if x.is_complex():
        raise ValueError(f"{name}: expected real values, got {x.dtype}")
    if dtype is not None:
        x = x.to(dtype)
    elif not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: expected finite values, found NaN or Inf" + (f" (in {dtype})" if dtype is not None else ""))
    return x


def check_vlm_pixels(vlm: nn.Module, pixels: object) -> torch.Tensor:
    """Images for ``vlm.encode_image``: finite real [B, 3, H, W] (B >= 1) at the ViT's size."""
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[0] < 1:
        raise ValueError(f"pixels: expected a [B >= 1, 3, H, W] tensor, got {getattr(pixels, 'shape', type(pixels))}")
    if not pixels.is_floating_point():
        raise ValueError(f"pixels: expected floating-point images in [0, 1], got {pixels.dtype}")
    size = getattr(getattr(getattr(vlm, "config", None), "vision", None), "img_size", None)
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(pixels.shape[2:]) != hw:
            raise ValueError(f"pixels: expected images of {hw[0]} x {hw[1]}, got {tuple(pixels.shape[2:])}")
    if not torch.isfinite(pixels).all():
        raise ValueError("pixels: expected finite values, found NaN or Inf")
    return pixels


def check_vlm_question(vlm: nn.Module, question_ids: object, question_mask: object, batch: int | None = None) -> None:
    """Token ids [B, T] (B >= 1, T >= 1) inside the LLM's vocabulary, and an optional [B, T] mask."""
    if not isinstance(question_ids, torch.Tensor) or question_ids.ndim != 2 or min(question_ids.shape) < 1:
        raise ValueError(f"question_ids: expected a non-empty [B, T] tensor, got {getattr(question_ids, 'shape', type(question_ids))}")
    if batch is not None and question_ids.shape[0] != batch:
        raise ValueError(f"question_ids: expected {batch} rows, got {question_ids.shape[0]}")
    if question_ids.is_floating_point() or question_ids.is_complex() or question_ids.dtype == torch.bool:
        raise ValueError(f"question_ids: expected integer token ids, got {question_ids.dtype}")
    vocab = vlm.llm.get_input_embeddings().num_embeddings
    if bool((question_ids < 0).any()) or bool((question_ids >= vocab).any()):
        raise ValueError(f"question_ids: expected token ids in [0, {vocab})")
    if question_mask is not None:
        if not isinstance(question_mask, torch.Tensor) or question_mask.shape != question_ids.shape:
            raise ValueError(
                f"question_mask: expected {tuple(question_ids.shape)} like question_ids, got {getattr(question_mask, 'shape', type(question_mask))}"
            )
        if question_mask.is_complex() or (question_mask.dtype != torch.bool and not bool(((question_mask == 0) | (question_mask == 1)).all())):
            raise ValueError("question_mask: expected a 0/1 or bool mask")
        if bool((question_mask.bool().sum(1) == 0).any()):
            raise ValueError("question_mask: expected at least one real token per row")
