"""``arr_coc_host_trained``: the host greedy plus a trained relevance term."""

from __future__ import annotations

import math

import pytest
import torch

from arr_coc.allocators import create_allocator, list_allocators
from arr_coc.allocators.arr_coc_host_trained import ArrCocHostTrainedAllocator, relevance_listwise_loss
from tests.allocators.test_arr_coc_host import joint_setup


def _llm_host(seed=5, b=2, n=16):
    """joint_setup's host with an ``llm_attention(layer)`` signal (heads x question tokens x P+N)."""
    host, tokens = joint_setup(b=b, n=n)
    g = torch.Generator().manual_seed(seed)
    att = torch.rand(b, 3, 4, 1 + n, generator=g)
    qmask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    host.llm_attention = lambda layer: (att, qmask)
    return host, tokens, att, qmask


def test_registered():
    assert "arr_coc_host_trained" in list_allocators()
    assert isinstance(create_allocator("arr_coc_host_trained"), ArrCocHostTrainedAllocator)


def test_relevance_listwise_loss_closed_forms():
    rel = torch.zeros(3, 8, dtype=torch.bool)
    rel[0, [1, 5]] = True
    rel[1, 2] = True
    # uniform logits: -log(1/8) = log 8 on every supervised row; the row without relevance: 0
    loss = relevance_listwise_loss(torch.zeros(3, 8), rel)
    torch.testing.assert_close(loss, torch.tensor([math.log(8), math.log(8), 0.0]))
    # all mass spread evenly on R: the minimum, log |R|
    logits = torch.where(rel, 0.0, -1e4)
    torch.testing.assert_close(relevance_listwise_loss(logits, rel)[:2], torch.tensor([math.log(2), 0.0]))
    # a [B, gh, gw] mask is the same as its flattening
    torch.testing.assert_close(relevance_listwise_loss(torch.zeros(3, 8), rel.view(3, 2, 4)), loss)
    with pytest.raises(ValueError, match="relevance"):
        relevance_listwise_loss(torch.zeros(3, 8), rel[:, :4])
    with pytest.raises(ValueError, match="logits"):
        relevance_listwise_loss(torch.zeros(3, 8, 1), rel)
    with pytest.raises(ValueError, match="logits"):
        relevance_listwise_loss(torch.zeros(3, 8, 1, 1), rel)
    # [B, S, N]: the mean over the S scorers of each one's loss against the same mask
    two = torch.stack([torch.zeros(3, 8), logits], 1)
    torch.testing.assert_close(relevance_listwise_loss(two, rel), (loss + relevance_listwise_loss(logits, rel)) / 2)


def test_without_the_learned_term_it_is_arr_coc_host():
    host, tokens, _, _ = _llm_host()
    q = torch.randn(2, 3, tokens.shape[-1], generator=torch.Generator().manual_seed(1))
    args = dict(query=q, budget=5, grid=(4, 4), num_prefix_tokens=1, host=host)
    ref = create_allocator("arr_coc_host").eval()(tokens, **args)
    ours = create_allocator("arr_coc_host_trained", learned_weight=0.0).eval()(tokens, **args)
    assert torch.equal(ref.indices, ours.indices)
    torch.testing.assert_close(ref.gain, ours.gain)


def test_learned_term_is_the_positive_pmi_added_to_the_prior():
    host, tokens, _, _ = _llm_host()
    q = torch.randn(2, 3, tokens.shape[-1], generator=torch.Generator().manual_seed(1))
    args = dict(query=q, budget=5, grid=(4, 4), num_prefix_tokens=1, host=host)
    base = create_allocator("arr_coc_host").eval()(tokens, **args)
    alloc = create_allocator("arr_coc_host_trained", learned_weight=2.0).eval()
    out = alloc(tokens, **args)
    pmi = out.extras["pmi"]
    assert pmi.shape == (2, 16)
    want = base.extras["prior_information"] + 2.0 * pmi.clamp_min(0)
    torch.testing.assert_close(out.extras["prior_information"], want)
    # pmi is log(M p(j | q)): its exp sums to M over the candidates
    torch.testing.assert_close(pmi.exp().sum(1), torch.full((2,), 16.0), rtol=1e-5, atol=1e-5)


def test_training_gives_the_scorer_gradients_and_the_distillation_kl():
    host, tokens, att, qmask = _llm_host()
    q = torch.randn(2, 3, tokens.shape[-1], generator=torch.Generator().manual_seed(1))
    alloc = create_allocator("arr_coc_host_trained", prior=None, distill=True).train()
    out = alloc(tokens, query=q, budget=4, grid=(4, 4), num_prefix_tokens=1, host=host)
    kl = out.extras["losses"]["distill"]
    # the teacher: layer attention, heads averaged, over the real question tokens, renormalised
    a = att.mean(1)[:, :, 1:]
    p = torch.stack([a[0, :3].mean(0), a[1, :2].mean(0)])
    p = p / p.sum(1, keepdim=True)
    logq = out.extras["relevance_logits"].log_softmax(1)
    torch.testing.assert_close(kl, (p * (p.log() - logq)).sum(1))
    assert bool((kl >= 0).all())
    # the kept tokens are the candidates (value 1 straight-through) and carry the scorer's gradient
    sel = tokens[:, 1:].gather(1, out.indices[..., None].expand(-1, -1, tokens.shape[-1]))
    torch.testing.assert_close(out.tokens.detach(), sel)
    (out.tokens.sum() + kl.sum()).backward()
    grads = [p.grad for p in alloc.scorer.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_relational_term_is_conditioned_on_the_anchor_and_both_scorers_learn():
    host, tokens, _, _ = _llm_host()
    q = torch.randn(2, 3, tokens.shape[-1], generator=torch.Generator().manual_seed(1))
    args = dict(query=q, budget=4, grid=(4, 4), num_prefix_tokens=1, host=host)
    torch.manual_seed(0)
    alloc = create_allocator("arr_coc_host_trained", relational=True).train()
    out = alloc(tokens, **args)
    pmi, pmi2, anchor = out.extras["pmi"], out.extras["pmi_relation"], out.extras["anchor"]
    # the anchor is the first scorer's best fine token; the relevance logits stack both scorers
    assert torch.equal(anchor, pmi[:, :16].argmax(1))
    rel = out.extras["relevance_logits"]
    assert rel.shape == (2, 2, 16)
    torch.testing.assert_close(rel[:, 0], pmi[:, :16])
    torch.testing.assert_close(rel[:, 1], pmi2[:, :16])
    # the learned term of the gain is the sum of both positive pmis
    torch.testing.assert_close(out.extras["prior_information"] - create_allocator("arr_coc_host")(tokens, **args).extras["prior_information"],
                               pmi.detach().clamp_min(0) + pmi2.detach().clamp_min(0))
    # the second scorer reads the anchor: pointing the anchor at another token changes its pmi
    from types import SimpleNamespace

    ctx = SimpleNamespace(candidates=tokens[:, 1:], num_fine=16, query=q, query_mask=None)
    first, at_first, rate = alloc._relation_pmi(ctx, torch.eye(16)[[0, 0]])
    other, at_other, _ = alloc._relation_pmi(ctx, torch.eye(16)[[7, 7]])
    assert rate is None
    assert at_first.tolist() == [0, 0] and at_other.tolist() == [7, 7]
    assert not torch.allclose(first, other)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :3] = True
    loss = relevance_listwise_loss(rel, mask).sum()
    loss.backward()
    for module in (alloc.scorer, alloc.relation_scorer, alloc.relation):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), module


def test_candidate_centres_closed_form():
    from arr_coc.allocators.arr_coc_host_trained import candidate_centres
    from arr_coc.pyramid import pyramid_positions

    pos, sizes = pyramid_positions((4, 4), (1, 2))
    c = candidate_centres(pos)
    assert sizes == (16, 4, 1) and c.shape == (21, 2)
    torch.testing.assert_close(c[5], torch.tensor([1.0, 1.0]))  # fine cell (1, 1)
    torch.testing.assert_close(c[16 + 3], torch.tensor([2.5, 2.5]))  # level 1, block (2, 2)..(3, 3)
    torch.testing.assert_close(c[20], torch.tensor([1.5, 1.5]))  # level 2: the whole 4 x 4 grid
    with pytest.raises(ValueError, match="positions"):
        candidate_centres(pos[:, :2])


def test_relation_geometry_is_a_distance_kernel_around_the_anchor():
    from types import SimpleNamespace

    from arr_coc.pyramid import pyramid_positions

    host, tokens, _, _ = _llm_host()
    q = torch.randn(2, 3, tokens.shape[-1], generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    alloc = create_allocator("arr_coc_host_trained", relational=True, relation_geometry=True).train()
    args = dict(query=q, budget=4, grid=(4, 4), num_prefix_tokens=1, host=host)
    out = alloc(tokens, **args)  # materialises the lazy parts
    rate = out.extras["relation_rate"]
    assert rate.shape == (2,) and bool((rate > 0).all())
    # the rate is softplus(10 (w . q_bar + b + g0)), g0 = -0.2: the closed form from the parameters
    from arr_coc.allocators.arr_coc_host_trained import RATE_SCALE

    pre = RATE_SCALE * (alloc.relation_rate(q.mean(1))[:, 0] + alloc.relation_rate_offset)
    torch.testing.assert_close(rate, torch.nn.functional.softplus(pre))
    assert float(alloc.relation_rate_offset.detach()) == pytest.approx(-0.2)
    ctx = SimpleNamespace(candidates=tokens[:, 1:], num_fine=16, query=q, query_mask=None,
                          pyramid=SimpleNamespace(positions=pyramid_positions((4, 4), ())[0]))
    anchor_at = torch.eye(16)[[5, 10]]  # anchors at cells (1, 1) and (2, 2)
    pmi2, anchor, rate = alloc._relation_pmi(ctx, anchor_at)
    assert anchor.tolist() == [5, 10]
    # closed form: log(M softmax(content - rate * distance)), content the relation scorer's own pmi
    q_bar = q.mean(1)
    z = alloc.relation(torch.cat([q_bar, tokens[:, 1:][torch.arange(2), anchor]], -1))
    content = alloc.relation_scorer(tokens[:, 1:], z[:, None], None).pmi
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    cells = torch.stack([rows.flatten(), cols.flatten()], -1)
    dist = torch.stack([(cells - cells[5]).norm(dim=-1), (cells - cells[10]).norm(dim=-1)])
    want = (content - rate[:, None] * dist).log_softmax(-1) + math.log(16)
    torch.testing.assert_close(pmi2, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pmi2.exp().sum(1), torch.full((2,), 16.0), rtol=1e-5, atol=1e-4)
    # a steep kernel ranks the candidates by distance to the anchor: the anchor first, then its 4 neighbours
    with torch.no_grad():
        alloc.relation_rate_offset.fill_(6.0)
    steep, _, rate = alloc._relation_pmi(ctx, anchor_at)
    assert bool((rate > 50).all())
    assert steep.argmax(1).tolist() == [5, 10]
    assert set(steep[0].topk(5).indices.tolist()) == {5, 1, 4, 6, 9}
    # the rate and the content both learn from the relevance loss
    with torch.no_grad():
        alloc.relation_rate_offset.fill_(-0.2)
    alloc.zero_grad()
    out = alloc(tokens, **args)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [0, 15]] = True
    relevance_listwise_loss(out.extras["relevance_logits"], mask).sum().backward()
    for module in (alloc.relation_rate, alloc.relation_scorer, alloc.relation):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), module
    assert alloc.relation_rate_offset.grad is not None and float(alloc.relation_rate_offset.grad.abs()) > 0


def test_relation_content_gate_bounds_the_content_and_lets_the_distance_rank():
    from types import SimpleNamespace

    from arr_coc.pyramid import pyramid_positions

    host, tokens, _, _ = _llm_host()
    q = torch.randn(2, 3, tokens.shape[-1], generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    alloc = create_allocator("arr_coc_host_trained", relational=True, relation_geometry=True,
                             relation_content="gate").train()
    alloc(tokens, query=q, budget=4, grid=(4, 4), num_prefix_tokens=1, host=host)  # materialise
    ctx = SimpleNamespace(candidates=tokens[:, 1:], num_fine=16, query=q, query_mask=None,
                          pyramid=SimpleNamespace(positions=pyramid_positions((4, 4), ())[0]))
    anchor_at = torch.eye(16)[[5, 10]]
    pmi2, anchor, rate = alloc._relation_pmi(ctx, anchor_at)
    # closed form: log(M softmax(log sigmoid(content) - rate * distance))
    z = alloc.relation(torch.cat([q.mean(1), tokens[:, 1:][torch.arange(2), anchor]], -1))
    content = alloc.relation_scorer(tokens[:, 1:], z[:, None], None).pmi
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    cells = torch.stack([rows.flatten(), cols.flatten()], -1)
    dist = torch.stack([(cells - cells[5]).norm(dim=-1), (cells - cells[10]).norm(dim=-1)])
    gate = torch.nn.functional.logsigmoid(content)
    want = (gate - rate[:, None] * dist).log_softmax(-1) + math.log(16)
    torch.testing.assert_close(pmi2, want, rtol=1e-5, atol=1e-5)
    # the gate never rewards content: log sigmoid <= 0, so two tokens at one distance differ by at
    # most what the lower one's gate takes away; with "logit" the same content can dominate
    assert bool((gate <= 0).all())
    # tokens the content rates far above uniform (pmi 3 .. 9: "objects") vs the rest (pmi -9):
    # a kernel of 1 nat per cell then ranks the objects by distance alone, whatever their content
    objects = torch.tensor([0, 3, 6, 12, 15])  # distances from cell 5 (1, 1): 1.41, 2.24, 1, 2.24, 2.83
    fake = torch.full((1, 16), -9.0)
    fake[0, objects] = torch.tensor([3.0, 9.0, 3.0, 9.0, 9.0])  # the farther objects rated higher
    d5 = dist[:1]
    for mode, first in (("gate", 6), ("logit", 3)):
        c = torch.nn.functional.logsigmoid(fake) if mode == "gate" else fake
        ranked = (c - 1.0 * d5).argsort(1, descending=True)[0].tolist()
        ranked = [j for j in ranked if j in objects.tolist()]
        assert ranked[0] == first, mode
    gated = [j for j in (torch.nn.functional.logsigmoid(fake) - d5).argsort(1, descending=True)[0].tolist()
             if j in objects.tolist()]
    assert sorted(d5[0, gated].tolist()) == d5[0, gated].tolist()  # every object in order of distance


def test_anchor_query_reads_the_anchor_with_one_query_vector():
    host, tokens, _, _ = _llm_host()
    q = torch.randn(2, 3, tokens.shape[-1], generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    alloc = create_allocator("arr_coc_host_trained", relational=True, relation_geometry=True, anchor_query=True).train()
    out = alloc(tokens, query=q, budget=4, grid=(4, 4), num_prefix_tokens=1, host=host)
    pmi_a, anchor, pmi = out.extras["pmi_anchor"], out.extras["anchor"], out.extras["pmi"]
    # the anchor is the best fine token of the anchor reading, not of the first scorer
    assert torch.equal(anchor, pmi_a[:, :16].argmax(1))
    # the anchor reading: the relation scorer with the one query vector MLP_a(q_bar)
    z = alloc.anchor_map(q.mean(1))
    torch.testing.assert_close(pmi_a, alloc.relation_scorer(tokens[:, 1:], z[:, None], None).pmi)
    rel = out.extras["relevance_logits"]
    assert rel.shape == (2, 3, 16)
    torch.testing.assert_close(rel[:, 0], pmi[:, :16])
    torch.testing.assert_close(rel[:, 2], pmi_a[:, :16])
    # it reads the whole question: another question moves it
    other = alloc(tokens, query=q.flip(0), budget=4, grid=(4, 4), num_prefix_tokens=1, host=host).extras["pmi_anchor"]
    assert not torch.allclose(other, pmi_a)
    # the anchor reading learns from the relevance loss
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [2, 9]] = True
    relevance_listwise_loss(rel, mask).sum().backward()
    grads = [p.grad for p in alloc.anchor_map.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_relation_others_excludes_the_anchor_from_the_relations_target():
    host, tokens, _, _ = _llm_host()
    q = torch.randn(2, 3, tokens.shape[-1], generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    alloc = create_allocator("arr_coc_host_trained", relational=True, relation_geometry=True, anchor_query=True,
                             relation_others=True).train()
    out = alloc(tokens, query=q, budget=4, grid=(4, 4), num_prefix_tokens=1, host=host)
    exclude, anchor, rel = out.extras["relevance_exclude"], out.extras["anchor"], out.extras["relevance_logits"]
    assert exclude.shape == rel.shape == (2, 3, 16)
    # exactly the anchor, and only in the relation's row
    assert exclude.sum().item() == 2 and bool(exclude[torch.arange(2), 1, anchor].all())
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[torch.arange(2), anchor] = True
    mask[:, 15] = True  # one other relevant cell (row 0's anchor is not 15 at this seed)
    assert 15 not in anchor.tolist()
    loss = relevance_listwise_loss(rel, mask, exclude=exclude)
    # the relation's term is its loss on the other cell alone; the two other readings see both cells
    others = mask.clone()
    others[torch.arange(2), anchor] = False
    want = (relevance_listwise_loss(rel[:, 0], mask) + relevance_listwise_loss(rel[:, 1], others)
            + relevance_listwise_loss(rel[:, 2], mask)) / 3
    torch.testing.assert_close(loss, want)
    # a question about the anchor alone gives the relation no supervision (0, not -log 0)
    alone = relevance_listwise_loss(rel, mask & ~others, exclude=exclude)
    assert torch.isfinite(alone).all()
    torch.testing.assert_close(alone, (relevance_listwise_loss(rel[:, 0], mask & ~others) + relevance_listwise_loss(rel[:, 2], mask & ~others)) / 3)
    with pytest.raises(ValueError, match="exclude"):
        relevance_listwise_loss(rel, mask, exclude=exclude[:, 0])
    # exclude_fallback: a row left with no relevant cell keeps its whole mask (the anchor)
    fb = relevance_listwise_loss(rel, mask & ~others, exclude=exclude, exclude_fallback=True)
    torch.testing.assert_close(fb, relevance_listwise_loss(rel, mask & ~others))
    torch.testing.assert_close(relevance_listwise_loss(rel, mask, exclude=exclude, exclude_fallback=True), loss)
    alloc_fb = create_allocator("arr_coc_host_trained", relational=True, relation_others="or_anchor").train()
    assert alloc_fb(tokens, query=q, budget=4, grid=(4, 4), num_prefix_tokens=1, host=host).extras["relevance_exclude_fallback"] is True
    assert out.extras["relevance_exclude_fallback"] is False


def test_distillation_needs_training_and_a_host():
    _, tokens, _, _ = _llm_host()
    alloc = create_allocator("arr_coc_host_trained", prior=None, distill=True)
    assert "losses" not in alloc.train()(tokens, budget=4, grid=(4, 4), num_prefix_tokens=1).extras
    host, tokens, _, _ = _llm_host()
    assert "losses" not in alloc.eval()(tokens, budget=4, grid=(4, 4), num_prefix_tokens=1, host=host).extras


def test_rate_hidden_reads_the_rate_with_an_mlp_that_starts_at_g0():
    from arr_coc.allocators.arr_coc_host_trained import RATE_SCALE

    host, tokens, _, _ = _llm_host()
    q = torch.randn(2, 3, tokens.shape[-1], generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    alloc = create_allocator("arr_coc_host_trained", relational=True, relation_geometry=True, rate_hidden=8).train()
    out = alloc(tokens, query=q, budget=4, grid=(4, 4), num_prefix_tokens=1, host=host)
    rate = out.extras["relation_rate"]
    # the last layer is zero at init: every question starts at softplus(-2) nats per cell
    torch.testing.assert_close(rate, torch.full((2,), math.log1p(math.exp(-2.0))))
    assert isinstance(alloc.relation_rate, torch.nn.Sequential) and alloc.relation_rate[0].out_features == 8
    # closed form once the MLP is moved: softplus(10 (MLP(q_bar) + g0 / 10))
    with torch.no_grad():
        alloc.relation_rate[2].weight.normal_()
    rate = alloc(tokens, query=q, budget=4, grid=(4, 4), num_prefix_tokens=1, host=host).extras["relation_rate"]
    want = torch.nn.functional.softplus(RATE_SCALE * (alloc.relation_rate(q.mean(1))[:, 0] + alloc.relation_rate_offset))
    torch.testing.assert_close(rate, want)
    assert not torch.allclose(rate[0], rate[1])  # per question
    # both of the MLP's layers learn from the relevance loss
    alloc.zero_grad()
    out = alloc(tokens, query=q, budget=4, grid=(4, 4), num_prefix_tokens=1, host=host)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [0, 15]] = True
    relevance_listwise_loss(out.extras["relevance_logits"], mask).sum().backward()
    for layer in (alloc.relation_rate[0], alloc.relation_rate[2]):
        assert layer.weight.grad is not None and float(layer.weight.grad.abs().sum()) > 0


def test_relation_mixture_is_one_question_weighted_distribution_in_the_gain():
    from arr_coc.allocators.arr_coc_host_trained import _mixture_pmi

    host, tokens, _, _ = _llm_host()
    q = torch.randn(2, 3, tokens.shape[-1], generator=torch.Generator().manual_seed(1))
    args = dict(query=q, budget=5, grid=(4, 4), num_prefix_tokens=1, host=host)
    base = create_allocator("arr_coc_host").eval()(tokens, **args)
    torch.manual_seed(0)
    alloc = create_allocator("arr_coc_host_trained", relational=True, relation_geometry=True, anchor_query=True,
                             relation_mixture=True, learned_weight=2.0).train()
    out = alloc(tokens, **args)
    pmi, pmi2, lam = out.extras["pmi"], out.extras["pmi_relation"], out.extras["relation_mix"]
    torch.testing.assert_close(lam, torch.full((2,), 0.5))  # the gate starts at one half
    # closed form: log(M ((1 - lam) p1 + lam p2)) over the M candidates; a distribution (exp sums to M)
    mix = torch.log(16 * ((1 - lam[:, None]) * pmi.softmax(-1) + lam[:, None] * pmi2.softmax(-1)))
    rel = out.extras["relevance_logits"]
    assert rel.shape == (2, 4, 16)
    torch.testing.assert_close(rel[:, 3], mix, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rel[:, 3].exp().sum(1), torch.full((2,), 16.0), rtol=1e-5, atol=1e-4)
    # the gain carries learned_weight * max(0, pmi_mix) alone (not the sum of the two pmi)
    want = base.extras["prior_information"] + 2.0 * mix.clamp_min(0)
    torch.testing.assert_close(out.extras["prior_information"], want, rtol=1e-5, atol=1e-5)
    # the weight's limits are the two readings
    torch.testing.assert_close(_mixture_pmi(pmi, pmi2, torch.full((2,), -40.0)), pmi, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_mixture_pmi(pmi, pmi2, torch.full((2,), 40.0)), pmi2, rtol=1e-5, atol=1e-5)
    # with gain_readings [anchor, relation] it mixes the anchor reading and the relation instead
    other = create_allocator("arr_coc_host_trained", relational=True, relation_geometry=True, anchor_query=True,
                             relation_mixture=True, learned_weight=2.0, gain_readings=["anchor", "relation"]).train()
    other.load_state_dict(alloc.state_dict())
    got = other(tokens, **args)
    pmi_a = got.extras["pmi_anchor"]
    mix_a = torch.log(16 * (0.5 * pmi_a.softmax(-1) + 0.5 * got.extras["pmi_relation"].softmax(-1)))
    torch.testing.assert_close(got.extras["relevance_logits"][:, 3], mix_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.extras["prior_information"], base.extras["prior_information"] + 2.0 * mix_a.clamp_min(0),
                               rtol=1e-5, atol=1e-5)
    # the gate learns from the relevance loss through the mixture's reading
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [2, 9]] = True
    relevance_listwise_loss(rel, mask).sum().backward()
    assert alloc.mixture_gate[2].weight.grad is not None and float(alloc.mixture_gate[2].weight.grad.abs().sum()) > 0
    # without a question the learned term is 0, as the two readings' are
    empty = alloc.eval()(tokens, budget=5, grid=(4, 4), num_prefix_tokens=1, host=host).extras["relevance_logits"]
    torch.testing.assert_close(empty[:, 3], torch.zeros(2, 16))
    # without anchor_query the mixture is the third reading
    plain = create_allocator("arr_coc_host_trained", relational=True, relation_mixture=True).train()(tokens, **args)
    assert plain.extras["relevance_logits"].shape == (2, 3, 16)
    # a relational allocator trained with questions selects for a call without one (uniform readings)
    blank = create_allocator("arr_coc_host_trained", relational=True, relation_geometry=True, anchor_query=True)
    blank.train()(tokens, **args)
    no_q = blank.eval()(tokens, budget=5, grid=(4, 4), num_prefix_tokens=1, host=host)
    assert no_q.indices.shape == (2, 5) and float(no_q.extras["relevance_logits"][:, 1:].abs().sum()) == 0


def test_background_fill_keeps_the_evidence_then_the_least_salient_cells():
    from arr_coc.allocators.arr_coc_host_trained import background_fill
    from arr_coc.pyramid import pyramid_positions

    # one-dimensional tokens on a 2 x 3 grid: salience |x - mean| = 2.58, 7.42, 1.58, 3.58, 2.42, 2.08
    fine = torch.tensor([[0.0, 10.0, 1.0, -1.0, 5.0, 0.5]])[..., None]
    pos = pyramid_positions((2, 3), ())[0]
    evidence = torch.tensor([[False, False, False, False, True, False]])
    idx, n_ev = background_fill(torch.tensor([[1, 4, 0]]), evidence, fine, pos, (2, 3))
    assert idx.tolist() == [[4, 2, 5]] and n_ev.tolist() == [1]  # the evidence, then the two least salient
    # every pick evidence: unchanged; padding stays padding
    both = torch.tensor([[False, True, False, False, True, False]])
    assert background_fill(torch.tensor([[1, 4, -1]]), both, fine, pos, (2, 3))[0].tolist() == [[1, 4, -1]]
    # no evidence: the K least salient cells
    none = torch.zeros(1, 6, dtype=torch.bool)
    assert background_fill(torch.tensor([[1, 4, 0]]), none, fine, pos, (2, 3))[0].tolist() == [[2, 5, 4]]
    # a pooled evidence pick covers its cells: they are not filled; nothing left to fill is padding
    pos2 = pyramid_positions((2, 2), (1,))[0]  # 4 fine cells + one 2x2 token (index 4) covering them
    fine2 = torch.tensor([[1.0, 2.0, 3.0, 4.0]])[..., None]
    ev2 = torch.tensor([[False, False, False, False, True]])
    assert background_fill(torch.tensor([[4, 0, 1]]), ev2, fine2, pos2, (2, 2))[0].tolist() == [[4, -1, -1]]
    with pytest.raises(ValueError, match="indices/evidence"):
        background_fill(torch.tensor([1, 4]), evidence, fine, pos, (2, 3))


def test_background_fill_in_the_allocator():
    host, tokens, _, _ = _llm_host()
    q = torch.randn(2, 3, tokens.shape[-1], generator=torch.Generator().manual_seed(1))
    args = dict(query=q, budget=5, grid=(4, 4), num_prefix_tokens=1, host=host)
    torch.manual_seed(0)
    greedy = create_allocator("arr_coc_host_trained", relational=True, learned_weight=2.0).eval()
    ref = greedy(tokens, **args)
    extra = ref.extras["prior_information"] - create_allocator("arr_coc_host").eval()(tokens, **args).extras["prior_information"]
    for threshold in (0.0, 1.0, 1e6):
        bg = create_allocator("arr_coc_host_trained", relational=True, learned_weight=2.0, fill="background",
                              evidence_threshold=threshold).eval()
        bg.load_state_dict(greedy.state_dict())
        out = bg(tokens, **args)
        picks = ref.extras["pick_order"]
        is_ev = extra.gather(1, picks) > threshold
        assert out.extras["evidence"].tolist() == is_ev.sum(1).tolist()
        assert out.gain is None
        for b in range(2):  # the greedy's evidence picks are kept; every kept token is distinct
            kept = set(out.indices[b].tolist())
            assert set(picks[b][is_ev[b]].tolist()) <= kept and len(kept) == 5
    # with no evidence the kept set is the 5 least salient fine tokens
    x = tokens[:, 1:]
    sal = (x - x.mean(1, keepdim=True)).norm(dim=-1)
    assert [set(r) for r in out.indices.tolist()] == [set(r) for r in sal.topk(5, 1, largest=False).indices.tolist()]


def test_mixture_part_evidence_closed_form():
    from arr_coc.allocators.arr_coc_host_trained import _mixture_part_evidence

    m = 8
    pa = torch.tensor([[0.65] + [0.05] * 7])  # the anchor reading: cell 0
    pr = torch.tensor([[0.25, 0.3, 0.25] + [0.04] * 5])  # the relation: cell 1, then the anchor and cell 2
    pmi_a, pmi_r = torch.log(pa * m), torch.log(pr * m)
    gate = torch.tensor([0.0])  # lam = 1/2
    ev = _mixture_part_evidence(pmi_a, pmi_r, gate, torch.tensor([0]))
    # the anchor reading's part everywhere, the relation's at its best cell other than the anchor (1)
    want = torch.log(m * 0.5 * pa)
    want[0, 1] = math.log(m * 0.5 * 0.3)
    torch.testing.assert_close(ev, want)
    # the relation's second cell other than the anchor (2) gets only the anchor reading's part, although
    # the whole mixture rates it above a 0-nat threshold (log(8 (0.025 + 0.125)) = 0.18)
    assert float(ev[0, 2]) < 0 < math.log(m * (0.5 * 0.05 + 0.5 * 0.25))
    # the relation given first: its weight is then 1 - lam
    g = torch.tensor([2.0])
    lam = float(torch.sigmoid(g))
    got = _mixture_part_evidence(pmi_r, pmi_a, g, torch.tensor([0]), relation_second=False)
    want = torch.log(m * lam * pa)
    want[0, 1] = max(float(want[0, 1]), math.log(m * (1 - lam) * 0.3))
    torch.testing.assert_close(got, want)


def test_relation_evidence_top_keeps_the_parts_evidence_then_the_background():
    from arr_coc.allocators.arr_coc_host_trained import _mixture_part_evidence

    host, tokens, _, _ = _llm_host()
    q = torch.randn(2, 3, tokens.shape[-1], generator=torch.Generator().manual_seed(1))
    args = dict(query=q, budget=5, grid=(4, 4), num_prefix_tokens=1, host=host)
    kw = dict(relational=True, relation_geometry=True, anchor_query=True, relation_mixture=True,
              gain_readings=["anchor", "relation"], learned_weight=2.0)
    torch.manual_seed(0)
    greedy = create_allocator("arr_coc_host_trained", **kw).eval()
    greedy(tokens, **args)  # materialise the lazy layers
    with torch.no_grad():  # a question-dependent weight away from 1/2
        greedy.mixture_gate[2].weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    ref = greedy(tokens, **args)
    pmi_a, pmi_r, lam, anchor = (ref.extras[k] for k in ("pmi_anchor", "pmi_relation", "relation_mix", "anchor"))
    evidence = 2.0 * _mixture_part_evidence(pmi_a, pmi_r, torch.logit(lam.double()).float(), anchor)
    picks = ref.extras["pick_order"]
    for threshold in (0.0, 0.5, 1e6):
        top = create_allocator("arr_coc_host_trained", fill="background", evidence_threshold=threshold,
                               relation_evidence="top", **kw).eval()
        top.load_state_dict(greedy.state_dict())
        out = top(tokens, **args)
        is_ev = evidence.gather(1, picks) > threshold
        assert out.extras["evidence"].tolist() == is_ev.sum(1).tolist()
        for b in range(2):
            kept = set(out.indices[b].tolist())
            assert set(picks[b][is_ev[b]].tolist()) <= kept and len(kept) == 5
    # the mixture's pmi is at least either part's, so its evidence holds the parts' evidence
    mix = 2.0 * ref.extras["relevance_logits"][:, 3]  # [B, N] the mixture's pmi over the fine tokens
    assert (mix >= evidence[:, :16] - 1e-4).all()
    ev_top = evidence.gather(1, picks) > 0.5
    assert (ev_top <= (mix.gather(1, picks) > 0.5)).all()
    assert int(ev_top.sum()) < int((mix.gather(1, picks) > 0.5).sum())  # and here strictly fewer picks
    # top_budget_fraction: a row whose budget is above the fraction of the N = 16 fine tokens reads the mixture
    whole = create_allocator("arr_coc_host_trained", fill="background", evidence_threshold=0.5, **kw).eval()
    parts = create_allocator("arr_coc_host_trained", fill="background", evidence_threshold=0.5, relation_evidence="top", **kw).eval()
    loose = create_allocator("arr_coc_host_trained", fill="background", evidence_threshold=0.5, relation_evidence="top",
                             top_budget_fraction=0.25, **kw).eval()  # 5 > 0.25 * 16
    for a in (whole, parts, loose):
        a.load_state_dict(greedy.state_dict())
    got_whole, got_parts, got_loose = (a(tokens, **args) for a in (whole, parts, loose))
    assert torch.equal(got_loose.indices, got_whole.indices) and not torch.equal(got_parts.indices, got_whole.indices)
    # per row: budgets [4, 5] with the fraction 1/4 -> the first row reads the parts, the second the mixture
    per_row = {**args, "budget": torch.tensor([4, 5])}
    got = loose(tokens, **per_row)
    assert torch.equal(got.extras["evidence"][:1], parts(tokens, **{**args, "budget": 4}).extras["evidence"][:1])
    assert torch.equal(got.extras["evidence"][1:], whole(tokens, **args).extras["evidence"][1:])


def test_gain_readings_choose_the_learned_terms_in_the_gain():
    host, tokens, _, _ = _llm_host()
    q = torch.randn(2, 3, tokens.shape[-1], generator=torch.Generator().manual_seed(1))
    args = dict(query=q, budget=5, grid=(4, 4), num_prefix_tokens=1, host=host)
    base = create_allocator("arr_coc_host").eval()(tokens, **args).extras["prior_information"]
    kw = dict(relational=True, relation_geometry=True, anchor_query=True, learned_weight=2.0)
    torch.manual_seed(0)
    default = create_allocator("arr_coc_host_trained", **kw).train()
    out = default(tokens, **args)
    pmi, pmi2, pmi_a = (out.extras[k] for k in ("pmi", "pmi_relation", "pmi_anchor"))
    torch.testing.assert_close(out.extras["prior_information"], base + 2.0 * (pmi.clamp_min(0) + pmi2.clamp_min(0)))
    for readings, terms in ((["anchor", "relation"], (pmi_a, pmi2)), (["first", "relation", "anchor"], (pmi, pmi2, pmi_a)),
                            (["anchor"], (pmi_a,))):
        alloc = create_allocator("arr_coc_host_trained", gain_readings=readings, **kw).train()
        alloc.load_state_dict(default.state_dict())
        got = alloc(tokens, **args).extras["prior_information"]
        torch.testing.assert_close(got, base + 2.0 * sum(t.clamp_min(0) for t in terms))
    # gain_combine="max": the largest positive pmi of the chosen readings, not their sum
    alloc = create_allocator("arr_coc_host_trained", gain_readings=["anchor", "relation"], gain_combine="max", **kw).train()
    alloc.load_state_dict(default.state_dict())
    got = alloc(tokens, **args).extras["prior_information"]
    torch.testing.assert_close(got, base + 2.0 * torch.maximum(pmi_a.clamp_min(0), pmi2.clamp_min(0)))


@pytest.mark.parametrize(
    "kwargs, name",
    [({"gain_readings": ["relation"]}, "gain_readings"), ({"relational": True, "gain_readings": ["anchor"]}, "gain_readings"),
     ({"gain_readings": []}, "gain_readings"), ({"gain_readings": ["first", "first"]}, "gain_readings"),
     ({"relational": True, "relation_mixture": True, "gain_readings": ["first"]}, "gain_readings"),
     ({"relational": True, "anchor_query": True, "relation_mixture": True, "gain_readings": ["first", "anchor"]}, "gain_readings"),
     ({"fill": "random"}, "fill"), ({"evidence_threshold": -1.0}, "evidence_threshold"),
     ({"fill": "background", "learned_weight": 0.0}, "fill"),
     ({"rate_hidden": 8}, "rate_hidden"), ({"relational": True, "relation_geometry": True, "rate_hidden": 0}, "rate_hidden"),
     ({"relational": True, "relation_geometry": True, "rate_hidden": True}, "rate_hidden"),
     ({"relation_mixture": True}, "relation_mixture"), ({"relational": True, "relation_mixture": 1}, "relation_mixture"),
     ({"learned_weight": -1.0}, "learned_weight"), ({"distill": 1}, "distill"), ({"st_temperature": 0.0}, "st_temperature"),
     ({"relational": 1}, "relational"), ({"relational": True, "relation_hidden": 0}, "relation_hidden"),
     ({"relation_geometry": True}, "relation_geometry"), ({"anchor_query": True}, "anchor_query"),
     ({"relational": True, "anchor_query": "yes"}, "anchor_query"), ({"relation_others": True}, "relation_others"),
     ({"relational": True, "relation_others": "yes"}, "relation_others"), ({"relational": True, "relation_geometry": 1}, "relation_geometry"),
     ({"relational": True, "relation_content": "gate"}, "relation_content"),
     ({"gain_combine": "mean"}, "gain_combine"), ({"relational": True, "relation_mixture": True, "gain_combine": "max"}, "gain_combine"),
     ({"relational": True, "relation_geometry": True, "relation_content": "sigmoid"}, "relation_content"),
     ({"relation_evidence": "parts"}, "relation_evidence"),
     ({"relational": True, "fill": "background", "relation_evidence": "top"}, "relation_evidence"),
     ({"relational": True, "relation_mixture": True, "relation_evidence": "top"}, "relation_evidence"),
     ({"top_budget_fraction": 0.5}, "top_budget_fraction"),
     ({"relational": True, "relation_mixture": True, "fill": "background", "relation_evidence": "top",
       "top_budget_fraction": 0.0}, "top_budget_fraction"),
     ({"relational": True, "relation_mixture": True, "fill": "background", "relation_evidence": "top",
       "top_budget_fraction": 1.5}, "top_budget_fraction")],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        create_allocator("arr_coc_host_trained", **kwargs)


def _layer_state(b=2, kc=6, tt=3, d=8, seed=0):
    from arr_coc.allocators.host import LLMLayerState

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, kc + tt, d, generator=g)
    att = torch.rand(b, 2, kc + tt, kc + tt, generator=g)
    vm = torch.ones(b, kc, dtype=torch.bool)
    vm[1, -1] = False
    return LLMLayerState(
        layer=0, num_layers=2, hidden=hidden, attention=att, visual_mask=vm,
        text_mask=torch.ones(b, tt, dtype=torch.bool), inputs_embeds=hidden, budget=torch.tensor([3, 3]),
        origin=torch.arange(kc).expand(b, kc), stage=0, memory={},
    )


def test_in_llm_variant_adds_the_hidden_state_pmi_and_reports_it():
    from arr_coc.allocators.arr_coc_host_trained import ArrCocHostLLMTrainedAllocator

    state = _layer_state()
    ref = create_allocator("arr_coc_host_llm").prune(state)
    zero = create_allocator("arr_coc_host_llm_trained", learned_weight=0.0)
    assert isinstance(zero, ArrCocHostLLMTrainedAllocator) and zero.in_llm
    dec0 = zero.prune(state)
    assert torch.equal(dec0.keep, ref.keep)
    alloc = create_allocator("arr_coc_host_llm_trained", learned_weight=3.0)
    dec = alloc.prune(state)
    pmi = dec.extras["relevance_logits"]
    assert pmi.shape == (2, 6) and pmi[1, -1].item() < -1e3  # the padded slot is never relevant
    want = ref.extras["prior_information"] + 3.0 * pmi.clamp_min(0) * state.visual_mask
    torch.testing.assert_close(dec.extras["prior_information"], want)
    assert not bool((dec.keep[1] == 5).any())
