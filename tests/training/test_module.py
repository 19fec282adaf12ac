"""ARRCOCModule: the pipeline, its metrics, gradients, checkpoints and the allocator hub."""

from __future__ import annotations

import functools

import pytest
import torch

from arr_coc.allocators import create_allocator
from arr_coc.pyramid import build_pyramid
from arr_coc.training.datamodule import EmbeddedVQADataModule, SeededRandomSampler
from arr_coc.training.hub import load_allocator, save_allocator
from arr_coc.training.module import (
    ARRCOCModule,
    allocator_loss_terms,
    coverage_mask,
    relevance_recall,
    repool_in_vision_space,
)
from arr_coc.training.task import VQATask
from tests.training._helpers import FixedChoice, TrainableTopK, micro_vlm, registered


@pytest.fixture(scope="module")
def vlm():
    return micro_vlm(0)


@pytest.fixture(scope="module")
def batch():
    dm = EmbeddedVQADataModule(VQATask(seed=3), train_size=8, val_size=8, batch_size=8)
    return next(iter(dm.val_dataloader()))


def _module(vlm, allocator, **kw):
    return ARRCOCModule(vlm, allocator, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), **kw)


# ------------------------------------------------------------------ metrics
def test_coverage_mask_fine_pooled_and_clipped():
    # 6 x 6 grid: a fine token at (0, 5), a 2x2 token at (2, 2), a 4x4 token at (4, 4) (clipped to 2x2)
    pos = torch.tensor([[[0, 5, 0], [2, 2, 1], [4, 4, 2], [-1, -1, -1]]])
    mask = torch.tensor([[True, True, True, False]])
    cov = coverage_mask(pos, mask, (6, 6))[0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[0, 5] = True
    expected[2:4, 2:4] = True
    expected[4:6, 4:6] = True
    assert torch.equal(cov, expected)


def test_relevance_recall_by_hand():
    grid = (4, 4)
    rel = torch.zeros(3, 4, 4, dtype=torch.bool)
    rel[0, 0, 0] = rel[0, 0, 1] = rel[0, 3, 3] = True  # 3 relevant patches
    rel[1, 1, 1] = True
    # example 2 has no relevant patch: recall undefined (NaN)
    pos = torch.tensor(
        [
            [[0, 0, 1], [3, 3, 0]],  # 2x2 at the corner covers (0,0), (0,1); plus (3,3): 3/3
            [[0, 0, 0], [2, 2, 1]],  # neither covers (1,1): 0/1
            [[0, 0, 0], [1, 1, 0]],
        ]
    )
    mask = torch.ones(3, 2, dtype=torch.bool)
    r = relevance_recall(pos, mask, rel, grid)
    assert r[0].item() == 1.0 and r[1].item() == 0.0 and torch.isnan(r[2])
    # a padded token does not count
    mask[0, 1] = False
    assert relevance_recall(pos, mask, rel, grid)[0].item() == pytest.approx(2 / 3)


def test_relevance_recall_maps_a_coarser_mask_to_the_token_grid():
    rel = torch.zeros(1, 2, 2, dtype=torch.bool)
    rel[0, 0, 1] = True  # the top-right quarter: fine patches rows 0-1, cols 2-3 of a 4 x 4 grid
    pos = torch.tensor([[[0, 2, 0], [1, 3, 0], [0, 0, 0]]])
    r = relevance_recall(pos, torch.ones(1, 3, dtype=torch.bool), rel, (4, 4))
    assert r.item() == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="relevance"):
        relevance_recall(pos, torch.ones(1, 3, dtype=torch.bool), rel[0], (4, 4))


def test_repool_gives_vision_space_pooling_for_pooled_candidates_only(vlm, batch):
    with torch.no_grad():
        fine_v = vlm.encode_image(batch["pixels"])[:, vlm.num_prefix_tokens :]  # [B, 64, Dv]
        fine_l = vlm.project(fine_v)
    grid = vlm.grid
    pyr_l = build_pyramid(fine_l, grid, (1, 2))
    pyr_v = build_pyramid(fine_v, grid, (1, 2))
    idx = torch.tensor([3, 64 + 5, 64 + 16 + 2])  # a fine token, a 2x2 and a 4x4 candidate
    kept = pyr_l.candidates[:, idx].clone()
    pos = pyr_l.positions[idx][None].expand(kept.shape[0], -1, -1)
    mask = torch.ones(kept.shape[:2], dtype=torch.bool)
    kept[:, 1] += 0.5  # a merged token at a pooled position: not a candidate, left alone
    out = repool_in_vision_space(kept, pos, mask, fine_v, fine_l, grid, vlm.project)
    assert torch.equal(out[:, 0], kept[:, 0])
    assert torch.equal(out[:, 1], kept[:, 1])
    want = vlm.project(pyr_v.candidates[:, idx[2:3]])[:, 0]
    torch.testing.assert_close(out[:, 2], want, rtol=1e-5, atol=1e-6)
    # and the two poolings really differ (the projector is not linear)
    assert (want - pyr_l.candidates[:, idx[2]]).abs().max() > 1e-3


def test_module_feeds_repooled_tokens_to_the_llm(vlm, batch, monkeypatch):
    seen = {}
    orig = vlm.answer_logits

    def spy(visual, *a, **k):
        seen["visual"] = visual.detach()
        return orig(visual, *a, **k)

    monkeypatch.setattr(vlm, "answer_logits", spy)
    module = _module(vlm, FixedChoice([64 + 16 + 1]), budget=1)
    module(batch)
    with torch.no_grad():
        fine_v = vlm.encode_image(batch["pixels"])[:, vlm.num_prefix_tokens :]
    want = vlm.project(build_pyramid(fine_v, vlm.grid, (1, 2)).candidates[:, 64 + 16 + 1 :][:, :1])[:, 0]
    torch.testing.assert_close(seen["visual"][:, 0], want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ pipeline
@pytest.mark.parametrize("after_projection", [True, False])
def test_full_allocator_reproduces_the_unmodified_vlm(vlm, batch, after_projection):
    module = _module(vlm, create_allocator("full"), budget=4, allocate_after_projection=after_projection).eval()
    with torch.no_grad():
        got = module(batch)
        ref = vlm(batch["pixels"], batch["question_ids"], batch["question_mask"])
    assert got["out"].mask.sum(1).tolist() == [vlm.num_patches] * ref.shape[0]
    torch.testing.assert_close(got["logits"], ref, rtol=1e-5, atol=1e-5)


def test_only_the_allocator_trains_and_its_terms_are_weighted(vlm, batch):
    alloc = TrainableTopK(dim=32)
    module = _module(vlm, alloc, budget=8, loss_weights={"ce": 1.0, "rate": 0.5, "critic": 0.25})
    module.train()
    assert not vlm.training, "the frozen VLM stays in eval mode"
    total, terms, res = module._loss(batch, 8)
    assert set(terms) == {"ce", "rate", "critic"}
    torch.testing.assert_close(total, terms["ce"] + 0.5 * terms["rate"] + 0.25 * terms["critic"])
    total.backward()
    assert alloc.key.weight.grad is not None and alloc.key.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vlm.parameters())
    assert [id(p) for p in module.trainable_parameters()] == [id(p) for p in alloc.parameters()]
    # the answer loss alone reaches the allocator (through the straight-through gates)
    _, terms2, _ = module._loss(batch, 8)
    alloc.zero_grad()
    terms2["ce"].backward()
    assert alloc.key.weight.grad.abs().sum() > 0
    assert res["out"].mask.sum(1).tolist() == [8] * batch["answer"].shape[0]


def test_loss_terms_read_from_the_allocator_output():
    from arr_coc.allocators import AllocationOutput

    z = torch.zeros(2, 1)
    out = AllocationOutput(z.long(), z[..., None], z.bool(), z.long()[..., None].expand(-1, -1, 3))
    assert allocator_loss_terms(None, out) == {}
    out.extras = {"losses": {"rate": torch.tensor([1.0, 3.0])}, "critic_loss": torch.tensor(0.5)}
    terms = allocator_loss_terms(None, out)
    assert terms["rate"].item() == 2.0 and terms["critic"].item() == 0.5
    out.extras = {"losses": {"distill": torch.tensor([2.0, 4.0])}}
    assert allocator_loss_terms(None, out)["distill"].item() == 3.0
    # the rate from keep probabilities: the Bernoulli KL to the budget's keep rate, by hand
    p = torch.tensor([[0.5, 0.25, 1.0, 0.0]])
    out.extras = {"keep_prob": p}
    r = 2 / 4
    kl = lambda a: (a * torch.log(a / r) if a > 0 else 0.0) + ((1 - a) * torch.log((1 - a) / (1 - r)) if a < 1 else 0.0)  # noqa: E731
    want = sum(float(kl(a)) for a in p[0])
    assert allocator_loss_terms(None, out, budget=2)["rate"].item() == pytest.approx(want, rel=1e-6)
    assert allocator_loss_terms(None, out, rate="tokens")["rate"].item() == pytest.approx(1.75)


@pytest.mark.parametrize("name", ["arr_coc", "arr_coc_adapter"])
def test_arr_coc_allocators_train_their_modules(vlm, batch, name):
    alloc = create_allocator(name)
    module = _module(vlm, alloc, budget=8, loss_weights={"ce": 1.0, "rate": 0.1, "critic": 0.1})
    params = module.trainable_parameters()
    assert params, "lazy parameters are materialised at construction"
    opt = module.configure_optimizers()
    module.train()
    total, terms, res = module._loss(batch, 8)
    assert "rate" in terms and torch.isfinite(terms["rate"])
    if name == "arr_coc_adapter":
        b = batch["answer"].shape[0]
        assert 0 < terms["critic"].item() and terms["mi_infonce"].item() <= torch.log(torch.tensor(float(b))).item() + 1e-6
        # distillation from the exact greedy is on by default (weight 1) and in the total
        assert module.loss_weights["distill"] == 1.0 and terms["distill"].item() > 0
        want = terms["ce"] + 0.1 * terms["rate"] + 0.1 * terms["critic"] + terms["distill"]
        torch.testing.assert_close(total, want)
    else:
        assert "distill" not in terms
    opt.zero_grad()
    total.backward()
    scorer_grads = [p.grad for p in alloc.scorer.parameters() if p.grad is not None]
    assert scorer_grads and any(g.abs().sum() > 0 for g in scorer_grads)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    assert res["out"].gain is not None and res["out"].mask.sum(1).max().item() <= 8


def test_bad_arguments_are_named(vlm):
    with pytest.raises(ValueError, match="loss_weights"):
        _module(vlm, create_allocator("random"), loss_weights={"rat": 1.0})
    with pytest.raises(ValueError, match="loss_weights"):
        _module(vlm, create_allocator("random"), loss_weights={"rate": -1.0})
    with pytest.raises(ValueError, match="budget"):
        _module(vlm, create_allocator("random"), budget=-1)


def test_parameter_free_allocator_is_evaluated_not_trained(vlm, batch):
    module = _module(vlm, create_allocator("divprune"), budget=8)
    assert module.configure_optimizers() is None
    assert module.training_step(batch, 0) is None


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_holds_the_allocator_and_refuses_another_backbone(vlm):
    module = _module(vlm, TrainableTopK(dim=32), backbones={"model": "micro"})
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and not any(k.startswith("vlm.") for k in ckpt["state_dict"])
    assert ckpt["arr_coc"]["backbones"] == {"model": "micro"}
    # loading into a module on the same VLM works strictly (the VLM's weights are put back)
    other = _module(vlm, TrainableTopK(dim=32))
    other.on_load_checkpoint(ckpt)
    other.load_state_dict(ckpt["state_dict"], strict=True)
    assert torch.equal(other.allocator.key.weight, module.allocator.key.weight)
    # a different frozen VLM is refused with a clear error
    stranger = _module(micro_vlm(1), TrainableTopK(dim=32))
    ckpt2 = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt2)
    with pytest.raises(ValueError, match="another frozen VLM"):
        stranger.on_load_checkpoint(ckpt2)


# ------------------------------------------------------------------ hub
def test_save_and_load_pretrained_allocator(tmp_path, batch):
    with registered("_test_trainable", TrainableTopK):
        alloc = TrainableTopK(dim=32, query_dim=16)
        torch.nn.init.normal_(alloc.key.weight)
        folder = save_allocator(alloc, tmp_path / "alloc", name="_test_trainable", config={"dim": 32, "query_dim": 16})
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
        loaded = load_allocator(folder)
        assert isinstance(loaded, TrainableTopK)
        for (k, a), (k2, b) in zip(alloc.state_dict().items(), loaded.state_dict().items()):
            assert k == k2 and torch.equal(a, b)
        x, q = torch.randn(2, 65, 32), torch.randn(2, 5, 16)
        o1 = alloc(x, query=q, budget=7, num_prefix_tokens=1)
        o2 = loaded(x, query=q, budget=7, num_prefix_tokens=1)
        assert torch.equal(o1.indices, o2.indices) and torch.equal(o1.tokens, o2.tokens)
        with pytest.raises(ValueError, match="config"):
            save_allocator(alloc, tmp_path / "bad", name="_test_trainable", config={"dim": 32})


def test_lazy_allocator_round_trips_through_the_hub(tmp_path):
    alloc = create_allocator("arr_coc_adapter")  # dims inferred on the first training forward
    x, q = torch.randn(2, 65, 32), torch.randn(2, 4, 24)
    alloc.train()
    alloc(x, query=q, budget=8, num_prefix_tokens=1)
    alloc.eval()
    loaded = load_allocator(save_allocator(alloc, tmp_path / "a", name="arr_coc_adapter"))
    ref, got = alloc(x, query=q, budget=8, num_prefix_tokens=1), loaded(x, query=q, budget=8, num_prefix_tokens=1)
    assert torch.equal(ref.indices, got.indices) and torch.equal(ref.gain, got.gain)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in alloc.parameters()) > 0


def test_seeded_sampler_depends_on_seed_and_epoch_only():
    a, b = SeededRandomSampler(range(50), seed=3), SeededRandomSampler(range(50), seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    b.set_epoch(3)
    assert list(a) != list(b)
    assert list(SeededRandomSampler(range(50), seed=4)) != list(SeededRandomSampler(range(50), seed=3))


def test_relation_others_reaches_the_relevance_term(vlm, batch):
    """The module's relevance term takes the allocator's ``relevance_exclude`` (the anchor, out of
    the relation's target) into the listwise loss."""
    from arr_coc.allocators.arr_coc_host_trained import relevance_listwise_loss

    torch.manual_seed(0)
    alloc = create_allocator("arr_coc_host_trained", prior=None, relational=True, relation_geometry=True,
                             anchor_query=True, relation_others=True)
    module = _module(vlm, alloc, budget=8, loss_weights={"ce": 0.0, "relevance": 1.0})
    module.train()
    anchor = module._loss(batch, 8)[2]["out"].extras["anchor"]  # [B] fine cells, the same on every call
    batch = dict(batch)
    rel = batch["relevance"].clone().flatten(1)
    rel[torch.arange(rel.shape[0]), anchor] = True  # the anchors are relevant: excluding them matters
    batch["relevance"] = rel.view_as(batch["relevance"])
    _, terms, res = module._loss(batch, 8)
    extras = res["out"].extras
    assert torch.equal(extras["anchor"], anchor)
    want = relevance_listwise_loss(extras["relevance_logits"], batch["relevance"], exclude=extras["relevance_exclude"]).mean()
    torch.testing.assert_close(terms["relevance"], want)
    plain = relevance_listwise_loss(extras["relevance_logits"], batch["relevance"]).mean()
    assert not torch.allclose(terms["relevance"], plain)


def test_host_reading_allocator_trains_on_relevance_and_distillation(vlm, batch):
    """arr_coc_host_trained gets the base VLM's host in training (its LLM attention: the
    distillation teacher) and the listwise relevance term when its weight is > 0."""
    from arr_coc.allocators.arr_coc_host_trained import relevance_listwise_loss

    alloc = create_allocator("arr_coc_host_trained", prior=None, distill=True)
    module = _module(vlm, alloc, budget=8, loss_weights={"ce": 1.0, "relevance": 0.5, "distill": 0.25})
    opt = module.configure_optimizers()
    module.train()
    total, terms, res = module._loss(batch, 8)
    extras = res["out"].extras
    want_rel = relevance_listwise_loss(extras["relevance_logits"], batch["relevance"]).mean()
    torch.testing.assert_close(terms["relevance"], want_rel)
    assert terms["distill"].item() >= 0 and "llm_attention" not in extras  # prior None: the teacher only
    torch.testing.assert_close(total, terms["ce"] + 0.5 * terms["relevance"] + 0.25 * terms["distill"])
    opt.zero_grad()
    total.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in alloc.scorer.parameters())
    # the relevance term is off by default
    module0 = _module(vlm, create_allocator("arr_coc_host_trained"), budget=8)
    assert module0.loss_weights["relevance"] == 0.0
    _, terms0, res0 = module0._loss(batch, 8)
    assert "relevance" not in terms0 and "llm_attention" in res0["out"].extras  # the LLM prior read the host


def test_in_llm_allocator_trains_its_scorer_on_the_relevance_term(vlm, batch):
    """arr_coc_host_llm_trained prunes inside the base VLM's LLM in training too; only the
    relevance term reaches its scorer (the kept set is discrete), and the metrics see the
    tokens the last layers saw."""
    alloc = create_allocator("arr_coc_host_llm_trained", llm_layer=0)
    module = _module(vlm, alloc, budget=4, loss_weights={"ce": 1.0, "relevance": 1.0})
    opt = module.configure_optimizers()
    assert opt is not None, "the scorer's lazy maps are materialised at the LLM's width"
    module.train()
    total, terms, res = module._loss(batch, 4)
    out = res["out"]
    assert out.mask.sum(1).tolist() == [4] * batch["answer"].shape[0]
    assert terms["relevance"].requires_grad and not terms["ce"].requires_grad
    torch.testing.assert_close(total, terms["ce"] + terms["relevance"])
    opt.zero_grad()
    total.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in alloc.scorer.parameters())
    with torch.no_grad():
        full = module._loss(batch, 64)[2]["answer"].logits  # budget >= N: the unpruned VLM
    want = vlm.answer_logits(res["tokens"][:, vlm.num_prefix_tokens :], None, None, batch["question_ids"], batch["question_mask"])
    torch.testing.assert_close(full, want, rtol=1e-4, atol=1e-4)
