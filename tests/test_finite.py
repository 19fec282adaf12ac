"""arr_coc._finite.all_finite: the allocators' NaN / Inf check, against torch.isfinite."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arr_coc._finite import all_finite

SPECIAL = [math.nan, math.inf, -math.inf]


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=64),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
)
def test_agrees_with_isfinite(values, dtype):
    t = torch.tensor(values, dtype=torch.float32).to(dtype)  # float16 overflow to Inf included
    assert all_finite(t) == bool(torch.isfinite(t).all())


@pytest.mark.parametrize("bad", SPECIAL)
@pytest.mark.parametrize("where", [(0, 0, 0), (3, 100, 5), (7, 575, 95)])
def test_one_bad_entry_in_a_strided_token_view(bad, where):
    tokens = torch.randn(8, 577, 96)
    view = tokens[:, 1:]  # what an allocator checks: patch tokens after the prefix, not contiguous
    assert all_finite(view)
    tokens[where[0], 1 + where[1], where[2]] = bad
    assert not all_finite(view)
    tokens[where[0], 0, where[2]] = bad  # a bad prefix token is outside the view
    tokens[where[0], 1 + where[1], where[2]] = 0.0
    assert all_finite(view)


def test_large_finite_values_are_finite():
    t = torch.tensor([torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max])
    assert all_finite(t)  # a sum would overflow; min / max do not


def test_empty_integer_and_complex():
    assert all_finite(torch.empty(0, 3))
    assert all_finite(torch.arange(5))
    assert all_finite(torch.tensor([True, False]))
    assert not all_finite(torch.tensor([1 + 1j, complex(math.nan, 0)]))
    assert all_finite(torch.tensor([1 + 1j, 2 - 1j]))
