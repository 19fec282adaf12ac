"""Texture array and pixel-based patch scores: closed forms, an oracle histogram, independence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy

from arr_coc.texture import (
    TEXTURE_CHANNELS,
    colour_distinctness,
    edge_density,
    patch_contrast,
    patch_entropy,
    perspectival_salience,
    rgb_to_lab,
    sobel,
    texture_array,
    texture_maps,
)


def solid(rgb, h=8, w=8, b=1):
    return torch.tensor(rgb, dtype=torch.float32)[None, :, None, None].expand(b, 3, h, w).clone()


# ---------------------------------------------------------------------------- colour
@pytest.mark.parametrize(
    "rgb, lab",
    [  # published sRGB (D65) -> CIELAB values
        ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
        ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
        ((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),
        ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
        ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602)),
    ],
)
def test_rgb_to_lab_matches_published_values(rgb, lab):
    got = rgb_to_lab(solid(rgb, 1, 1))[0, :, 0, 0]
    torch.testing.assert_close(got, torch.tensor(lab), atol=2e-3, rtol=0)


def test_greys_are_achromatic_and_lightness_is_monotone():
    v = torch.linspace(0, 1, 11)
    grey = v[None, None, None, :].expand(1, 3, 1, 11)
    lab = rgb_to_lab(grey)[0, :, 0]
    torch.testing.assert_close(lab[1:], torch.zeros(2, 11), atol=1e-3, rtol=0)
    assert (lab[0, 1:] > lab[0, :-1]).all()
    torch.testing.assert_close(rgb_to_lab(grey[:, :1]), rgb_to_lab(grey))  # 1-channel grey = RGB grey


def test_sobel_reads_the_slope_of_a_ramp():
    slope = 0.03
    ramp = (torch.arange(12.0) * slope)[None, None, None, :].expand(1, 1, 6, 12)
    gx, gy = sobel(ramp)
    torch.testing.assert_close(gx[..., 1:-1], torch.full_like(gx[..., 1:-1], slope))
    torch.testing.assert_close(gy, torch.zeros_like(gy), atol=1e-6, rtol=0)
    gx_t, gy_t = sobel(ramp.transpose(2, 3))
    torch.testing.assert_close(gy_t[..., 1:-1, :], torch.full_like(gy_t[..., 1:-1, :], slope))


# ---------------------------------------------------------------------------- entropy
def test_entropy_of_a_constant_patch_is_zero():
    img = solid((0.3, 0.6, 0.1), 16, 16, b=2)
    for mode in ("colour", "intensity"):
        h = patch_entropy(img, (2, 2), mode=mode)
        assert h.shape == (2, 4)
        assert torch.equal(h, torch.zeros_like(h))


def test_entropy_of_a_half_half_two_colour_patch_is_log_2():
    img = solid((0.0, 0.0, 1.0), 8, 8)
    img[:, :, :, :4] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    torch.testing.assert_close(patch_entropy(img, (1, 1)), torch.tensor([[math.log(2)]]))
    torch.testing.assert_close(patch_entropy(img, (1, 1), mode="intensity"), torch.tensor([[math.log(2)]]))
    # Miller-Madow adds (occupied bins - 1) / (2 n) = 1 / 128
    torch.testing.assert_close(patch_entropy(img, (1, 1), miller_madow=True), torch.tensor([[math.log(2) + 1 / 128]]))
    # split in 2 x 2 patches: each quadrant is a single colour
    assert torch.equal(patch_entropy(img, (2, 2)), torch.zeros(1, 4))
    # four colours in equal quarters: log 4
    img[:, :, 4:, :4] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]
    img[:, :, 4:, 4:] = torch.tensor([1.0, 1.0, 1.0])[:, None, None]
    torch.testing.assert_close(patch_entropy(img, (1, 1)), torch.tensor([[math.log(4)]]))


def test_entropy_matches_a_histogram_oracle():
    g = torch.Generator().manual_seed(3)
    img = torch.rand(2, 3, 12, 18, generator=g)
    bins, grid = 4, (3, 2)
    got = patch_entropy(img, grid, bins=bins)
    q = np.minimum(np.floor(img.numpy() * bins), bins - 1).astype(int)
    ids = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]  # [B, H, W]
    ph, pw = 12 // grid[0], 18 // grid[1]
    want = np.zeros((2, grid[0] * grid[1]))
    for b in range(2):
        for i in range(grid[0]):
            for j in range(grid[1]):
                patch = ids[b, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw].ravel()
                want[b, i * grid[1] + j] = scipy_entropy(np.bincount(patch, minlength=bins**3))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


def test_entropy_is_unchanged_by_integer_upsampling_and_handles_non_multiples():
    g = torch.Generator().manual_seed(4)
    img = (torch.rand(1, 3, 8, 8, generator=g) * 4).floor() / 4
    up = img.repeat_interleave(3, dim=2).repeat_interleave(3, dim=3)  # nearest x3: same histograms
    torch.testing.assert_close(patch_entropy(up, (2, 2)), patch_entropy(img, (2, 2)))
    # 10 x 10 on a 3 x 3 grid: area-resampled to 9 x 9 first; a constant image stays at 0
    assert torch.equal(patch_entropy(solid((0.2, 0.4, 0.6), 10, 10), (3, 3)), torch.zeros(1, 9))
    assert patch_entropy(torch.rand(1, 3, 10, 11, generator=g), (3, 3)).shape == (1, 9)


# ---------------------------------------------------------------------------- perspectival
def test_contrast_edges_and_distinctness_closed_forms():
    img = torch.zeros(1, 3, 8, 8)
    img[..., 4:] = 1.0  # black | white, one patch
    torch.testing.assert_close(patch_contrast(img, (1, 1)), torch.tensor([[0.5]]))
    # the step gives a gradient of 0.5 on the two columns either side of it: 2 of 8 columns
    torch.testing.assert_close(edge_density(img, (1, 1)), torch.tensor([[0.25]]))
    # 2 x 2 grid: each patch is uniform, but the columns next to the step still see it
    torch.testing.assert_close(edge_density(img, (2, 2)), torch.full((1, 4), 0.25))
    flat = solid((0.5, 0.5, 0.5))
    assert torch.equal(patch_contrast(flat, (2, 2)), torch.zeros(1, 4))
    assert torch.equal(edge_density(flat, (2, 2)), torch.zeros(1, 4))
    torch.testing.assert_close(colour_distinctness(flat, (2, 2)), torch.zeros(1, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(perspectival_salience(flat, (2, 2)), torch.zeros(1, 4), atol=1e-6, rtol=0)
    # one red patch among three grey ones: Delta E from the image's mean colour
    img = solid((0.5, 0.5, 0.5))
    img[:, :, :4, :4] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    lab_red = rgb_to_lab(solid((1.0, 0.0, 0.0), 1, 1))[0, :, 0, 0]
    lab_grey = rgb_to_lab(solid((0.5, 0.5, 0.5), 1, 1))[0, :, 0, 0]
    mean = (lab_red + 3 * lab_grey) / 4
    want = torch.stack([(lab_red - mean).norm()] + [(lab_grey - mean).norm()] * 3)
    torch.testing.assert_close(colour_distinctness(img, (2, 2))[0], want, rtol=1e-5, atol=1e-4)
    sal = perspectival_salience(img, (2, 2))
    assert ((sal >= 0) & (sal <= 1)).all() and sal[0, 0] == sal.max()


def test_scores_of_one_image_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(5)
    a = torch.rand(1, 3, 16, 16, generator=g)
    others = torch.cat([solid((1.0, 1.0, 1.0), 16, 16), torch.rand(1, 3, 16, 16, generator=g) * 0.1])
    batch = torch.cat([a, others])
    for fn in (patch_entropy, patch_contrast, colour_distinctness, edge_density, perspectival_salience, texture_array):
        torch.testing.assert_close(fn(batch, (4, 4))[:1], fn(a, (4, 4)), msg=fn.__name__)


# ---------------------------------------------------------------------------- texture array
def test_texture_array_channels_are_patch_averages():
    g = torch.Generator().manual_seed(6)
    img = torch.rand(2, 3, 12, 8, generator=g)
    maps = texture_maps(img)
    assert maps.shape == (2, len(TEXTURE_CHANNELS), 12, 8)
    arr = texture_array(img, (3, 2))  # 4 x 4 pixel patches
    assert arr.shape == (2, 6, len(TEXTURE_CHANNELS))
    torch.testing.assert_close(arr[..., :3], img.unfold(2, 4, 4).unfold(3, 4, 4).mean((-1, -2)).flatten(2).transpose(1, 2))
    row, col, ecc = (TEXTURE_CHANNELS.index(c) for c in ("row", "col", "eccentricity"))
    # patch (i, j) centre: row (4 i + 2) / 12, col (4 j + 2) / 8
    torch.testing.assert_close(arr[0, :, row], torch.tensor([2, 2, 6, 6, 10, 10.0]) / 12)
    torch.testing.assert_close(arr[0, :, col], torch.tensor([2, 6.0] * 3) / 8)
    assert maps[0, ecc].min() >= 0 and maps[0, ecc].max() <= 1
    lab = TEXTURE_CHANNELS.index("lightness")
    torch.testing.assert_close(maps[:, lab], rgb_to_lab(img)[:, 0] / 100)


@pytest.mark.parametrize(
    "pixels, grid, match",
    [
        (torch.rand(3, 8, 8), (2, 2), "pixels"),
        (torch.rand(1, 2, 8, 8), (2, 2), "pixels"),
        (torch.rand(1, 3, 8, 8) * 255, (2, 2), "pixels"),
        (torch.full((1, 3, 8, 8), float("nan")), (2, 2), "pixels"),
        (torch.rand(1, 3, 8, 8), (9, 2), "grid"),
        (torch.rand(1, 3, 8, 8), (0, 2), "grid"),
    ],
)
def test_bad_input_raises(pixels, grid, match):
    for fn in (patch_entropy, patch_contrast, edge_density, perspectival_salience, texture_array):
        with pytest.raises(ValueError, match=match):
            fn(pixels, grid)
    with pytest.raises(ValueError, match="mode"):
        patch_entropy(torch.rand(1, 3, 8, 8), (2, 2), mode="softmax")
