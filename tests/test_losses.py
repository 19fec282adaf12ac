"""arr_coc.losses on one process: values and gradients against direct formulas, the InfoNCE
bound on a Gaussian pair with known MI, the negative queue, and bad input."""

from __future__ import annotations

import collections
import math

import pytest
import torch
import torch.nn.functional as F

from arr_coc.losses import ClipLoss, InfoNCELoss, NegativeQueue, SigLipLoss, siglip_pair_loss_sum

F64 = torch.float64


def _rand(*shape, requires_grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64).requires_grad_(requires_grad)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(-1, keepdim=True))


def _grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs, allow_unused=True))


def _close(a, b, tol=1e-10) -> None:
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            assert x is None and y is None or float((x if x is not None else y).abs().max()) == 0
            continue
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- naive references
# Written element by element from the published formulas (exp, log, explicit labels), so they
# share no code path with the modules.


def naive_infonce(q, k, tau, negatives=None, queue=None):
    q, k = _unit(q), _unit(k)
    total = 0.0
    for i in range(q.shape[0]):
        cands = [k[j] for j in range(k.shape[0])]  # positive is cands[i]
        if negatives is not None:
            neg = _unit(negatives[i] if negatives.ndim == 3 else negatives)
            cands += [neg[m] for m in range(neg.shape[0])]
        if queue is not None:
            cands += [queue[m] for m in range(queue.shape[0])]
        scores = torch.stack([(q[i] * c).sum() / tau for c in cands])
        total = total - torch.log(torch.exp(scores[i]) / torch.exp(scores).sum())
    return total / q.shape[0], len(cands)


def naive_clip(img, txt, log_scale, bias=None):
    u, v = _unit(img), _unit(txt)
    s = torch.exp(log_scale)
    b = 0.0 if bias is None else bias
    n = u.shape[0]
    l_img = sum(-torch.log(torch.exp(s * u[i] @ v[i] + b) / sum(torch.exp(s * u[i] @ v[j] + b) for j in range(n))) for i in range(n))
    l_txt = sum(-torch.log(torch.exp(s * v[i] @ u[i] + b) / sum(torch.exp(s * v[i] @ u[j] + b) for j in range(n))) for i in range(n))
    return (l_img / n + l_txt / n) / 2


def naive_siglip(img, txt, log_scale, bias):
    u, v = _unit(img), _unit(txt)
    t = torch.exp(log_scale)
    n = u.shape[0]
    z = 2 * torch.eye(n, dtype=u.dtype) - 1  # +1 on the pairs, -1 elsewhere
    logits = t * u @ v.T + bias
    return -torch.log(1 / (1 + torch.exp(-z * logits))).sum() / n


# --------------------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize("explicit", [None, "shared", "per_query"])
def test_infonce_matches_naive_formula_values_and_gradients(explicit):
    b, d, m = 5, 4, 3
    q, k = _rand(b, d), _rand(b, d)
    negatives = None if explicit is None else _rand(m, d) if explicit == "shared" else _rand(b, m, d)
    loss_fn = InfoNCELoss(0.2, learnable=True).double()
    out = loss_fn(q, k, negatives=negatives)
    ref, n = naive_infonce(q, k, torch.exp(-loss_fn.logit_scale), negatives)
    inputs = [q, k, loss_fn.logit_scale] + ([negatives] if negatives is not None else [])
    _close([out["loss"]], [ref])
    _close(_grads(out["loss"], inputs), _grads(ref, inputs))
    assert int(out["num_candidates"]) == n == b + (0 if explicit is None else m)
    assert int(out["num_negatives"]) == n - 1
    torch.testing.assert_close(out["mi_lower_bound"], math.log(n) - ref.detach())
    assert out["mi_lower_bound"].requires_grad is False


def test_infonce_without_in_batch_negatives_uses_only_explicit_ones():
    q, k, neg = _rand(4, 3), _rand(4, 3), _rand(4, 6, 3)
    out = InfoNCELoss(0.5, in_batch_negatives=False)(q, k, negatives=neg)
    qn, kn, nn_ = _unit(q), _unit(k), _unit(neg)
    logits = torch.cat([(qn * kn).sum(-1, keepdim=True), torch.einsum("bd,bmd->bm", qn, nn_)], 1) / 0.5
    ref = -(logits[:, 0] - torch.logsumexp(logits, 1)).mean()
    _close([out["loss"]], [ref])
    assert int(out["num_candidates"]) == 7
    # One candidate (the positive only): the loss is 0 and so is the bound (log 1 = 0).
    single = InfoNCELoss(0.5, in_batch_negatives=False)(q, k)
    assert float(single["loss"].detach()) == 0.0 and float(single["mi_lower_bound"]) == 0.0


def test_infonce_learnable_temperature_is_capped_and_fixed_one_is_a_buffer():
    fixed = InfoNCELoss(0.07)
    assert "logit_scale" in dict(fixed.named_buffers()) and not list(fixed.parameters())
    assert fixed.temperature == pytest.approx(0.07)
    learn = InfoNCELoss(0.07, learnable=True)
    with torch.no_grad():
        learn.logit_scale.fill_(math.log(1e4))
    assert learn.temperature == pytest.approx(0.01)  # 1 / max_logit_scale


def _gaussian_pair_embeddings(n: int, d: int, rho: float, gen: torch.Generator):
    """Embeddings whose dot product is the optimal critic log p(y|x)/p(y) up to terms in x.

    x ~ N(0, I_d), y = rho x + sqrt(1 - rho^2) e:  log p(y|x) - log p(y) =
    rho/(1-rho^2) <x, y> - rho^2 / (2 (1-rho^2)) |y|^2 + (terms in x only, which cancel in
    the softmax over candidates y). I(X; Y) = -d/2 log(1 - rho^2).
    """
    x = torch.randn(n, d, generator=gen, dtype=F64)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=gen, dtype=F64)
    a, c = rho / (1 - rho**2), rho**2 / (2 * (1 - rho**2))
    u = torch.cat([a * x, torch.ones(n, 1, dtype=F64)], 1)
    v = torch.cat([y, -c * (y * y).sum(1, keepdim=True)], 1)
    return u, v


def test_infonce_bound_on_gaussian_pair_is_below_true_mi_and_approaches_it():
    d, rho = 2, 0.8
    true_mi = -d / 2 * math.log(1 - rho**2)  # 1.0217 nats
    gen = torch.Generator().manual_seed(1)
    # logits = <u, v> = the optimal critic. Each query gets its positive plus the keys of
    # N - 1 other pairs (independent of it) as explicit negatives: N candidates per query.
    loss_fn = InfoNCELoss(1.0, normalize=False, in_batch_negatives=False).double()
    means = {}
    for n in (2, 8, 32, 256):
        bounds = []
        for _ in range(8):
            u, v = _gaussian_pair_embeddings(1024, d, rho, gen)
            negatives = torch.stack([v.roll(-s, 0) for s in range(1, n)], 1)  # [1024, N - 1, 3]
            out = loss_fn(u, v, negatives=negatives)
            assert int(out["num_candidates"]) == n
            assert float(out["mi_lower_bound"]) <= math.log(n) + 1e-12  # never above log N
            bounds.append(float(out["mi_lower_bound"]))
        bounds_t = torch.tensor(bounds)
        mean, se = float(bounds_t.mean()), float(bounds_t.std() / math.sqrt(len(bounds)))
        means[n] = mean
        assert mean <= true_mi + 4 * se, (n, mean, se, true_mi)  # a lower bound (up to noise)
    # It tightens as N grows, and with the optimal critic at N = 256 it is close to I.
    assert means[2] < means[8] < means[32] < means[256]
    assert true_mi - means[256] < 0.05, means
    # With N = 2 it cannot report more than log 2 = 0.69 < I: the log N ceiling bites.
    assert means[2] < math.log(2) < true_mi
    # The in-batch path (one batch of 256 pairs, the other keys as negatives) agrees.
    in_batch = InfoNCELoss(1.0, normalize=False).double()
    batch_bounds = [float(in_batch(*_gaussian_pair_embeddings(256, d, rho, gen))["mi_lower_bound"]) for _ in range(8)]
    assert abs(sum(batch_bounds) / 8 - means[256]) < 0.06


def test_infonce_bound_saturates_at_log_n_when_mi_is_large():
    # I = 8 * -0.5 log(1 - 0.999^2) ~ 24.9 nats, far above log 16: the bound is stuck at log N.
    u, v = _gaussian_pair_embeddings(16, 8, 0.999, torch.Generator().manual_seed(2))
    out = InfoNCELoss(1.0, normalize=False).double()(u, v)
    assert float(out["mi_lower_bound"]) <= math.log(16)
    assert float(out["mi_lower_bound"]) > math.log(16) - 0.1
    assert bool(out["saturated"])
    weak = InfoNCELoss(1.0, normalize=False).double()(*_gaussian_pair_embeddings(16, 1, 0.3, torch.Generator().manual_seed(3)))
    assert not bool(weak["saturated"])


def test_infonce_bound_agrees_with_arr_coc_info_bounds_when_present():
    bounds = pytest.importorskip("arr_coc.info.bounds")
    if not hasattr(bounds, "infonce_lower_bound"):
        pytest.skip("arr_coc.info.bounds has no infonce_lower_bound yet")
    u, v = _gaussian_pair_embeddings(64, 2, 0.8, torch.Generator().manual_seed(4))
    ours = InfoNCELoss(1.0, normalize=False).double()(u, v)["mi_lower_bound"]
    theirs = bounds.infonce_lower_bound(u @ v.T)  # scores [N, N], positives on the diagonal
    theirs = theirs["bound"] if isinstance(theirs, dict) else theirs
    torch.testing.assert_close(torch.as_tensor(theirs, dtype=F64), ours.to(F64), rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- CLIP


@pytest.mark.parametrize("bias", [None, 0.7])
def test_clip_matches_naive_formula_values_and_gradients(bias):
    img, txt = _rand(6, 5), _rand(6, 5)
    loss_fn = ClipLoss(init_logit_bias=bias).double()
    out = loss_fn(img, txt)
    params = [loss_fn.logit_scale] + ([loss_fn.logit_bias] if bias is not None else [])
    ref = naive_clip(img, txt, loss_fn.logit_scale, loss_fn.logit_bias)
    _close([out["loss"]], [ref])
    _close(_grads(out["loss"], [img, txt, *params]), _grads(ref, [img, txt, *params]))
    torch.testing.assert_close(out["mi_lower_bound"], math.log(6) - ref.detach())
    torch.testing.assert_close(out["loss"], (out["image_to_text"] + out["text_to_image"]) / 2)


def test_clip_scale_init_and_cap():
    loss_fn = ClipLoss()
    assert float(loss_fn.logit_scale.detach().exp()) == pytest.approx(1 / 0.07, rel=1e-6)
    img, txt = torch.randn(4, 3), torch.randn(4, 3)
    with torch.no_grad():
        loss_fn.logit_scale.fill_(math.log(1e3))  # an optimizer overshoot
    out = loss_fn(img, txt)
    assert float(out["logit_scale"]) == pytest.approx(100.0, rel=1e-6)
    capped = ClipLoss(init_logit_scale=math.log(100.0))(img, txt)
    torch.testing.assert_close(out["loss"], capped["loss"])
    out["loss"].backward()
    assert float(loss_fn.logit_scale.grad) == 0.0  # beyond the cap the scale gets no gradient
    with pytest.raises(ValueError, match="max_logit_scale"):
        ClipLoss(init_logit_scale=math.log(200.0))


def test_clip_bias_cancels_in_the_softmax():
    img, txt = _rand(5, 4), _rand(5, 4)
    with_bias = ClipLoss(init_logit_bias=-3.0).double()
    out = with_bias(img, txt)
    plain = ClipLoss().double()(img, txt)
    torch.testing.assert_close(out["loss"], plain["loss"])
    (g_bias,) = torch.autograd.grad(out["loss"], [with_bias.logit_bias])
    assert abs(float(g_bias)) < 1e-12


def test_clip_perfect_alignment_approaches_zero_loss_and_saturates():
    e = torch.eye(8, dtype=F64)  # orthonormal pairs, cosine 1 on pairs and 0 elsewhere
    out = ClipLoss(init_logit_scale=math.log(100.0)).double()(e, e)
    # closed form: -log(e^100 / (e^100 + 7 e^0)) per row and direction
    expected = -100 + math.log(math.exp(100) + 7)
    assert float(out["loss"].detach()) == pytest.approx(expected, abs=1e-12)
    assert bool(out["saturated"]) and float(out["mi_lower_bound"]) == pytest.approx(math.log(8), abs=1e-12)
    # float32 at the cap: exp(100) overflows float32 (max ~ exp(88.7)); neither the loss nor
    # its gradient may, and both match float64
    e64 = e.clone().requires_grad_(True)
    ClipLoss(init_logit_scale=math.log(100.0)).double()(e64, e64)["loss"].backward()
    e32 = e.float().requires_grad_(True)
    out32 = ClipLoss(init_logit_scale=math.log(100.0))(e32, e32)
    assert float(out32["loss"].detach()) == pytest.approx(expected, abs=1e-5)
    out32["loss"].backward()
    assert torch.isfinite(e32.grad).all()
    torch.testing.assert_close(e32.grad.double(), e64.grad, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- SigLIP


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 64])
def test_siglip_matches_naive_formula_values_and_gradients(chunk_size):
    img, txt = _rand(7, 5), _rand(7, 5)
    loss_fn = SigLipLoss(chunk_size=chunk_size, init_logit_bias=-2.0).double()
    with torch.no_grad():
        loss_fn.logit_scale.fill_(math.log(4.0))  # logits of both signs, so every term matters
    out = loss_fn(img, txt)
    inputs = [img, txt, loss_fn.logit_scale, loss_fn.logit_bias]
    ref = naive_siglip(img, txt, loss_fn.logit_scale, loss_fn.logit_bias)
    _close([out["loss"]], [ref])
    _close(_grads(out["loss"], inputs), _grads(ref, inputs))


def test_siglip_init_and_closed_form_on_orthonormal_pairs():
    loss_fn = SigLipLoss()
    assert float(loss_fn.logit_scale.detach().exp()) == pytest.approx(10.0, rel=1e-6)
    assert float(loss_fn.logit_bias.detach()) == -10.0
    assert float(SigLipLoss(init_logit_bias="log_inv_n", batch_size=32).logit_bias.detach()) == pytest.approx(-math.log(32))
    # u_i = v_i orthonormal: the pair logit is t + b = 0, the others b = -10:
    # loss = softplus(-(t + b)) + (B - 1) softplus(b) per row.
    b = 6
    e = torch.eye(b, dtype=F64)
    for chunk in (None, 4):
        loss_fn = SigLipLoss(chunk_size=chunk).double()
        with torch.no_grad():
            loss_fn.logit_scale.fill_(math.log(10.0))  # exactly, not the float32 rounding
        out = loss_fn(e, e)
        expected = math.log1p(math.exp(-0.0)) + (b - 1) * math.log1p(math.exp(-10.0))
        assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-12)


def test_siglip_chunked_function_passes_gradcheck_with_offsets():
    # u [3, 2] against v [5, 2]: positives at (i, i + offset), offset None = all negatives.
    u, v = _rand(3, 2), _rand(5, 2)
    scale = torch.tensor(1.7, dtype=F64, requires_grad=True)
    bias = torch.tensor(-0.4, dtype=F64, requires_grad=True)
    for offset, chunk in ((0, 2), (2, 2), (None, 3), (4, 1)):
        fn = lambda u, v, s, b: siglip_pair_loss_sum(u, v, s, b, positive_offset=offset, chunk_size=chunk)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (u, v, scale, bias))
        full = siglip_pair_loss_sum(u, v, scale, bias, positive_offset=offset)
        chunked = siglip_pair_loss_sum(u, v, scale, bias, positive_offset=offset, chunk_size=chunk)
        _close(list(full), list(chunked))
        inputs = [u, v, scale, bias]
        _close(_grads(full[0], inputs), _grads(chunked[0], inputs))


def test_siglip_chunked_graph_saves_no_b_by_n_tensor():
    """The chunked path keeps O(B D) for the backward pass; the plain path keeps [B, N]."""
    b, d, chunk = 256, 4, 16

    def saved_sizes(chunk_size):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        img, txt = torch.randn(b, d, requires_grad=True), torch.randn(b, d, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            SigLipLoss(chunk_size=chunk_size)(img, txt)["loss"].backward()
        return max(sizes)

    assert saved_sizes(None) >= b * b
    assert saved_sizes(chunk) <= b * d


def test_siglip_bound_is_the_infonce_bound_of_its_critic():
    img, txt = torch.randn(9, 4, dtype=F64), torch.randn(9, 4, dtype=F64)
    for chunk in (None, 4):
        out = SigLipLoss(chunk_size=chunk).double()(img, txt)
        logits = 10.0 * _unit(img) @ _unit(txt).T
        ce = F.cross_entropy(logits, torch.arange(9))
        torch.testing.assert_close(out["mi_lower_bound"], math.log(9) - ce, rtol=1e-6, atol=1e-6)


def test_losses_accept_half_precision_and_compute_in_float32():
    img, txt = torch.randn(4, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    for loss_fn in (ClipLoss(), SigLipLoss(chunk_size=2), InfoNCELoss()):
        out = loss_fn(img, txt)
        assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


# --------------------------------------------------------------------------- negative queue


@pytest.mark.parametrize("size,batches", [(5, [2, 2, 2, 2]), (4, [3, 6, 1]), (1, [1, 3]), (7, [7, 7, 10])])
def test_queue_is_a_fifo_with_wraparound(size, batches):
    queue = NegativeQueue(3, size, normalize=False, dtype=F64)
    ref: collections.deque = collections.deque(maxlen=size)
    slots: list = [None] * size
    ptr = 0
    for n in batches:
        keys = torch.randn(n, 3, dtype=F64)
        queue.enqueue(keys)
        for row in keys:  # one at a time, the reference semantics
            ref.append(row)
            slots[ptr] = row
            ptr = (ptr + 1) % size
        stored, valid = queue.get()
        assert int(valid.sum()) == len(ref) == len(queue)
        assert int(queue.ptr) == ptr
        for i, row in enumerate(slots):
            if row is not None:
                torch.testing.assert_close(stored[i], row)


def test_queue_normalises_detaches_and_survives_state_dict_and_to():
    queue = NegativeQueue(4, 6)
    keys = torch.randn(4, 4, requires_grad=True)
    queue.enqueue(keys * 3)
    stored, valid = queue.get()
    assert not stored.requires_grad
    torch.testing.assert_close(stored[valid].norm(dim=-1), torch.ones(4))
    restored = NegativeQueue(4, 6)
    restored.load_state_dict(queue.state_dict())
    assert set(queue.state_dict()) == {"keys", "ptr", "count"}
    more = torch.randn(5, 4)
    queue.enqueue(more)
    restored.enqueue(more)
    for a, b in zip(queue.get(), restored.get()):
        torch.testing.assert_close(a, b)
    assert int(restored.ptr) == 3 and len(restored) == 6
    moved = restored.to(F64)
    assert moved.keys.dtype == F64 and moved.ptr.dtype == torch.long
    # A loss with a queue saves the queue with it.
    loss_fn = InfoNCELoss(queue=NegativeQueue(4, 6))
    assert {"queue.keys", "queue.ptr", "queue.count"} <= set(loss_fn.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_queue_and_losses_on_cuda():
    dev = torch.device("cuda")
    loss_fn = InfoNCELoss(queue=NegativeQueue(8, 10)).to(dev)
    for _ in range(3):
        out = loss_fn(torch.randn(4, 8, device=dev), torch.randn(4, 8, device=dev))
    assert out["loss"].device.type == "cuda" and int(out["num_candidates"]) == 4 + 10
    for loss in (ClipLoss(), SigLipLoss(chunk_size=3)):
        assert torch.isfinite(loss.to(dev)(torch.randn(5, 8, device=dev), torch.randn(5, 8, device=dev))["loss"])


def test_infonce_with_queue_matches_naive_and_enqueues_after_use():
    queue = NegativeQueue(4, 5, dtype=F64)
    old = torch.randn(3, 4, dtype=F64)
    queue.enqueue(old)
    loss_fn = InfoNCELoss(0.3, queue=queue).double()
    q, k = _rand(4, 4), _rand(4, 4)
    out = loss_fn(q, k)
    ref, n = naive_infonce(q, k, torch.exp(-loss_fn.logit_scale), queue=_unit(old))  # only the 3 filled slots count
    _close([out["loss"]], [ref])
    _close(_grads(out["loss"], [q, k]), _grads(ref, [q, k]))
    assert int(out["num_candidates"]) == n == 4 + 3
    assert len(queue) == 5  # 3 old + 4 new, capped at 5


def test_gradient_accumulation_with_queue_sees_as_many_negatives_as_one_big_batch():
    big, k_steps, d = 32, 4, 8
    micro = big // k_steps
    big_batch = InfoNCELoss()(torch.randn(big, d), torch.randn(big, d))
    big_negatives = int(big_batch["num_negatives"])
    assert big_negatives == big - 1 == 31

    # No queue: each micro-batch sees only its own micro - 1 = 7 negatives.
    plain = InfoNCELoss()
    assert int(plain(torch.randn(micro, d), torch.randn(micro, d))["num_negatives"]) == micro - 1

    # A queue of (K - 1) * micro keys: the first accumulation step fills it (7, 15, 23, 31),
    # every later micro-batch sees micro - 1 + 24 = 31 negatives, the big batch's number.
    queued = InfoNCELoss(queue=NegativeQueue(d, (k_steps - 1) * micro))
    seen = []
    for _step in range(3):
        seen.append([int(queued(torch.randn(micro, d), torch.randn(micro, d))["num_negatives"]) for _ in range(k_steps)])
    print("negatives per micro-batch, by accumulation step:", seen, "one big batch:", big_negatives)
    assert seen[0] == [7, 15, 23, 31]
    assert all(n >= big_negatives for step in seen[1:] for n in step)
    # A bigger queue gives more negatives than the big batch, and the bound's ceiling grows.
    bigger = InfoNCELoss(queue=NegativeQueue(d, 64))
    for _ in range(10):
        out = bigger(torch.randn(micro, d), torch.randn(micro, d))
    assert int(out["num_negatives"]) == micro - 1 + 64 > big_negatives
    assert float(out["log_n"]) == pytest.approx(math.log(micro + 64))


# --------------------------------------------------------------------------- bad input

LOSSES = [
    pytest.param(lambda: InfoNCELoss(), id="infonce"),
    pytest.param(lambda: ClipLoss(), id="clip"),
    pytest.param(lambda: SigLipLoss(), id="siglip"),
    pytest.param(lambda: SigLipLoss(chunk_size=2), id="siglip_chunked"),
]


@pytest.mark.parametrize("make", LOSSES)
@pytest.mark.parametrize(
    "a,b,match",
    [
        ((4, 3), (5, 3), "same shape"),
        ((4, 3), (4, 2), "same shape"),
        ((0, 3), (0, 3), "empty batch"),
        ((4,), (4,), r"\[B, D\]"),
        ((4, 0), (4, 0), "dimension 0"),
    ],
)
def test_bad_shapes_raise_value_error(make, a, b, match):
    with pytest.raises(ValueError, match=match):
        make()(torch.randn(*a), torch.randn(*b))


@pytest.mark.parametrize("make", LOSSES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_embeddings_raise_value_error(make, bad):
    x = torch.randn(4, 3)
    x[2, 1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        make()(x, torch.randn(4, 3))
    with pytest.raises(ValueError, match="non-finite"):
        make()(torch.randn(4, 3), x)


def test_other_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="torch.Tensor"):
        ClipLoss()([[1.0]], torch.randn(1, 1))
    with pytest.raises(ValueError, match="floating"):
        SigLipLoss()(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="negatives"):
        InfoNCELoss()(torch.randn(4, 3), torch.randn(4, 3), negatives=torch.randn(5, 2))
    with pytest.raises(ValueError, match="negatives"):
        InfoNCELoss()(torch.randn(4, 3), torch.randn(4, 3), negatives=torch.randn(3, 5, 3))
    with pytest.raises(ValueError, match="non-finite"):
        InfoNCELoss()(torch.randn(4, 3), torch.randn(4, 3), negatives=torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="queue"):
        InfoNCELoss(queue=NegativeQueue(5, 4))(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="dimension 3"):
        NegativeQueue(3, 4).enqueue(torch.randn(2, 5))
    for kwargs in ({"temperature": 0.0}, {"temperature": -1.0}, {"temperature": float("nan")}):
        with pytest.raises(ValueError, match="temperature"):
            InfoNCELoss(**kwargs)
    with pytest.raises(ValueError, match="chunk_size"):
        SigLipLoss(chunk_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        SigLipLoss(init_logit_bias="log_inv_n")
    with pytest.raises(ValueError, match="dist_mode"):
        SigLipLoss(dist_mode="tree")
    with pytest.raises(ValueError, match="size"):
        NegativeQueue(3, 0)
    with pytest.raises(ValueError, match="rank"):
        ClipLoss(rank=2, world_size=2)
    # world_size > 1 without an initialised process group: a clear error, not a hang.
    with pytest.raises(ValueError, match="init_process_group"):
        ClipLoss(rank=0, world_size=2)(torch.randn(2, 3), torch.randn(2, 3))
