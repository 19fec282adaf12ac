"""The candidate pyramid and the allocator base class's budget and ordering semantics."""

import pytest
import torch

from arr_coc.allocators import create_allocator, list_allocators
from arr_coc.pyramid import build_pyramid, pyramid_positions, raster_key


def test_pyramid_layout_and_area_averages():
    h, w, d = 5, 6, 3
    fine = torch.randn(2, h * w, d, dtype=torch.float64)
    pyr = build_pyramid(fine, (h, w), levels=(1, 2))
    assert pyr.level_sizes == (30, 3 * 3, 2 * 2)
    assert pyr.candidates.shape == (2, 30 + 9 + 4, d)
    assert torch.equal(pyr.candidates[:, :30], fine)
    grid = fine.reshape(2, h, w, d)
    # the 2x2 region at coarse (0, 1) covers fine rows 0-1, cols 2-3
    assert torch.allclose(pyr.candidates[:, 30 + 1], grid[:, 0:2, 2:4].mean(dim=(1, 2)))
    # the last 2x2 row is cut by the odd height: one fine row only
    assert torch.allclose(pyr.candidates[:, 30 + 6], grid[:, 4:5, 0:2].mean(dim=(1, 2)))
    # the 4x4 region at (1, 1) covers rows 4 and cols 4-5 only
    assert torch.allclose(pyr.candidates[:, 39 + 3], grid[:, 4:, 4:].mean(dim=(1, 2)))
    pos = pyr.positions
    assert pos[30 + 1].tolist() == [0, 2, 1]
    assert pos[39 + 3].tolist() == [4, 4, 2]


def test_raster_key_orders_by_corner_then_coarse_first():
    pos, _ = pyramid_positions((4, 4), (1,))
    key = raster_key(pos, (4, 4))
    order = key.argsort()
    first = pos[order[:3]].tolist()
    assert first == [[0, 0, 1], [0, 0, 0], [0, 1, 0]]
    assert len(set(key.tolist())) == len(key)


def test_fine_tokens_only_by_default():
    pyr = build_pyramid(torch.randn(1, 16, 2), (4, 4), levels=())
    assert pyr.candidates.shape[1] == 16 and pyr.level_sizes == (16,)


@pytest.mark.parametrize("budget", [0, 3, 16, 100])
def test_random_budget_semantics(budget):
    alloc = create_allocator("random", seed=1)
    x = torch.randn(2, 1 + 16, 8)
    out = alloc(x, budget=budget, grid=(4, 4), num_prefix_tokens=1)
    expected = min(budget, 16)
    assert out.mask.sum(1).tolist() == [expected, expected]
    assert out.tokens.shape == (2, expected, 8)
    if budget >= 16:  # everything, unchanged, in raster order
        assert torch.equal(out.indices, torch.arange(16).expand(2, 16))
        assert torch.equal(out.tokens, x[:, 1:])


def test_ragged_budgets_pad_with_minus_one_and_zeros():
    alloc = create_allocator("random", seed=0)
    x = torch.randn(3, 16, 4)
    out = alloc(x, budget=torch.tensor([2, 0, 5]), grid=(4, 4))
    assert out.mask.sum(1).tolist() == [2, 0, 5]
    assert (out.indices[~out.mask] == -1).all()
    assert (out.tokens[~out.mask] == 0).all()
    assert (out.positions[~out.mask] == -1).all()
    real = out.indices[2][out.mask[2]]
    assert torch.equal(real, real.sort().values)  # raster order for fine tokens
    assert torch.equal(out.tokens[2, :5], x[2, real])


def test_full_keeps_everything_whatever_the_budget():
    x = torch.randn(2, 9, 4)
    out = create_allocator("full")(x, budget=1, grid=(3, 3))
    assert torch.equal(out.tokens, x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(grid=(3, 5)), "grid"),
        (dict(budget=-1), "budget"),
        (dict(num_prefix_tokens=20), "num_prefix_tokens"),
        (dict(query=torch.randn(3, 2, 4)), "query"),
        (dict(query=torch.randn(2, 2, 4), query_mask=torch.ones(2, 3, dtype=torch.bool)), "query_mask"),
        (dict(budget=torch.tensor([1, 2, 3])), "budget"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    x = torch.randn(2, 16, 4)
    args = dict(budget=4, grid=(4, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        create_allocator("random")(x, **args)


def test_non_finite_and_wrong_rank_tokens():
    alloc = create_allocator("random")
    x = torch.randn(1, 4, 2)
    x[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="patch_tokens"):
        alloc(x, budget=2, grid=(2, 2))
    with pytest.raises(ValueError, match="patch_tokens"):
        alloc(torch.randn(4, 2), budget=2)


def test_unknown_allocator_lists_the_known_ones():
    with pytest.raises(ValueError, match="random"):
        create_allocator("no_such_method")
    assert {"full", "random"} <= set(list_allocators())
