"""Probability tables: closed forms, identities (hypothesis), scikit-learn oracle, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arr_coc.info import (
    conditional_entropy,
    conditional_mutual_information,
    entropy,
    joint_entropy,
    mutual_information,
    normalized_mutual_information,
)


def _table(seed: int, shape: tuple[int, ...], sparsity: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(shape, generator=g, dtype=torch.float64)
    if sparsity:
        p = p * (torch.rand(shape, generator=g, dtype=torch.float64) > sparsity)
        p.view(-1)[0] += 0.1  # never all zero
    return p / p.sum()


tables = st.builds(
    _table,
    st.integers(0, 10_000),
    st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 4)),
    st.sampled_from([0.0, 0.5]),
)


def test_entropy_closed_forms_and_base():
    assert entropy(torch.full((8,), 1 / 8)).item() == pytest.approx(math.log(8), abs=1e-15)
    assert entropy(torch.full((8,), 1 / 8), base=2).item() == pytest.approx(3.0, abs=1e-14)
    assert entropy(torch.tensor([1.0, 0.0, 0.0])).item() == 0.0  # 0 log 0 = 0, no NaN
    p = torch.tensor([0.1, 0.2, 0.7])
    assert entropy(p).item() == pytest.approx(-sum(v * math.log(v) for v in (0.1, 0.2, 0.7)), rel=1e-6)
    assert entropy(p).dtype == torch.float64


def test_batch_dims():
    p = _table(0, (3, 4, 5, 6)).reshape(3, 4, 5, 6)
    p = p / p.sum(dim=(-2, -1), keepdim=True)
    batched = mutual_information(p)
    assert batched.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert batched[i, j].item() == pytest.approx(mutual_information(p[i, j]).item(), abs=1e-14)


def test_xor_table():
    # X, Y fair independent bits, Z = X xor Y
    joint = torch.zeros(2, 2, 2, dtype=torch.float64)
    for x in range(2):
        for y in range(2):
            joint[x, y, x ^ y] = 0.25
    assert mutual_information(joint.sum(-1), base=2).item() == pytest.approx(0.0, abs=1e-15)
    assert conditional_mutual_information(joint, base=2).item() == pytest.approx(1.0, abs=1e-14)


def test_sklearn_oracle_mutual_info_score():
    from sklearn.metrics import mutual_info_score, normalized_mutual_info_score

    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 5, (400,), generator=g)
    b = (a + torch.randint(0, 3, (400,), generator=g)) % 6
    joint = torch.zeros(5, 6, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(400, dtype=torch.float64), accumulate=True)
    joint /= 400
    assert mutual_information(joint).item() == pytest.approx(mutual_info_score(a.numpy(), b.numpy()), abs=1e-12)
    for avg in ("arithmetic", "geometric", "min", "max"):
        ref = normalized_mutual_info_score(a.numpy(), b.numpy(), average_method=avg)
        assert normalized_mutual_information(joint, average=avg).item() == pytest.approx(ref, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(tables)
def test_identities(p):
    pxy = p.sum(-1)
    hx, hy = entropy(pxy.sum(-1)), entropy(pxy.sum(-2))
    hxy = joint_entropy(pxy)
    i = mutual_information(pxy)
    # chain rule H(X, Y) = H(Y) + H(X | Y); symmetry; bounds
    assert hxy.item() == pytest.approx((hy + conditional_entropy(pxy)).item(), abs=1e-12)
    assert i.item() == pytest.approx(mutual_information(pxy.T).item(), abs=1e-12)
    assert i.item() >= -1e-12
    assert i.item() <= min(hx.item(), hy.item()) + 1e-12
    assert conditional_mutual_information(p).item() >= -1e-12
    # chain rule of information: I(X; Y, Z) = I(X; Z) + I(X; Y | Z)
    i_x_yz = mutual_information(p.reshape(p.shape[0], -1))
    i_xz = mutual_information(p.sum(1))
    assert i_x_yz.item() == pytest.approx((i_xz + conditional_mutual_information(p)).item(), abs=1e-12)
    nmi = normalized_mutual_information(pxy)
    assert 0.0 <= nmi.item() <= 1.0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 5), st.integers(1, 5))
def test_data_processing_inequality(seed, nx, ny, nz):
    # Markov chain X -> Y -> Z: I(X; Z) <= I(X; Y)
    g = torch.Generator().manual_seed(seed)
    px = torch.rand(nx, generator=g, dtype=torch.float64)
    px /= px.sum()
    py_x = torch.rand(nx, ny, generator=g, dtype=torch.float64)
    py_x /= py_x.sum(1, keepdim=True)
    pz_y = torch.rand(ny, nz, generator=g, dtype=torch.float64)
    pz_y /= pz_y.sum(1, keepdim=True)
    pxy = px[:, None] * py_x
    pxz = pxy @ pz_y
    assert mutual_information(pxz).item() <= mutual_information(pxy).item() + 1e-12


def test_constant_variable_is_zero_not_nan():
    p = torch.tensor([[0.0, 0.0], [0.3, 0.7]], dtype=torch.float64)  # X constant
    assert mutual_information(p).item() == pytest.approx(0.0, abs=1e-16)
    assert normalized_mutual_information(p).item() == 0.0
    one = torch.ones(1, 1, dtype=torch.float64)
    assert normalized_mutual_information(one).item() == 0.0
    assert not torch.isnan(normalized_mutual_information(one))


@pytest.mark.parametrize(
    "fn, arg, match",
    [
        (entropy, torch.tensor([0.5, -0.1, 0.6]), "non-negative"),
        (entropy, torch.tensor([0.5, 0.6]), "sum to 1"),
        (entropy, torch.tensor([0.5, float("nan")]), "finite"),
        (entropy, torch.tensor([]), "non-empty"),
        (entropy, torch.tensor(1.0), "at least 1"),
        (entropy, torch.tensor([1, 0]), "floating"),
        (mutual_information, torch.tensor([0.5, 0.5]), "at least 2"),
        (conditional_mutual_information, torch.full((2, 2), 0.25), "at least 3"),
    ],
)
def test_bad_input(fn, arg, match):
    with pytest.raises(ValueError, match=match):
        fn(arg)


def test_bad_base_and_average():
    with pytest.raises(ValueError, match="base"):
        entropy(torch.tensor([0.5, 0.5]), base=1)
    with pytest.raises(ValueError, match="average"):
        normalized_mutual_information(torch.full((2, 2), 0.25), average="median")


def test_float32_tolerance_and_device():
    p = torch.softmax(torch.randn(1000), 0)  # float32, sums to 1 within float32 rounding
    h = entropy(p)
    assert h.dtype == torch.float64 and h.device == p.device


# ----------------------------------------------------------------------------- precision (issue 17, items 3 and 4)


def test_long_float32_softmax_is_a_table():
    # a float32 softmax over 4M entries sums to 1 only within ~4e-4 (more than sqrt(eps)):
    # the tolerance grows with the length, and the entropy is that of the renormalised table
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4_000_000, generator=g) * 3, 0)
    assert abs(p.double().sum().item() - 1) > 3.5e-4  # the case that used to raise
    q = p.double() / p.double().sum()
    assert entropy(p).item() == pytest.approx(entropy(q).item(), abs=1e-9)
    with pytest.raises(ValueError, match="sum to 1"):
        entropy(p * 1.05)  # still refused when clearly off


def test_entropy_gradient_is_finite_at_zero_probability():
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64, requires_grad=True)
    entropy(p).backward()
    assert torch.isfinite(p.grad).all()
    # H(p / sum p): dH/dp_i = g_i - sum_j q_j g_j with g_j = -(log q_j + 1) where q_j > 0 and
    # g_j = 0 at q_j = 0 (the convention); at p = (1/2, 1/2, 0): (0, 0, 1 - log 2)
    expected = torch.tensor([0.0, 0.0, 1 - math.log(2.0)], dtype=torch.float64)
    torch.testing.assert_close(p.grad, expected, atol=1e-12, rtol=0)
    joint = torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=torch.float64, requires_grad=True)
    mutual_information(joint).backward()
    assert torch.isfinite(joint.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tables_match_float64_and_mi_is_never_negative(dtype):
    g = torch.Generator().manual_seed(3)
    worst_mi = math.inf
    for _ in range(200):
        a = torch.rand(8, generator=g, dtype=torch.float64)
        b = torch.rand(8, generator=g, dtype=torch.float64)
        for t in (torch.outer(a / a.sum(), b / b.sum()), torch.rand(8, 8, generator=g, dtype=torch.float64) ** 4):
            t = t / t.sum()
            low = t.to(dtype)
            ref = low.double() / low.double().sum()  # the float64 reference: the renormalised low-precision table
            mi = mutual_information(low)
            assert mi.dtype == torch.float64
            assert mi.item() == pytest.approx(max(0.0, mutual_information(ref).item()), abs=1e-12)
            assert entropy(low.reshape(-1)).item() == pytest.approx(entropy(ref.reshape(-1)).item(), abs=1e-12)
            worst_mi = min(worst_mi, mi.item())
    assert worst_mi >= 0.0
    # the tolerance fits the precision: a bf16/fp16 table off by 5 % is refused (sqrt(eps) of bf16 was 8.8 %)
    with pytest.raises(ValueError, match="sum to 1"):
        mutual_information((torch.full((4, 4), 1 / 16) * 1.05).to(dtype))
