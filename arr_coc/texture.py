"""Per-patch texture features and query-agnostic patch scores computed from the pixels.

The original ARR-COC built a per-pixel "texture array" (colour, CIELAB, Sobel edges,
position, eccentricity) and scored patches from it. This module does it properly:

- :func:`rgb_to_lab`: sRGB (D65) -> CIELAB by the CIE formulas (linearise, XYZ, f(t)).
- :func:`sobel`: 3 x 3 Sobel derivatives, normalised so a ramp of slope s reads s.
- :func:`texture_maps`: the per-pixel array [B, 12, H, W] (:data:`TEXTURE_CHANNELS`).
- :func:`texture_array`: its area average over each patch of the token grid, [B, N, 12].
- :func:`patch_entropy` (propositional): the Shannon entropy, in nats, of each patch's own
  colour (joint RGB) or intensity (L*) histogram - an estimate from the patch's pixels,
  not a softmax across channels.
- :func:`patch_contrast`, :func:`colour_distinctness`, :func:`edge_density` and their
  combination :func:`perspectival_salience` (perspectival: what stands out).

Conventions: ``pixels`` is [B, C, H, W] with C = 3 (RGB) or 1 (grey), values in [0, 1]
(un-normalised); ``grid`` = (gh, gw) is the token grid (N = gh * gw patches in raster
order, as the vision tokens). When H or W is not a multiple of the grid, the image is first
resampled by area averaging to (gh * floor(H / gh), gw * floor(W / gw)) so that every patch
has the same number of pixels. Nothing is normalised across the batch: one image's scores
never depend on the other images. Computation is in float32 (float64 stays float64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = [
    "TEXTURE_CHANNELS",
    "colour_distinctness",
    "edge_density",
    "patch_contrast",
    "patch_entropy",
    "patch_pixels",
    "perspectival_salience",
    "rgb_to_lab",
    "sobel",
    "texture_array",
    "texture_maps",
]

TEXTURE_CHANNELS: tuple[str, ...] = (
    "red", "green", "blue",          # sRGB in [0, 1]
    "lightness", "lab_a", "lab_b",   # L* / 100, a* / 128, b* / 128
    "sobel_x", "sobel_y", "sobel_magnitude",  # derivatives of L* / 100 per pixel
    "row", "col",                    # pixel centre, in [0, 1]
    "eccentricity",                  # distance from the image centre, 0 at the centre, 1 at the corners
)

# sRGB (IEC 61966-2-1) linear RGB -> CIE XYZ, D65 white
_RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)


def _dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_pixels(pixels: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1] not in (1, 3):
        got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"pixels: expected a [B, C, H, W] tensor with C = 1 or 3, got {got}")
    x = pixels.to(_dtype(pixels))
    if not torch.isfinite(x).all():
        raise ValueError("pixels: expected finite values, found NaN or Inf")
    if x.numel() and (x.min() < -1e-6 or x.max() > 1 + 1e-6):
        raise ValueError(
            f"pixels: expected un-normalised values in [0, 1], got range [{x.min().item():.3g}, {x.max().item():.3g}]"
        )
    if grid is not None:
        if len(grid) != 2 or int(grid[0]) < 1 or int(grid[1]) < 1:
            raise ValueError(f"grid: expected (gh, gw) with positive sizes, got {tuple(grid)}")
        if int(grid[0]) > x.shape[2] or int(grid[1]) > x.shape[3]:
            raise ValueError(f"grid: {tuple(grid)} has more cells than the image has pixels {tuple(x.shape[2:])}")
    return x.clamp(0.0, 1.0)


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] [B, 3, H, W] (or [B, 1, H, W] grey) -> CIELAB [B, 3, H, W] (L* in [0, 100])."""
    x = _rgb(_check_pixels(rgb))
    lin = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    m = torch.tensor(_RGB_TO_XYZ, dtype=x.dtype, device=x.device)
    white = torch.tensor(_WHITE_D65, dtype=x.dtype, device=x.device)
    xyz = torch.einsum("ij,bjhw->bihw", m, lin) / white[None, :, None, None]
    delta = 6.0 / 29.0
    f = torch.where(xyz > delta**3, xyz.clamp(min=delta**3) ** (1.0 / 3.0), xyz / (3 * delta**2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def sobel(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """3 x 3 Sobel derivatives of [B, 1, H, W] -> (d/dx, d/dy), each [B, 1, H, W].

    Divided by 8 so that a linear ramp of slope s per pixel reads exactly s; borders are
    replicated (no spurious edge at the image boundary).
    """
    if image.dim() != 4 or image.shape[1] != 1:
        raise ValueError(f"image: expected [B, 1, H, W], got {tuple(image.shape)}")
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=image.dtype, device=image.device) / 8
    padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, kx[None, None])
    gy = F.conv2d(padded, kx.t()[None, None])
    return gx, gy


def _lightness(x: torch.Tensor) -> torch.Tensor:
    """L* / 100 in [0, 1], [B, 1, H, W]."""
    return rgb_to_lab(x)[:, :1] / 100.0


def texture_maps(pixels: torch.Tensor) -> torch.Tensor:
    """The per-pixel texture array [B, C, H, W] -> [B, 12, H, W], channels :data:`TEXTURE_CHANNELS`."""
    x = _rgb(_check_pixels(pixels))
    b, _, h, w = x.shape
    lab = rgb_to_lab(x)
    gx, gy = sobel(lab[:, :1] / 100.0)
    rows = (torch.arange(h, dtype=x.dtype, device=x.device) + 0.5) / h
    cols = (torch.arange(w, dtype=x.dtype, device=x.device) + 0.5) / w
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    ecc = torch.sqrt((2 * rr - 1) ** 2 + (2 * cc - 1) ** 2) / math.sqrt(2.0)
    pos = torch.stack([rr, cc, ecc])[None].expand(b, -1, -1, -1)
    scaled_lab = lab / torch.tensor([100.0, 128.0, 128.0], dtype=x.dtype, device=x.device)[None, :, None, None]
    return torch.cat([x, scaled_lab, gx, gy, torch.sqrt(gx**2 + gy**2), pos], dim=1)


def _fit_to_grid(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Area-resample [B, C, H, W] to (gh * floor(H / gh), gw * floor(W / gw)) when needed."""
    gh, gw = int(grid[0]), int(grid[1])
    h, w = maps.shape[-2:]
    th, tw = gh * (h // gh), gw * (w // gw)
    if (th, tw) == (h, w):
        return maps
    return F.interpolate(maps, size=(th, tw), mode="area")


def patch_pixels(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-pixel maps [B, C, H, W] -> the pixels of each patch [B, N, P, C] (P pixels per patch)."""
    fitted = _fit_to_grid(maps, grid)
    return rearrange(fitted, "b c (gh ph) (gw pw) -> b (gh gw) (ph pw) c", gh=int(grid[0]), gw=int(grid[1]))


def texture_array(pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Area average of :func:`texture_maps` over each patch: [B, C, H, W] -> [B, N, 12]."""
    _check_pixels(pixels, grid)
    return patch_pixels(texture_maps(pixels), grid).mean(dim=2)


def _entropy_from_counts(counts: torch.Tensor, miller_madow: bool) -> torch.Tensor:
    total = counts.sum(dim=-1, keepdim=True)
    p = counts / total
    h = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(dim=-1)
    if miller_madow:
        occupied = (counts > 0).sum(dim=-1).to(h.dtype)
        h = h + (occupied - 1) / (2 * total[..., 0])
    return h


def patch_entropy(
    pixels: torch.Tensor,
    grid: tuple[int, int],
    *,
    mode: str = "colour",
    bins: int | None = None,
    miller_madow: bool = False,
) -> torch.Tensor:
    """Shannon entropy (nats) of each patch's own histogram: [B, C, H, W] -> [B, N].

    ``mode="colour"``: joint histogram of the RGB values quantised to ``bins`` levels per
    channel (default 8, i.e. 512 colours; a grey image uses its single channel);
    ``mode="intensity"``: histogram of L* / 100 in ``bins`` levels (default 16). The plug-in
    estimate ``-sum p log p`` over the patch's pixels (after area resampling to a multiple of
    the grid), so a constant patch has 0 and a patch split evenly between two colours in
    different bins has log 2; ``miller_madow`` adds the (occupied bins - 1) / (2 n) bias
    correction.
    """
    x = _check_pixels(pixels, grid)
    if mode not in ("colour", "intensity"):
        raise ValueError(f"mode: expected 'colour' or 'intensity', got {mode!r}")
    if bins is None:
        bins = 8 if mode == "colour" else 16
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins: expected a positive int, got {bins!r}")
    x = _fit_to_grid(x, grid)
    if mode == "intensity" or x.shape[1] == 1:
        values = _lightness(x) if mode == "intensity" else x
        ids = (values[:, 0] * bins).floor().clamp(0, bins - 1).long()
        n_bins = bins
    else:
        q = (x * bins).floor().clamp(0, bins - 1).long()
        ids = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
        n_bins = bins**3
    ids = rearrange(ids, "b (gh ph) (gw pw) -> b (gh gw) (ph pw)", gh=int(grid[0]), gw=int(grid[1]))
    counts = torch.zeros(*ids.shape[:2], n_bins, dtype=x.dtype, device=x.device)
    counts.scatter_add_(2, ids, torch.ones_like(ids, dtype=x.dtype))
    return _entropy_from_counts(counts, miller_madow)


def patch_contrast(pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """RMS contrast: standard deviation of L* / 100 over each patch's pixels, [B, C, H, W] -> [B, N] in [0, 0.5]."""
    x = _check_pixels(pixels, grid)
    return patch_pixels(_lightness(x), grid)[..., 0].std(dim=2, correction=0)


def colour_distinctness(pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """CIELAB distance (Delta E 1976) of each patch's mean colour from its image's mean colour: [B, N] >= 0."""
    x = _check_pixels(pixels, grid)
    lab = patch_pixels(rgb_to_lab(x), grid).mean(dim=2)  # [B, N, 3]
    return torch.linalg.vector_norm(lab - lab.mean(dim=1, keepdim=True), dim=-1)


def edge_density(pixels: torch.Tensor, grid: tuple[int, int], *, threshold: float = 0.1) -> torch.Tensor:
    """Fraction of each patch's pixels whose Sobel gradient of L* / 100 exceeds ``threshold`` per pixel: [B, N] in [0, 1].

    A step edge of lightness contrast c gives 0.5 c on the pixels either side of it, so the
    default 0.1 counts steps of at least 0.2 (20 L* units).
    """
    x = _check_pixels(pixels, grid)
    if not threshold >= 0:
        raise ValueError(f"threshold: expected >= 0, got {threshold!r}")
    gx, gy = sobel(_lightness(x))
    edges = (torch.sqrt(gx**2 + gy**2) > threshold).to(x.dtype)
    return patch_pixels(edges, grid)[..., 0].mean(dim=2)


def perspectival_salience(
    pixels: torch.Tensor, grid: tuple[int, int], *, edge_threshold: float = 0.1
) -> torch.Tensor:
    """What stands out, in [0, 1]: [B, C, H, W] -> [B, N].

    The mean of three fixed-scale terms, each in [0, 1]: ``2 * patch_contrast`` (local
    lightness contrast), ``min(colour_distinctness / 100, 1)`` (colour contrast with the rest
    of the image) and ``edge_density``. Fixed scales, not per-batch normalisation, so one
    image's scores never depend on the others.
    """
    contrast = 2.0 * patch_contrast(pixels, grid)
    distinct = (colour_distinctness(pixels, grid) / 100.0).clamp(max=1.0)
    edges = edge_density(pixels, grid, threshold=edge_threshold)
    return (contrast + distinct + edges) / 3.0
