"""Exact greedy conditional-MI allocation: values against brute-force log-dets, behaviour, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from arr_coc.attending import gaussian_set_mi, greedy_conditional_mi, kernel_matrix


# ---------------------------------------------------------------------- brute force
def _sigma(c, q, kernel, jitter):
    """Joint covariance of [candidates; query] for one example: kernel + jitter I."""
    x = torch.cat([c, q])[None]
    if kernel == "cosine":
        k = kernel_matrix(x, kernel="cosine")[0]
    else:
        # bandwidth from the candidates only, as the greedy does
        centred = c - c.mean(0)
        ell = centred.pow(2).sum(-1).mean().sqrt()
        d2 = torch.cdist(x[0], x[0]).pow(2)
        k = torch.exp(-0.5 * d2 / ell**2)
    return k + jitter * torch.eye(k.shape[0], dtype=k.dtype)


def _logdet(sig, idx):
    if len(idx) == 0:
        return 0.0
    sub = sig[idx][:, idx]
    return torch.linalg.slogdet(sub)[1].item()


def _cond_var(sig, j, given):
    return math.exp(_logdet(sig, given + [j]) - _logdet(sig, given))


def _brute_cmi(sig, j, s, qidx):
    """I(c_j ; Q | c_S) from log-dets."""
    return 0.5 * math.log(_cond_var(sig, j, s) / _cond_var(sig, j, s + qidx))


def _set_mi(sig, s, qidx):
    """I(c_S ; Q) = 1/2 (log det S + log det Q - log det (S, Q))."""
    return 0.5 * (_logdet(sig, s) + _logdet(sig, qidx) - _logdet(sig, s + qidx))


@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
@pytest.mark.parametrize("t", [1, 3])
def test_gains_equal_brute_force_logdet(kernel, t):
    b, m, r, k = 3, 9, 16, 6
    jitter = 1e-3
    c = torch.randn(b, m, r, dtype=torch.float64)
    q = torch.randn(b, t, r, dtype=torch.float64)
    res = greedy_conditional_mi(c, q, None, torch.full((b,), k), alpha=1.0, kernel=kernel, jitter=jitter, var_floor=1e-12)
    assert res.indices.shape == (b, k)
    for i in range(b):
        sig = _sigma(c[i], q[i], kernel, jitter)
        qidx = list(range(m, m + t))
        s = []
        for step in range(k):
            brute = {j: _brute_cmi(sig, j, s, qidx) for j in range(m) if j not in s}
            j_star = max(brute, key=brute.get)
            assert res.indices[i, step].item() == j_star
            assert res.gains[i, step].item() == pytest.approx(brute[j_star], abs=1e-6)
            assert res.query_gains[i, step].item() == pytest.approx(brute[j_star], abs=1e-6)
            s.append(j_star)
        # chain rule: the per-step gains sum to the log-det MI of the chosen set
        assert res.total[i].item() == pytest.approx(_set_mi(sig, s, qidx), abs=1e-6)
    # the differentiable closed form agrees
    closed = gaussian_set_mi(c, q, res.indices, kernel=kernel, jitter=jitter)
    torch.testing.assert_close(closed, res.total, atol=1e-6, rtol=0)


def _samples_with_covariance(sig, n):
    """n samples whose sample covariance is exactly sig (centred orthonormal columns times a Cholesky factor)."""
    d = sig.shape[0]
    a = torch.randn(n, d, dtype=torch.float64)
    q, _ = torch.linalg.qr(a - a.mean(0))
    return math.sqrt(n - 1) * q @ torch.linalg.cholesky(sig).T


def test_total_matches_arr_coc_info_gaussian_mi():
    """Oracle: arr_coc.info.gaussian_mi on samples whose covariance is exactly the model's."""
    info = pytest.importorskip("arr_coc.info")
    gm = getattr(info, "gaussian_mi", None)
    if gm is None:
        pytest.skip("arr_coc.info.gaussian_mi not available")
    b, m, r, t, k = 2, 8, 12, 2, 4
    c = torch.randn(b, m, r, dtype=torch.float64)
    q = torch.randn(b, t, r, dtype=torch.float64)
    for kernel in ("cosine", "rbf"):
        res = greedy_conditional_mi(c, q, None, k, alpha=1.0, kernel=kernel, jitter=1e-3, var_floor=1e-12)
        for i in range(b):
            sig = _sigma(c[i], q[i], kernel, 1e-3)
            sel = res.indices[i].tolist() + list(range(m, m + t))
            x = _samples_with_covariance(sig[sel][:, sel], 64)
            ref = gm(x[:, :k], x[:, k:])
            assert float(ref) == pytest.approx(res.total[i].item(), abs=1e-6)


def test_coverage_gain_is_rate_distortion_of_residual():
    b, m, r = 2, 7, 10
    c = torch.randn(b, m, r, dtype=torch.float64)
    d, jitter = 0.05, 1e-3
    res = greedy_conditional_mi(c, None, None, 5, alpha=0.0, jitter=jitter, var_floor=1e-12, distortion=d)
    for i in range(b):
        sig = kernel_matrix(c[i : i + 1])[0] + jitter * torch.eye(m, dtype=torch.float64)
        s = []
        for step in range(5):
            var = {j: _cond_var(sig, j, s) for j in range(m) if j not in s}
            j_star = res.indices[i, step].item()
            # alpha = 0: largest residual variance (max volume); ties allowed at step 0
            assert var[j_star] >= max(var.values()) - 1e-9
            assert res.coverage_gains[i, step].item() == pytest.approx(max(0.0, 0.5 * math.log(var[j_star] / d)), abs=1e-9)
            s.append(j_star)
    assert torch.all(res.total == 0)  # no query: no query information


# ---------------------------------------------------------------------- behaviour
def test_candidate_equal_to_query_is_picked_first():
    b, m, r = 4, 50, 32
    c = torch.randn(b, m, r)
    target = torch.tensor([3, 17, 0, 49])
    q = c[torch.arange(b), target][:, None] * 2.5  # same direction, other scale
    res = greedy_conditional_mi(c, q, None, 5, alpha=0.5)
    assert torch.equal(res.indices[:, 0], target)
    assert torch.isfinite(res.gains).all()


def test_duplicate_never_picked_while_positive_gain_remains():
    torch.manual_seed(1)
    b, m, r = 3, 20, 32
    c = torch.randn(b, m, r)
    q = c[:, :1] + 0.3 * torch.randn(b, 1, r)
    c = torch.cat([c, c[:, :1]], 1)  # candidate m duplicates candidate 0
    for alpha in (1.0, 0.7, 0.3):
        res = greedy_conditional_mi(c, q, None, m + 1, alpha=alpha, kernel="cosine")
        for i in range(b):
            picks = res.indices[i].tolist()
            gains = res.gains[i].tolist()
            assert 0 in picks[:3] or m in picks[:3]
            first = min(picks.index(0), picks.index(m))
            # after one copy is picked, the other appears only after every positive gain is spent
            later = max(picks.index(0), picks.index(m))
            assert all(g > 0 for g in gains[:later]) and gains[later] == 0
            assert first < later


def test_alpha_zero_is_diversity_driven():
    # three tight clusters; the query sits on cluster 0
    torch.manual_seed(2)
    r = 16
    centres = torch.eye(r)[:3] * 3
    pts = torch.cat([centres[i] + 0.05 * torch.randn(10, r) for i in range(3)])[None]
    q = centres[:1][None]
    div = greedy_conditional_mi(pts, q, None, 3, alpha=0.0, kernel="cosine")
    foc = greedy_conditional_mi(pts, q, None, 3, alpha=1.0, kernel="cosine")
    clusters_div = set((div.indices[0] // 10).tolist())
    assert clusters_div == {0, 1, 2}  # coverage: one per cluster
    assert (foc.indices[0, 0] // 10).item() == 0  # focus: the query's cluster first
    # the focused choice carries more information about the query
    assert foc.total[0] > div.total[0]


def test_price_stops_early_and_easy_query_spends_less():
    torch.manual_seed(3)
    b, m, r = 2, 64, 64
    basis = torch.linalg.qr(torch.randn(r, r))[0].T  # orthonormal rows
    c = basis[:m].expand(b, m, r).clone()
    easy = c[0, 5]  # one candidate carries it all
    hard = c[1, :12].sum(0)  # spread over twelve candidates
    q = torch.stack([easy, hard])[:, None]
    res = greedy_conditional_mi(c, q, None, 32, alpha=1.0, price=0.02)
    assert res.counts[0] < res.counts[1] <= 32
    assert res.counts[0] == 1 and res.indices[0, 0] == 5
    assert set(res.indices[1, :12].tolist()) == set(range(12))
    assert (res.gains[1, : res.counts[1]] >= 0.02).all()
    # no price: the budget is spent
    full = greedy_conditional_mi(c, q, None, 32, alpha=1.0, price=0.0)
    assert torch.equal(full.counts, torch.tensor([32, 32]))
    assert (full.indices >= 0).all()
    assert all(len(set(row.tolist())) == 32 for row in full.indices)


def test_per_example_budgets_and_padding():
    b, m, r, t = 3, 30, 8, 4
    c = torch.randn(b, m, r, dtype=torch.float64)
    q = torch.randn(b, t, r, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    res = greedy_conditional_mi(c, q, mask, torch.tensor([5, 0, 40]), alpha=0.8)
    assert res.indices.shape == (3, 30)
    assert res.counts.tolist() == [5, 0, 30]
    assert (res.indices[0, 5:] == -1).all() and (res.indices[1] == -1).all()
    assert sorted(res.indices[2].tolist()) == list(range(30))
    # padded tokens are ignored: same answer as the query truncated to its real tokens
    alone = greedy_conditional_mi(c[:1], q[:1, :2], None, 5, alpha=0.8)
    assert torch.equal(alone.indices[0], res.indices[0, :5])
    torch.testing.assert_close(alone.gains[0], res.gains[0, :5])
    # an all-padding query is coverage only: same picks as no query, zero query information
    nq = greedy_conditional_mi(c[1:2], None, None, 6, alpha=0.0)
    pad = greedy_conditional_mi(c[1:2], q[1:2], mask[1:2], 6, alpha=0.8)
    assert torch.equal(nq.indices, pad.indices)
    assert pad.total.item() == 0


def test_low_precision_inputs_and_rank_deficiency():
    b, m, r = 2, 40, 4  # rank 4 < budget: every candidate becomes redundant
    c = torch.randn(b, m, r)
    q = torch.randn(b, 3, r)
    for dt in (torch.float16, torch.bfloat16):
        res = greedy_conditional_mi(c.to(dt), q.to(dt), None, 12, alpha=0.5)
        assert torch.isfinite(res.gains).all() and torch.isfinite(res.total).all()
        assert (res.counts == 12).all()
        assert all(len(set(row.tolist())) == 12 for row in res.indices)
        # at most rank-many picks carry information
        assert ((res.gains > 0).sum(1) <= r + 1).all()


def test_batched_equals_one_by_one():
    b, m, r, t = 4, 25, 12, 3
    c = torch.randn(b, m, r, dtype=torch.float64)
    q = torch.randn(b, t, r, dtype=torch.float64)
    alpha = torch.tensor([0.0, 0.3, 0.9, 1.0], dtype=torch.float64)
    res = greedy_conditional_mi(c, q, None, torch.tensor([3, 7, 10, 2]), alpha=alpha, kernel="rbf")
    for i in range(b):
        one = greedy_conditional_mi(c[i : i + 1], q[i : i + 1], None, int(res.counts[i]), alpha=alpha[i].item(), kernel="rbf")
        n = int(res.counts[i])
        assert torch.equal(one.indices[0], res.indices[i, :n])
        torch.testing.assert_close(one.gains[0], res.gains[i, :n])


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cand_emb=torch.randn(5, 4)), "cand_emb"),
        (dict(query_emb=torch.randn(2, 3, 7)), "query_emb"),
        (dict(budget=torch.tensor([1, -1])), "budget"),
        (dict(budget=torch.tensor([1.0, 2.0])), "budget"),
        (dict(alpha=1.5), "alpha"),
        (dict(price=-0.1), "price"),
        (dict(kernel="linear"), "kernel"),
        (dict(jitter=0.0), "jitter"),
        (dict(var_floor=-1.0), "var_floor"),
        (dict(query_mask=torch.ones(2, 5, dtype=torch.bool)), "query_mask"),
        (dict(cand_emb=torch.full((2, 6, 8), float("nan"))), "cand_emb"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(cand_emb=torch.randn(2, 6, 8), query_emb=torch.randn(2, 3, 8), query_mask=None, budget=torch.tensor([2, 3]))
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in args}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        greedy_conditional_mi(args["cand_emb"], args["query_emb"], args["query_mask"], args["budget"], **extra)


def test_unit_vectors_make_cosine_and_linear_agree():
    # sanity of the kernel helper: cosine of unit vectors is their inner product
    x = F.normalize(torch.randn(1, 5, 6, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(kernel_matrix(x), x @ x.transpose(1, 2))


@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
def test_precomputed_kernel_and_kernel_columns_agree(kernel):
    c = torch.randn(3, 40, 16, dtype=torch.float64)
    q = torch.randn(3, 4, 16, dtype=torch.float64)
    a = greedy_conditional_mi(c, q, None, 12, alpha=0.6, kernel=kernel, precompute_kernel=True)
    b = greedy_conditional_mi(c, q, None, 12, alpha=0.6, kernel=kernel, precompute_kernel=False)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.gains, b.gains)


def test_given_gram_equals_computed_gram():
    c = torch.randn(2, 30, 8, dtype=torch.float64)
    q = torch.randn(2, 3, 8, dtype=torch.float64)
    ref = greedy_conditional_mi(c, q, None, 10, alpha=0.7, kernel="rbf")
    got = greedy_conditional_mi(c, q, None, 10, alpha=0.7, kernel="rbf", cand_gram=c @ c.transpose(1, 2))
    assert torch.equal(ref.indices, got.indices)
    torch.testing.assert_close(ref.gains, got.gains)
    with pytest.raises(ValueError, match="cand_gram"):
        greedy_conditional_mi(c, q, None, 10, cand_gram=torch.zeros(2, 30, 29, dtype=torch.float64))


def test_total_is_reported_whatever_alpha():
    c = torch.randn(2, 12, 16, dtype=torch.float64)
    q = torch.randn(2, 2, 16, dtype=torch.float64)
    for alpha in (0.0, 0.4):
        res = greedy_conditional_mi(c, q, None, 5, alpha=alpha, jitter=1e-3, var_floor=1e-12)
        closed = gaussian_set_mi(c, q, res.indices, jitter=1e-3)
        torch.testing.assert_close(res.total, closed, atol=1e-6, rtol=0)
        assert (res.total > 0).all()


def test_unary_prior_steers_the_picks_but_not_the_reported_information():
    g = torch.Generator().manual_seed(3)
    cand = torch.randn(2, 30, 8, generator=g, dtype=torch.float64)
    query = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    budget = torch.tensor([6, 6])
    base = greedy_conditional_mi(cand, query, None, budget, 0.5)
    zero = greedy_conditional_mi(cand, query, None, budget, 0.5, unary=torch.zeros(2, 30, dtype=torch.float64))
    assert torch.equal(base.indices, zero.indices) and torch.allclose(base.total, zero.total)
    # a large bonus on one candidate that the plain greedy does not pick first: it goes first
    target = next(j for j in range(30) if j not in base.indices[0, :1].tolist())
    unary = torch.zeros(2, 30, dtype=torch.float64)
    unary[0, target] = 100.0
    steered = greedy_conditional_mi(cand, query, None, budget, 0.5, unary=unary)
    assert steered.indices[0, 0].item() == target
    assert torch.equal(steered.indices[1], base.indices[1])  # the other row is untouched
    # the reported information is still the chain-rule I(c_S ; Q) of the chosen set
    exact = gaussian_set_mi(cand, query, steered.indices)
    assert torch.allclose(steered.total, exact, atol=1e-6)
    assert torch.allclose(steered.query_gains.sum(1), steered.total)
    with pytest.raises(ValueError, match="unary"):
        greedy_conditional_mi(cand, query, None, budget, 0.5, unary=-unary)
    with pytest.raises(ValueError, match="unary"):
        greedy_conditional_mi(cand, query, None, budget, 0.5, unary=unary[:, :5])


def test_fused_scorers_change_the_selection_and_check_their_names():
    from arr_coc.allocators import create_allocator

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 1 + 64, 16, generator=g)
    x[:, 1 + 10] *= 25.0  # one patch with a far larger norm (propositional) than the rest
    q = torch.randn(2, 4, 16, generator=g)
    plain = create_allocator("arr_coc").eval()(x, query=q, budget=5, grid=(8, 8), num_prefix_tokens=1)
    fused = create_allocator("arr_coc", fuse=("propositional",), fuse_weight=10.0).eval()(
        x, query=q, budget=5, grid=(8, 8), num_prefix_tokens=1
    )
    assert (fused.positions[..., :2] == torch.tensor([1, 2])).all(-1).any(-1).all()  # patch 10 = (1, 2)
    assert not torch.equal(plain.indices, fused.indices)
    with pytest.raises(ValueError, match="fuse"):
        create_allocator("arr_coc", fuse=("semantic",))


# ---------------------------------------------------------------------- straightforward reference
def _reference_kernel(c, q, kernel):
    """k over [candidates; query] of one example (float64), the greedy's model without jitter."""
    x = torch.cat([c, q]).double()
    if kernel == "cosine":
        norms = x.norm(dim=-1, keepdim=True)
        u = torch.where(norms > 0, x / norms.clamp_min(1e-300), torch.zeros_like(x))
        return u @ u.T
    ell2 = (c.double() - c.double().mean(0)).pow(2).sum(-1).mean()
    ell2 = ell2 if ell2 > 0 else torch.ones((), dtype=torch.float64)
    return torch.exp(-0.5 * torch.cdist(x, x).pow(2) / ell2)


def _reference_conditional_variances(sig, given_cov, given_idx, m):
    """Var(j | Z, c_given) [m] by one linear solve, Z a set of variables with covariance
    given_cov = (Cov(Z) [z, z], Cov(Z, c) [z, M]) (or None), c_given the candidates at given_idx."""
    zz, zc = given_cov if given_cov is not None else (sig.new_zeros(0, 0), sig.new_zeros(0, m))
    g = list(given_idx)
    top = torch.cat([zz, zc[:, g]], 1)
    bottom = torch.cat([zc[:, g].T, sig[g][:, g]], 1)
    cov_gg = torch.cat([top, bottom], 0)  # covariance of (Z, c_given)
    cov_gj = torch.cat([zc, sig[g][:, :m]], 0)  # [z + |g|, m]
    diag = sig.diagonal()[:m]
    if cov_gg.shape[0] == 0:
        return diag.clone()
    sol = torch.linalg.solve(cov_gg, cov_gj)
    return diag - (cov_gj * sol).sum(0)


def _reference_steps(c, q, qmask, picks, alpha, unary, kernel, jitter, var_floor, distortion):
    """Follow the given picks of one example, conditioning by solves on the set-level definitions.

    Per step: (gain [M], query gain [M], coverage gain [M], Var(j | S) [M]) of every candidate
    (picked ones -inf gain), where S holds the earlier picks that were not yet determined
    (Var > var_floor) in that chain, and chain B conditions on the query's eigen-directions
    with eigenvalue > var_floor (the greedy's model).
    """
    m = c.shape[0]
    q = q[qmask] if q is not None else c.new_zeros(0, c.shape[1])
    t = q.shape[0]
    sig = _reference_kernel(c, q, kernel) + jitter * torch.eye(m + t, dtype=torch.float64)
    zq = None
    if t:
        evals, evecs = torch.linalg.eigh(sig[m:, m:])
        keep = evals > var_floor
        w = evecs[:, keep]
        zq = (torch.diag(evals[keep]), w.T @ sig[m:, :m])
    given_a, given_b, out = [], [], []
    for s in picks:
        va = _reference_conditional_variances(sig, None, given_a, m).clamp_min(0)
        vb = _reference_conditional_variances(sig, zq, given_b, m).clamp_min(0) if t else va
        picked = [p for p, _ in out]
        va[picked] = 0
        vb[picked] = 0
        lva = va.clamp_min(var_floor).log()
        cov_gain = (0.5 * (lva - math.log(distortion))).clamp_min(0)
        q_gain = (0.5 * (lva - vb.clamp_min(var_floor).log())).clamp_min(0) if t else torch.zeros_like(va)
        gain = alpha * q_gain + (1 - alpha) * cov_gain
        if unary is not None:
            gain = torch.where(gain > 0, gain + unary.double(), gain)
        gain[picked] = -math.inf
        out.append((s, (gain, q_gain, cov_gain, va)))
        if s is None:  # a look one step past the last pick
            break
        if va[s] > var_floor:
            given_a.append(s)
        if t and vb[s] > var_floor:
            given_b.append(s)
    return [v for _, v in out]


def _assert_matches_reference(res, c, q, qmask, budget, alpha, price, unary, kernel, jitter, var_floor, distortion, tol):
    """Each pick is an argmax of the reference gain (exactly the argmax when the runner-up is
    more than tol behind; when every gain is 0, a largest residual variance), the reported
    gains are the reference's, and each row stops where the budget or the price says."""
    b = c.shape[0]
    for i in range(b):
        n = int(res.counts[i])
        picks = res.indices[i, :n].tolist()
        assert (res.indices[i, n:] == -1).all()
        assert len(set(picks)) == n
        qm = qmask[i] if qmask is not None else torch.ones(q.shape[1], dtype=torch.bool) if q is not None else None
        a = float(alpha[i]) if isinstance(alpha, torch.Tensor) else float(alpha)
        p = float(price[i]) if isinstance(price, torch.Tensor) else float(price)
        # one step past the last pick (when a candidate is left) tells why the row stopped
        follow = picks + [None] if n < c.shape[1] else picks
        steps = _reference_steps(
            c[i], q[i] if q is not None else None, qm, follow, a,
            unary[i] if unary is not None else None, kernel, jitter, var_floor, distortion,
        )
        for k, s in enumerate(picks):
            gain, q_gain, cov_gain, va = steps[k]
            best = gain.max().item()
            if best > 0:
                assert gain[s].item() >= best - tol, (i, k, s, gain[s].item(), best)
                top2 = gain.topk(2).values if gain.numel() > 1 else gain
                if top2.numel() > 1 and top2[0] - top2[1] > tol:
                    assert s == int(gain.argmax()), (i, k)
            else:  # every candidate redundant: a largest residual variance among the unpicked
                unpicked = torch.isfinite(gain)
                assert va[s].clamp(0, 1).item() >= va[unpicked].clamp(0, 1).max().item() - tol
            assert res.gains[i, k].item() == pytest.approx(max(gain[s].item(), 0.0), abs=tol)
            assert res.query_gains[i, k].item() == pytest.approx(q_gain[s].item(), abs=tol)
            assert res.coverage_gains[i, k].item() == pytest.approx(cov_gain[s].item(), abs=tol)
            assert gain[s].item() >= p - tol  # a kept pick is worth its price
        bud = int(budget[i]) if isinstance(budget, torch.Tensor) else int(budget)
        if n < min(bud, c.shape[1]):  # stopped early: the best remaining gain is below the price
            assert steps[n][0].max().item() < p + tol
        torch.testing.assert_close(res.total[i], res.query_gains[i].sum(), atol=1e-12, rtol=0)


def _tie_inputs(g, b, m, r, t, dtype):
    """Random candidates with exact duplicates, a scaled duplicate, a zero vector and a query twin."""
    c = torch.randn(b, m, r, generator=g, dtype=torch.float64)
    c[:, 5] = c[:, 2]  # exact duplicate
    c[:, 7] = 3.0 * c[:, 1]  # same direction (a duplicate under the cosine kernel)
    c[:, 9] = 0.0  # zero vector: no variance under the cosine kernel
    q = torch.randn(b, t, r, generator=g, dtype=torch.float64)
    q[:, 0] = 2.0 * c[:, 4]  # the query's twin among the candidates
    return c.to(dtype), q.to(dtype)


@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
@pytest.mark.parametrize("source", ["gram", "columns", "given", "pyramid"])
def test_optimised_greedy_equals_straightforward_reference(kernel, source):
    """The incremental greedy against set-level conditional variances from linear solves
    (float64, tight tolerance), with ties, duplicates, a zero vector, a query twin, per-example
    budgets, prices, alphas, padded query tokens and a unary prior."""
    from arr_coc.attending import pyramid_gram
    from arr_coc.pyramid import build_pyramid

    g = torch.Generator().manual_seed(11)
    b, r, t = 4, 12, 3
    if source == "pyramid":
        fine = torch.randn(b, 4 * 6, r, generator=g, dtype=torch.float64)
        fine[:, 5] = fine[:, 2]
        c = build_pyramid(fine, (4, 6), (1, 2)).candidates  # 24 + 6 + 2 candidates
        q = torch.randn(b, t, r, generator=g, dtype=torch.float64)
        q[:, 0] = 2.0 * c[:, 25]  # a pooled candidate's twin
    else:
        c, q = _tie_inputs(g, b, 30, r, t, torch.float64)
    m = c.shape[1]
    budget = torch.tensor([m, 9, 0, 14])
    alpha = torch.tensor([1.0, 0.6, 0.3, 0.0], dtype=torch.float64)
    price = torch.tensor([0.0, 0.0, 0.1, 0.02], dtype=torch.float64)
    qmask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    unary = torch.rand(b, m, generator=g, dtype=torch.float64) * 0.05
    unary[0] = 0.0
    kw = dict(kernel=kernel, jitter=1e-6, var_floor=1e-4, distortion=1e-2)
    extra = {}
    if source == "columns":
        extra["precompute_kernel"] = False
    elif source == "given":
        extra["cand_gram"] = c @ c.transpose(1, 2)
    elif source == "pyramid":
        extra["cand_gram"] = pyramid_gram(fine, (4, 6), (1, 2))
    res = greedy_conditional_mi(c, q, qmask, budget, alpha, price, unary=unary, **kw, **extra)
    assert res.counts[0] == m and res.counts[2] == 0
    _assert_matches_reference(res, c, q, qmask, budget, alpha, price, unary, **kw, tol=1e-8)
    # coverage only (no query): one chain
    res = greedy_conditional_mi(c, None, None, budget, alpha, price, **kw, **extra)
    _assert_matches_reference(res, c, None, None, budget, alpha, price, None, **kw, tol=1e-8)


def test_float32_greedy_matches_the_float64_reference():
    """float32 compute (the default for float32 input) picks what the float64 reference picks,
    with gains within float32 accuracy, while the residual variances stay well above float32
    noise (embedding rank 64 > budget 20, as with D = 1024 and K = 64). Near the floor (the
    span exhausted) float32 cancellation reaches 1e-2 nats in a log ratio: use float64 there."""
    g = torch.Generator().manual_seed(12)
    c, q = _tie_inputs(g, 3, 40, 64, 4, torch.float32)
    budget = torch.tensor([20, 17, 12])
    alpha = torch.tensor([0.9, 0.5, 1.0])
    kw = dict(kernel="cosine", jitter=1e-6, var_floor=1e-4, distortion=1e-2)
    res = greedy_conditional_mi(c, q, None, budget, alpha, **kw)
    assert res.gains.dtype == torch.float32
    _assert_matches_reference(res, c.double(), q.double(), None, budget, alpha.double(), 0.0, None, **kw, tol=1e-5)
    ref64 = greedy_conditional_mi(c.double(), q.double(), None, budget, alpha.double(), **kw)
    canon = torch.arange(-1, 40)  # the same picks up to exchanging the (exactly tied) duplicates
    canon[1 + 5], canon[1 + 7] = 2, 1
    assert torch.equal(canon[1 + res.indices], canon[1 + ref64.indices])
    torch.testing.assert_close(res.total.double(), ref64.total, atol=1e-5, rtol=0)



# ---------------------------------------------------------------------- set MI with the greedy's floors
def _low_rank_inputs(g, b, m, t, rank, r=24, noise=1e-3):
    """Candidates and query near a rank-``rank`` subspace (as real ViT tokens are), so the
    greedy's floors engage: later picks are (nearly) determined and query tokens have twins."""
    basis = torch.randn(rank, r, generator=g, dtype=torch.float64)
    c = torch.randn(b, m, rank, generator=g, dtype=torch.float64) @ basis
    q = torch.randn(b, t, rank, generator=g, dtype=torch.float64) @ basis
    c = c + noise * torch.randn(b, m, r, generator=g, dtype=torch.float64)
    q = q + noise * torch.randn(b, t, r, generator=g, dtype=torch.float64)
    c[:, 3] = c[:, 1]  # an exact duplicate
    return c, q


@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
def test_set_mi_with_floor_is_the_greedys_total_where_floors_engage(kernel):
    """With a floor, gaussian_set_mi along the greedy's pick order is the greedy's reported total
    (per-example budgets, padded picks and query tokens), on low-rank tokens where the floors
    change the answer by nats (the exact log-det form differs from it there)."""
    g = torch.Generator().manual_seed(21)
    b, m, t = 4, 40, 4
    c, q = _low_rank_inputs(g, b, m, t, rank=6)
    qmask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    budget = torch.tensor([20, 12, 7, 16])
    kw = dict(kernel=kernel, jitter=1e-6)
    res = greedy_conditional_mi(c, q, qmask, budget, 0.9, var_floor=1e-4, **kw)
    assert (res.indices == -1).any()  # padded picks are ignored
    chain = gaussian_set_mi(c, q, res.indices, qmask, var_floor=1e-4, **kw)
    torch.testing.assert_close(chain, res.total, atol=1e-8, rtol=0)
    if kernel == "cosine":  # (the RBF kernel of low-rank tokens is not low-rank: no floor engages)
        exact = gaussian_set_mi(c, q, res.indices, qmask, **kw)
        assert (exact - chain).abs().max() > 0.5  # the floors matter on these inputs
        # clamping each log-det's eigenvalues is a different quantity (what this replaced)
        sig = kernel_matrix(torch.cat([c, q], 1), kernel=kernel)
        sel = res.indices[0, : budget[0]].tolist() + [m + i for i in range(t)]
        mat = sig[0][sel][:, sel] + 1e-6 * torch.eye(len(sel), dtype=torch.float64)
        ld = lambda x: torch.linalg.eigvalsh(x).clamp_min(1e-4).log().sum()  # noqa: E731
        k = int(budget[0])
        clamped = 0.5 * (ld(mat[:k, :k]) + ld(mat[k:, k:]) - ld(mat))
        assert abs(float(clamped) - float(chain[0])) > 0.5


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rank=st.integers(1, 8), t=st.integers(1, 5), k=st.integers(1, 24),
       alpha=st.floats(0.0, 1.0))
def test_set_mi_with_floor_is_the_greedys_total_for_any_low_rank_tokens(seed, rank, t, k, alpha):
    """Property: for any alpha, budget, query length and token rank, the floored chain along the
    greedy's picks is the greedy's reported total (float64), and it is never negative."""
    g = torch.Generator().manual_seed(seed)
    c, q = _low_rank_inputs(g, 2, 30, t, rank=rank, r=12)
    res = greedy_conditional_mi(c, q, None, k, alpha, var_floor=1e-4)
    chain = gaussian_set_mi(c, q, res.indices, var_floor=1e-4)
    torch.testing.assert_close(chain, res.total, atol=1e-7, rtol=1e-9)
    assert (chain >= 0).all()


def test_set_mi_with_floor_equals_the_exact_form_where_no_floor_engages():
    """Well-conditioned tokens (rank 64 > K + T): the floored chain equals the exact log-det form
    and, like it, does not depend on the order of the picks; it is monotone along the picks."""
    g = torch.Generator().manual_seed(22)
    b, m, r, t, k = 3, 30, 64, 3, 10
    c = torch.randn(b, m, r, generator=g, dtype=torch.float64)
    q = torch.randn(b, t, r, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(b)])
    exact = gaussian_set_mi(c, q, idx)
    chain = gaussian_set_mi(c, q, idx, var_floor=1e-8)
    torch.testing.assert_close(chain, exact, atol=1e-9, rtol=0)
    flipped = gaussian_set_mi(c, q, idx.flip(1), var_floor=1e-8)
    torch.testing.assert_close(flipped, exact, atol=1e-9, rtol=0)
    prefix = torch.stack([gaussian_set_mi(c, q, idx[:, :j], var_floor=1e-8) for j in range(1, k + 1)], 1)
    assert (prefix.diff(dim=1) >= -1e-12).all() and (prefix >= 0).all()


def test_set_mi_with_floor_is_differentiable_and_finite_on_duplicates():
    """Gradients reach the embeddings through the floored chain, finite with exact duplicates, a
    query twin and padded query tokens; the value with a gradient is the value without one."""
    g = torch.Generator().manual_seed(23)
    c, q = _tie_inputs(g, 2, 12, 8, 3, torch.float64)
    qmask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    idx = torch.tensor([[4, 2, 5, 1, 7, 0], [2, 5, 4, 9, 3, -1]])
    plain = gaussian_set_mi(c, q, idx, qmask, var_floor=1e-4)
    c.requires_grad_(True)
    q.requires_grad_(True)
    val = gaussian_set_mi(c, q, idx, qmask, var_floor=1e-4)
    torch.testing.assert_close(val.detach(), plain, atol=1e-10, rtol=0)
    assert torch.isfinite(val).all() and (val > 0).all()
    val.sum().backward()
    assert torch.isfinite(c.grad).all() and torch.isfinite(q.grad).all()
    assert c.grad.abs().sum() > 0 and q.grad[0].abs().sum() > 0
    assert c.grad[:, 10:].abs().sum() == 0  # never picked: no gradient
    assert q.grad[1, 1:].abs().sum() == 0  # padded query tokens: no gradient


def test_set_mi_with_floor_gradient_matches_finite_differences():
    """Away from the floors' switching points the floored chain is smooth and its gradient is the
    derivative of its value (gradcheck, float64), on low-rank tokens where some picks are
    determined and with a padded query token."""
    g = torch.Generator().manual_seed(24)
    c, q = _low_rank_inputs(g, 2, 10, 3, rank=4, r=6, noise=3e-2)
    qmask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    idx = torch.tensor([[0, 2, 4, 6, 8, 9], [1, 3, 5, 7, -1, -1]])
    fn = lambda cc, qq: gaussian_set_mi(cc, qq, idx, qmask, var_floor=1e-4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (c.requires_grad_(True), q.requires_grad_(True)), eps=1e-7, atol=1e-5)


# ---------------------------------------------------------------------- pyramid Gram
@pytest.mark.parametrize("grid, levels", [((4, 6), (1, 2)), ((5, 7), (1, 2)), ((3, 3), (1,)), ((4, 4), ())])
def test_pyramid_gram_is_the_gram_of_the_pyramid_candidates(grid, levels):
    from arr_coc.attending import PyramidGram, pyramid_gram
    from arr_coc.pyramid import build_pyramid

    g = torch.Generator().manual_seed(13)
    fine = torch.randn(2, grid[0] * grid[1], 5, generator=g, dtype=torch.float64)
    cand = build_pyramid(fine, grid, levels).candidates  # ceil-mode pooling at ragged edges
    want = cand @ cand.transpose(1, 2)
    pg = pyramid_gram(fine, grid, levels)
    assert pg.shape == tuple(want.shape)
    torch.testing.assert_close(pg.dense(), want)
    torch.testing.assert_close(pg.diag(), want.diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(pg.mean(), want.mean(dim=(1, 2)))
    for s in ([0, 3], [cand.shape[1] - 1, min(grid[0] * grid[1], cand.shape[1] - 2)]):
        torch.testing.assert_close(pg.rows(torch.tensor(s)), want[torch.arange(2), torch.tensor(s)])
    assert pg.to(torch.float32).fine_gram.dtype == torch.float32 and pg.to(torch.float64) is pg
    with pytest.raises(ValueError, match="fine_gram"):
        PyramidGram(torch.zeros(2, 5, 5), grid, levels)
    with pytest.raises(ValueError, match="levels"):
        PyramidGram(pg.fine_gram, grid, (0,))


def test_pyramid_gram_greedy_equals_dense_gram_greedy():
    from arr_coc.attending import pyramid_gram
    from arr_coc.pyramid import build_pyramid

    g = torch.Generator().manual_seed(14)
    fine = torch.randn(3, 8 * 8, 16, generator=g, dtype=torch.float64)
    q = torch.randn(3, 4, 16, generator=g, dtype=torch.float64)
    cand = build_pyramid(fine, (8, 8), (1, 2)).candidates
    for kernel in ("cosine", "rbf"):
        dense = greedy_conditional_mi(cand, q, None, 20, alpha=0.8, kernel=kernel)
        pyr = greedy_conditional_mi(cand, q, None, 20, alpha=0.8, kernel=kernel, cand_gram=pyramid_gram(fine, (8, 8)))
        assert torch.equal(dense.indices, pyr.indices)
        torch.testing.assert_close(dense.gains, pyr.gains)
    with pytest.raises(ValueError, match="cand_gram"):
        greedy_conditional_mi(cand, q, None, 5, cand_gram=pyramid_gram(fine, (8, 8), (1,)))


def test_arr_coc_allocator_picks_equal_the_greedy_on_the_dense_candidate_gram():
    """The allocator's CPU path (PyramidGram of the fine tokens) picks what the greedy picks on
    the candidates' own [B, M, M] Gram."""
    from arr_coc.allocators import create_allocator
    from arr_coc.pyramid import build_pyramid

    g = torch.Generator().manual_seed(15)
    x = torch.randn(2, 1 + 8 * 8, 16, generator=g, dtype=torch.float64)
    q = torch.randn(2, 4, 16, generator=g, dtype=torch.float64)
    alloc = create_allocator("arr_coc", alpha=0.7).eval()
    with torch.no_grad():
        sel = alloc(x, query=q, budget=12, grid=(8, 8), num_prefix_tokens=1)
        out = alloc.scorer(build_pyramid(x[:, 1:], (8, 8), (1, 2)).candidates, q, None)
    cand = out.candidate_emb
    ref = greedy_conditional_mi(cand, out.query_emb, None, 12, 0.7, cand_gram=cand @ cand.transpose(1, 2))
    assert torch.equal(sel.extras["pick_order"], ref.indices)
    torch.testing.assert_close(sel.extras["step_gains"], ref.gains)
