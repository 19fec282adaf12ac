"""The ``arr_coc`` and ``arr_coc_adapter`` allocators behind the plug-in contract."""

import pytest
import torch

from arr_coc.allocators import create_allocator, list_allocators
from arr_coc.attending import greedy_conditional_mi
from arr_coc.balancing import IBLoss

NAMES = ["arr_coc", "arr_coc_adapter"]


def test_registered_and_build_with_defaults():
    assert set(NAMES) <= set(list_allocators())
    a = create_allocator("arr_coc")
    assert a.fixed_budget and a.pyramid_levels == (1, 2)
    assert not create_allocator("arr_coc", alpha=0.5, price=0.1).fixed_budget
    assert not create_allocator("arr_coc", alpha=None, price=None).fixed_budget  # learned price
    assert create_allocator("arr_coc_adapter").fixed_budget
    for name in NAMES:
        alloc = create_allocator(name)
        assert hasattr(alloc, "scorer") and hasattr(alloc, "balancer")
    assert hasattr(create_allocator("arr_coc_adapter"), "adapter")
    with pytest.raises(ValueError, match="levels"):
        create_allocator("arr_coc", levels=(0,))
    with pytest.raises(ValueError, match="kernel"):
        create_allocator("arr_coc", kernel="poly")


@pytest.mark.parametrize("name", NAMES)
def test_token_equal_to_the_query_is_kept(name):
    torch.manual_seed(0)
    b, h, w, d, p = 3, 6, 6, 32, 1
    tokens = torch.randn(b, p + h * w, d)
    target = torch.tensor([0, 17, 35])
    query = tokens[torch.arange(b), p + target][:, None].clone()
    alloc = create_allocator(name, levels=()).eval()
    out = alloc(tokens, query=query, budget=4, grid=(h, w), num_prefix_tokens=p)
    for i in range(b):
        assert target[i].item() in out.indices[i].tolist()
    if name == "arr_coc":
        assert torch.equal(out.extras["pick_order"][:, 0], target)


def test_gain_is_the_chain_rule_total_and_no_query_is_coverage():
    torch.manual_seed(1)
    tokens = torch.randn(2, 16, 8)
    query = torch.randn(2, 3, 8)
    alloc = create_allocator("arr_coc").eval()
    out = alloc(tokens, query=query, budget=5, grid=(4, 4))
    torch.testing.assert_close(out.gain, out.extras["query_gains"].sum(1))
    assert (out.gain > 0).all()
    # no query / all padding: alpha 0, no query information, same choice
    none = alloc(tokens, budget=5, grid=(4, 4))
    pad = alloc(tokens, query=query, query_mask=torch.zeros(2, 3, dtype=torch.bool), budget=5, grid=(4, 4))
    assert torch.all(none.extras["alpha"] == 0) and torch.all(none.gain == 0)
    assert torch.equal(none.indices, pad.indices) and torch.all(pad.gain == 0)
    # coverage equals the plain greedy at alpha 0 on the pyramid
    from arr_coc.pyramid import build_pyramid

    cands = build_pyramid(tokens, (4, 4), (1, 2)).candidates
    ref = greedy_conditional_mi(cands, None, None, 5, alpha=0.0)
    assert torch.equal(none.extras["pick_order"], ref.indices)


def test_level_of_detail_a_flat_region_gets_one_coarse_token():
    """Four 4x4 blocks, each a single repeated token: the 4x4 pooled token equals its 16 children,
    so one pick per block covers it and nothing else from that block is taken while others remain."""
    torch.manual_seed(2)
    d = 16
    block_tokens = torch.randn(4, d)
    grid = torch.zeros(8, 8, d)
    for bi in range(2):
        for bj in range(2):
            grid[bi * 4 : (bi + 1) * 4, bj * 4 : (bj + 1) * 4] = block_tokens[bi * 2 + bj]
    tokens = grid.reshape(1, 64, d)
    alloc = create_allocator("arr_coc", alpha=0.0).eval()
    out = alloc(tokens, budget=4, grid=(8, 8))
    pos = out.positions[0]
    blocks = {(int(r) // 4, int(c) // 4) for r, c, _ in pos.tolist()}
    assert len(blocks) == 4  # one token per block
    assert (out.extras["step_gains"][0] > 0).all()


def test_adaptive_budget_easy_query_spends_less():
    torch.manual_seed(3)
    d = 64
    basis = torch.linalg.qr(torch.randn(d, d))[0].T[:36]  # 36 orthonormal tokens on a 6 x 6 grid
    tokens = basis.expand(2, 36, d).clone()
    query = torch.stack([basis[4], basis[:10].sum(0)])[:, None]
    alloc = create_allocator("arr_coc", alpha=1.0, price=0.02, levels=()).eval()
    out = alloc(tokens, query=query, budget=20, grid=(6, 6))
    assert not alloc.fixed_budget
    counts = out.mask.sum(1)
    assert counts[0] == 1 and counts[0] < counts[1] <= 20
    assert set(out.indices[1][out.mask[1]].tolist()) == set(range(10))


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_scorer_and_adapter_in_training_mode(name):
    torch.manual_seed(4)
    tokens = torch.randn(2, 1 + 16, 8)
    query = torch.randn(2, 3, 6)  # the query lives in another space: the scorer projects it
    alloc = create_allocator(name, alpha=0.8).train()
    out = alloc(tokens, query=query, budget=torch.tensor([5, 3]), grid=(4, 4), num_prefix_tokens=1)
    head = torch.randn(8)
    task = (out.tokens @ head).pow(2).mean()  # a downstream loss on the kept tokens
    ib = IBLoss(beta=0.01, rate="kl", prior=0.2)(task, out.extras["keep_prob"])
    loss = ib["loss"] - 0.1 * out.gain.mean()
    loss.backward()
    scorer_grads = {n: p.grad for n, p in alloc.scorer.named_parameters()}
    assert scorer_grads["query_map.weight"].abs().sum() > 0
    assert scorer_grads["candidate_map.up"].abs().sum() > 0
    if name == "arr_coc":
        assert scorer_grads["log_temperature"].abs().sum() > 0  # through pmi -> keep_prob
    else:
        grads = [p.grad for p in alloc.adapter.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
        # an adapter that reads pmi (use_pmi; the one-pass design) reads it through its residual,
        # zero at init: after one step pmi matters too. The shortlist design does not compute pmi.
        opt = torch.optim.SGD(alloc.parameters(), lr=0.1)
        opt.step()
        opt.zero_grad()
        out = alloc(tokens, query=query, budget=torch.tensor([5, 3]), grid=(4, 4), num_prefix_tokens=1)
        ((out.tokens @ head).pow(2).mean()).backward()
        grad = alloc.scorer.log_temperature.grad
        if alloc.use_pmi:
            assert grad.abs().sum() > 0
        else:
            assert grad is None or grad.abs().sum() == 0
    # forward values are unchanged by the straight-through factor
    alloc.eval()
    with torch.no_grad():
        ev = alloc(tokens, query=query, budget=torch.tensor([5, 3]), grid=(4, 4), num_prefix_tokens=1)
    if name == "arr_coc":
        assert torch.equal(ev.indices, out.indices)
        torch.testing.assert_close(ev.tokens, out.tokens.detach())


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_errors(name):
    alloc = create_allocator(name).eval()
    tok = torch.randn(2, 17, 8)
    with pytest.raises(ValueError, match="patch_tokens"):
        alloc(tok[0], budget=3, grid=(4, 4), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="grid"):
        alloc(tok, budget=3, grid=(3, 5), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="budget"):
        alloc(tok, budget=-1, grid=(4, 4), num_prefix_tokens=1)
    bad = tok.clone()
    bad[0, 3, 1] = float("inf")
    with pytest.raises(ValueError, match="patch_tokens"):
        alloc(bad, budget=3, grid=(4, 4), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="query"):
        alloc(tok, query=torch.randn(2, 8), budget=3, grid=(4, 4), num_prefix_tokens=1)


@pytest.mark.parametrize("name", NAMES)
def test_ragged_budgets_and_half_precision(name):
    torch.manual_seed(5)
    alloc = create_allocator(name).eval()
    for dt in (torch.float16, torch.bfloat16):
        tokens = (4 * torch.randn(3, 36, 16)).to(dt)
        query = (4 * torch.randn(3, 4, 16)).to(dt)
        mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
        out = alloc(tokens, query=query, query_mask=mask, budget=torch.tensor([7, 0, 40]), grid=(6, 6))
        assert out.mask.sum(1).tolist() == [7, 0, 36]
        assert torch.isfinite(out.tokens.float()).all() and torch.isfinite(out.gain.float()).all()
        assert out.tokens.dtype == dt


def test_learned_balancer_gets_gradients_in_training_mode():
    torch.manual_seed(6)
    alloc = create_allocator("arr_coc", alpha=None, price=None).train()
    assert not alloc.fixed_budget
    tokens = torch.randn(2, 16, 8)
    query = torch.randn(2, 3, 8)
    out = alloc(tokens, query=query, budget=6, grid=(4, 4))
    loss = out.tokens.pow(2).mean() + 0.01 * out.extras["keep_prob"].sum()
    loss.backward()
    grads = [p.grad for p in alloc.balancer.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    # the relaxed keep probability of each pick is below 1 and the forward tokens are unchanged
    kp = out.extras["keep_prob"].gather(1, out.extras["pick_order"].clamp_min(0))
    assert (kp < 1).all()
    alloc.eval()
    with torch.no_grad():
        ev = alloc(tokens, query=query, budget=6, grid=(4, 4))
    assert torch.equal(ev.indices, out.indices)
    torch.testing.assert_close(ev.tokens, out.tokens.detach())
