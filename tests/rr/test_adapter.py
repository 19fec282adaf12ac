"""QualityAdapter: the closed-form base, distillation from the exact greedy, InfoNCE, Gumbel top-k."""

import math

import pytest
import torch

from arr_coc.adapter import QualityAdapter, distillation_loss, infonce_bound, relaxed_topk
from arr_coc.attending import greedy_conditional_mi


def test_untrained_query_term_equals_greedy_first_step_gain():
    b, m, r = 3, 40, 16
    c = torch.randn(b, m, r, dtype=torch.float64)
    q = torch.randn(b, 1, r, dtype=torch.float64)
    a = QualityAdapter().eval()
    pred = a(c, q[:, 0], alpha=torch.ones(b, dtype=torch.float64))
    res = greedy_conditional_mi(c, q, None, 1, alpha=1.0, jitter=1e-9, var_floor=1e-12)
    # the greedy's first pick is the adapter's argmax, with the same information (nats)
    assert torch.equal(pred.score.argmax(1), res.indices[:, 0])
    torch.testing.assert_close(pred.score.max(1).values, res.gains[:, 0], atol=1e-6, rtol=0)
    assert torch.equal(pred.score, pred.base)
    # any width works untrained
    a(torch.randn(2, 7, 5), torch.randn(2, 5))


def test_plackett_luce_distillation_loss_closed_form():
    pred = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    idx = torch.tensor([[2, 0]])
    gains = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    e = [math.exp(v) for v in (1.0, 0.0, -1.0)]
    nll = -(math.log(e[2] / sum(e)) + math.log(e[0] / (e[0] + e[1]))) / 2
    mse = ((-1.0 - 0.5) ** 2 + (1.0 - 0.25) ** 2) / 2
    assert distillation_loss(pred, idx, gains).item() == pytest.approx(nll + mse, abs=1e-12)
    # padding is ignored
    padded = distillation_loss(pred, torch.tensor([[2, 0, -1]]), torch.tensor([[0.5, 0.25, 0.0]], dtype=torch.float64))
    assert padded.item() == pytest.approx(nll + mse, abs=1e-12)


def test_distillation_temperature_scales_the_ranking_term_only():
    pred = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    idx, gains = torch.tensor([[2, 0]]), torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    t = 0.25
    e = [math.exp(v / t) for v in (1.0, 0.0, -1.0)]
    nll = -(math.log(e[2] / sum(e)) + math.log(e[0] / (e[0] + e[1]))) / 2
    mse = ((-1.0 - 0.5) ** 2 + (1.0 - 0.25) ** 2) / 2  # on the scores in nats, not divided
    got = distillation_loss(pred, idx, gains, temperature=t, mse_weight=0.5)
    assert got.item() == pytest.approx(nll + 0.5 * mse, abs=1e-9)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(pred, idx, gains, temperature=0.0)


def test_distillation_teaches_the_adapter_the_greedy_choice():
    """Distillation from a query-focused greedy (alpha = 1) fixes an adapter told alpha = 0."""
    torch.manual_seed(0)
    b, m, r, k = 16, 48, 8, 4
    c = torch.randn(b, m, r)
    q = torch.randn(b, 1, r)
    teacher = greedy_conditional_mi(c, q, None, k, alpha=1.0)
    alpha = torch.zeros(b)  # the base is coverage only: the residual has to learn the query term
    a = QualityAdapter(r, proj_dim=8, hidden=32)
    opt = torch.optim.Adam(a.parameters(), lr=2e-2)

    def overlap():
        with torch.no_grad():
            top = a.eval()(c, q[:, 0], alpha=alpha).score.topk(k, dim=1).indices
        return sum(len(set(top[i].tolist()) & set(teacher.indices[i].tolist())) for i in range(b)) / (b * k)

    before = overlap()
    a.train()
    first = None
    for _ in range(60):
        loss = distillation_loss(a(c, q[:, 0], alpha=alpha).score, teacher.indices, teacher.gains)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    assert overlap() > before + 0.3


def test_infonce_bound():
    b = 8
    perfect = torch.eye(b) * 50
    loss, bound = infonce_bound(perfect)
    assert bound.item() == pytest.approx(math.log(b), abs=1e-6)
    loss, bound = infonce_bound(torch.zeros(b, b))
    assert bound.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="critic"):
        infonce_bound(torch.zeros(3, 4))


def test_critic_matrix_trains_and_bound_rises():
    torch.manual_seed(0)
    b, m, r = 8, 12, 8
    c = torch.randn(b, m, r)
    q = c[:, 0] + 0.1 * torch.randn(b, r)  # each query is about its own image
    a = QualityAdapter(r)
    _, bound0 = infonce_bound(a.critic_matrix(c, q))
    opt = torch.optim.Adam(a.parameters(), lr=1e-2)
    for _ in range(30):
        loss, bound = infonce_bound(a.critic_matrix(c, q))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert bound.item() > bound0.item() and bound.item() <= math.log(b) + 1e-6


def test_relaxed_topk_straight_through():
    torch.manual_seed(0)
    scores = torch.randn(3, 10, requires_grad=True)
    budget = torch.tensor([3, 0, 10])
    idx, keep = relaxed_topk(scores, budget, gumbel=False)
    assert idx.shape == (3, 10)
    assert torch.equal(idx[0, :3], scores.detach()[0].topk(3).indices) and (idx[0, 3:] == -1).all()
    assert (idx[1] == -1).all() and sorted(idx[2].tolist()) == list(range(10))
    # forward: the hard 0/1 selection
    hard = torch.zeros(3, 10)
    hard[0, idx[0, :3]] = 1
    hard[2] = 1
    torch.testing.assert_close(keep.detach(), hard, atol=1e-6, rtol=0)
    # backward: the relaxed subset's gradient
    (keep * torch.arange(10.0)).sum().backward()
    assert scores.grad[0].abs().sum() > 0
    # with Gumbel noise the picks are random but the count is right
    idx2, keep2 = relaxed_topk(scores, budget, generator=torch.Generator().manual_seed(1))
    assert keep2.detach().sum(1).tolist() == pytest.approx([3, 0, 10])


def test_relaxed_topk_slots_are_the_successive_softmaxes():
    torch.manual_seed(1)
    scores = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    budget = torch.tensor([2, 1])
    idx, keep, slots = relaxed_topk(scores, budget, temperature=0.5, gumbel=False, return_slots=True)
    assert slots.shape == (2, 2, 6)
    p1 = (scores / 0.5).softmax(1)
    torch.testing.assert_close(slots[:, 0], p1)
    # the second pick: the softmax with the first one's mass removed (log(1 - p1) added)
    p2 = (scores / 0.5 + torch.log1p(-p1)).softmax(1)
    torch.testing.assert_close(slots[0, 1], p2[0])
    assert (slots[1, 1] == 0).all()  # past the budget
    torch.testing.assert_close(keep.detach() - keep.detach().round(), torch.zeros_like(keep), atol=1e-12, rtol=0)
    torch.testing.assert_close(slots.sum(1) - slots.sum(1).detach(), keep - keep.detach())


def test_max_residual_bounds_the_residual():
    torch.manual_seed(0)
    a = QualityAdapter(8, max_residual=0.5)
    torch.nn.init.normal_(a.mlp[-1].weight, std=10.0)
    c, q = torch.randn(2, 20, 8), torch.randn(2, 8)
    out = a.train()(c, q)
    resid = out.score - out.base
    assert resid.abs().max() <= 0.5 and resid.abs().max() > 0.4
    with pytest.raises(ValueError, match="max_residual"):
        QualityAdapter(max_residual=0.0)


def _train_adapter_on_a_pooled_biased_loss(**kwargs):
    """A few steps of arr_coc_adapter on a downstream loss that rewards pooled tokens (the
    bias the answer loss of a frozen VLM showed through a straight-through top-k), plus the
    allocator's own distillation term. Returns (overlap with the exact greedy, fraction of
    kept tokens that are fine) before and after."""
    from arr_coc.allocators import create_allocator

    torch.manual_seed(0)
    b, g, d, k = 8, 4, 16, 4
    x, q = torch.randn(b, g * g, d), torch.randn(b, 3, d)
    alloc = create_allocator("arr_coc_adapter", report_gain=False, **kwargs)
    teacher = create_allocator("arr_coc", scorer=alloc.scorer, balancer=alloc.balancer).eval()
    alloc.train()
    alloc(x, query=q, budget=k, grid=(g, g))  # materialise the lazy parameters
    opt = torch.optim.Adam(alloc.parameters(), lr=1e-2)

    def stats():
        with torch.no_grad():
            o = alloc.eval()(x, query=q, budget=k, grid=(g, g))
            t = teacher(x, query=q, budget=k, grid=(g, g))
        alloc.train()
        overlap = sum(len(set(o.indices[i].tolist()) & set(t.indices[i].tolist())) for i in range(b)) / (b * k)
        return overlap, (o.positions[..., 2] == 0).float().mean().item()

    start = stats()
    for _ in range(25):
        o = alloc(x, query=q, budget=k, grid=(g, g))
        level = o.positions[..., 2].float()
        task = -(level[..., None] * o.tokens * o.tokens.detach()).sum(-1).mean()
        loss = task + o.extras.get("losses", {}).get("distill", 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return start, stats()


def test_stage2_training_does_not_collapse_the_adapter_to_pooled_tokens():
    # the old recipe (task loss alone through the scale straight-through): collapses to pooled tokens
    (_, fine0), (_, fine_old) = _train_adapter_on_a_pooled_biased_loss(mode="topk", distill=False, straight_through="scale")
    assert fine0 > 0.7 and fine_old < fine0 - 0.4
    # the one-pass default (distillation from the greedy + per-slot straight-through): the greedy's
    # picks are kept (overlap does not fall) and fine tokens are not abandoned
    (ov0, fine0), (ov, fine) = _train_adapter_on_a_pooled_biased_loss(mode="topk")
    assert ov >= ov0 + 0.2
    assert fine >= fine0 - 0.05


# ---------------------------------------------------------------------- the shortlist design
def test_shortlist_recall_loss_closed_form():
    from arr_coc.adapter import shortlist_recall_loss

    pred = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    picks = torch.tensor([[1, 4, -1]])
    # top-3 holds both picks iff both beat the 2nd best non-pick (score 1.0, candidate 2)
    t = 0.1
    want = (math.log1p(math.exp((1.0 - 2.0) / t)) + math.log1p(math.exp((1.0 + 1.0) / t))) / 2
    loss = shortlist_recall_loss(pred, picks, 3, temperature=t)
    assert loss.item() == pytest.approx(want, abs=1e-9)
    loss.backward()
    assert pred.grad[0, 2] > 0 and pred.grad[0, 1] < 0 and pred.grad[0, 4] < 0  # lower the threshold, raise the picks
    assert pred.grad[0, 0] == 0 and pred.grad[0, 3] == 0
    # a shortlist that holds every candidate: nothing to learn
    assert shortlist_recall_loss(pred, picks, 5).item() == 0.0
    with pytest.raises(ValueError, match="size"):
        shortlist_recall_loss(pred, picks, 0)


class _OracleScores(torch.nn.Module):
    """An adapter stand-in: scores are ``bonus`` [B, M] (fixed), whatever the input."""

    def __init__(self, bonus):
        super().__init__()
        self.bonus = bonus

    def forward(self, candidate_emb, *args, **kwargs):
        from arr_coc.adapter import AdapterOutput

        return AdapterOutput(score=self.bonus, base=self.bonus)


def _pyramid_case(rank=None, seed=0, b=4, g=6, d=12):
    gen = torch.Generator().manual_seed(seed)
    if rank is None:
        tokens = torch.randn(b, g * g, d, generator=gen, dtype=torch.float64)
    else:  # tokens in a rank-`rank` subspace: the greedy's gains vanish after a few picks
        tokens = torch.randn(b, g * g, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, d, generator=gen, dtype=torch.float64)
    query = torch.randn(b, 3, d, generator=gen, dtype=torch.float64)
    return tokens, query, (g, g)


def test_shortlist_greedy_is_the_exact_greedy_when_the_shortlist_holds_its_picks():
    from arr_coc.allocators import create_allocator

    tokens, query, grid = _pyramid_case()
    k = 5
    exact = create_allocator("arr_coc").eval()
    ref = exact(tokens, query=query, budget=k, grid=grid)
    order = ref.extras["pick_order"]
    m = ref.extras["pmi"].shape[1]
    bonus = torch.rand(tokens.shape[0], m, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.5
    bonus = bonus.scatter(1, order, 1.0)  # the greedy's picks are in the top-2K, with K other candidates
    ad = create_allocator("arr_coc_adapter", shortlist=2.0, adapter=_OracleScores(bonus)).eval()
    out = ad(tokens, query=query, budget=k, grid=grid)
    assert torch.equal(out.indices, ref.indices)  # same picks (raster order)
    torch.testing.assert_close(out.gain, ref.gain, rtol=0, atol=1e-9)  # the chain-rule I(c_S ; Q), exact
    torch.testing.assert_close(out.extras["step_gains"], ref.extras["step_gains"], rtol=0, atol=1e-9)
    assert out.extras["shortlist"].shape == (tokens.shape[0], 2 * k)
    # a shortlist that misses the greedy's first pick cannot reproduce it, and says so by its gains
    miss = bonus.scatter(1, order[:, :1], -1.0)
    out2 = create_allocator("arr_coc_adapter", shortlist=2.0, adapter=_OracleScores(miss)).eval()(
        tokens, query=query, budget=k, grid=grid
    )
    assert not torch.equal(out2.indices, ref.indices)
    assert bool((out2.extras["step_gains"][:, 0] < ref.extras["step_gains"][:, 0]).all())


def test_shortlist_fill_keeps_the_determined_picks_then_the_best_scores():
    """fill='scores': the greedy's picks with a positive gain, then the best-scoring others."""
    from arr_coc.allocators import create_allocator

    tokens, query, grid = _pyramid_case(rank=3)
    k = 8
    exact = create_allocator("arr_coc").eval()
    ref = exact(tokens, query=query, budget=k, grid=grid)
    det = ref.extras["step_gains"] > 0
    assert bool((det.sum(1) < k).all()) and bool((det.sum(1) > 0).all())  # the case has a zero-gain tail
    m = ref.extras["pmi"].shape[1]
    bonus = torch.rand(tokens.shape[0], m, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    bonus = bonus.scatter(1, ref.extras["pick_order"], 2.0)
    ad = create_allocator("arr_coc_adapter", shortlist=3.0, fill="scores", adapter=_OracleScores(bonus)).eval()
    out = ad(tokens, query=query, budget=k, grid=grid)
    for row in range(tokens.shape[0]):
        got = out.extras["pick_order"][row]
        n = int(det[row].sum())
        assert got[:n].tolist() == ref.extras["pick_order"][row, :n].tolist()
        rest = bonus[row].clone()
        rest[got[:n]] = -math.inf
        assert sorted(got[n:].tolist()) == sorted(rest.topk(k - n).indices.tolist())  # ties: any order
    assert int(out.mask.sum(1).min()) == k


def test_shortlist_overlap_with_the_greedy_on_fixed_structured_tokens():
    """Untrained adapters on fixed structured tokens (a shared direction plus a rank-8 image
    structure, like the v2 tokens): the shortlist design reproduces more of the greedy's
    picks than the one-pass top-k, and all of them once the shortlist holds every candidate."""
    from arr_coc.allocators import create_allocator

    gen = torch.Generator().manual_seed(0)
    b, g, d, k = 8, 8, 32, 8
    tokens = 3 * torch.randn(d, generator=gen) + (torch.randn(b, g * g, 8, generator=gen) @ torch.randn(8, d, generator=gen)) * 0.3
    tokens = tokens + 0.05 * torch.randn(b, g * g, d, generator=gen)
    query = torch.randn(b, 4, d, generator=gen)
    args = dict(query=query, budget=k, grid=(g, g))
    ref = create_allocator("arr_coc").eval()(tokens, **args).indices

    def overlap(**kw):
        out = create_allocator("arr_coc_adapter", **kw).eval()(tokens, **args).indices
        return sum(len(set(out[i].tolist()) & set(ref[i].tolist())) for i in range(b)) / (b * k)

    one_pass, short3, every = overlap(mode="topk"), overlap(shortlist=3.0), overlap(shortlist=100.0)
    assert every == 1.0
    assert short3 > one_pass + 0.1, (short3, one_pass)


# ---------------------------------------------------------------------- the token-level critic
def test_token_critic_closed_form():
    from arr_coc.adapter import TokenCritic

    gen = torch.Generator().manual_seed(0)
    b, m, t, d = 3, 5, 4, 6
    c, q = torch.randn(b, m, d, generator=gen, dtype=torch.float64), torch.randn(b, t, d, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]).bool()
    critic = TokenCritic(proj_dim=d, temperature=2.0).materialize(d)
    with torch.no_grad():
        critic.cand_proj.weight.copy_(torch.eye(d))
        critic.query_proj.weight.copy_(torch.eye(d))
    s = critic(c, q, mask)
    cc = c - c.mean(1, keepdim=True)
    qc = torch.stack([q[j] - q[j][mask[j]].mean(0) for j in range(b)])
    cn, qn = torch.nn.functional.normalize(cc, dim=-1), torch.nn.functional.normalize(qc, dim=-1)
    for a in range(b):
        for j in range(b):
            toks = [float((cn[a] @ qn[j, i]).max()) for i in range(t) if mask[j, i]]
            assert s[a, j].item() == pytest.approx(2.0 * sum(toks) / len(toks), abs=1e-6)  # tau is a float32 parameter


def test_token_critic_learns_where_the_question_names_image_content():
    """Each question's tokens are noisy copies of a few of its image's candidates (around a
    shared direction, as the v2 tokens): the critic's held-out InfoNCE bound rises above 1 nat (N = 16)."""
    from arr_coc.adapter import TokenCritic

    def draw(seed, n=16, m=24, t=4, d=16):
        gen = torch.Generator().manual_seed(seed)
        common = 4 * torch.randn(d, generator=gen)  # a shared direction, as in the v2 tokens
        c = common + torch.randn(n, m, d, generator=gen)
        pick = torch.randint(0, m, (n, t), generator=gen)
        q = c.gather(1, pick[..., None].expand(-1, -1, d)) - common + 0.3 * torch.randn(n, t, d, generator=gen)
        return c, q

    torch.manual_seed(0)
    critic = TokenCritic(proj_dim=16).materialize(16)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-2)
    held_c, held_q = draw(999)
    with torch.no_grad():
        before = infonce_bound(critic(held_c, held_q))[1].item()
    for step in range(40):
        c, q = draw(step)
        loss, _ = infonce_bound(critic(c, q))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = infonce_bound(critic(held_c, held_q))[1].item()
    assert after > 1.0 and after > before + 0.5, (before, after)
    assert after <= math.log(16) + 1e-6


def test_a_checkpoint_without_the_token_critic_still_loads():
    from arr_coc.allocators import create_allocator

    old = create_allocator("arr_coc_adapter", critic=None)
    new = create_allocator("arr_coc_adapter", critic="token")
    assert not any(k.startswith("critic.") for k in old.state_dict())
    new.load_state_dict(old.state_dict(), strict=True)  # the critic stays untrained
    bad = {k: v for k, v in create_allocator("arr_coc_adapter", critic="token").state_dict().items() if k != "critic.log_tau"}
    with pytest.raises(RuntimeError, match="log_tau"):
        new.load_state_dict(bad, strict=True)  # a partial critic is still an error
