"""Knowing: the participatory scorer's pmi, its untrained geometry and laziness, the query-agnostic scorers."""

import math

import pytest
import torch
import torch.nn.functional as F

from arr_coc import texture, token_scores
from arr_coc.knowing import (
    ParticipatoryScorer,
    PerspectivalScorer,
    PropositionalScorer,
    masked_mean,
    pyramid_scores,
)


def _reference_pmi(c, q, mask, heads, tau):
    """Loops: log(mean_{h, real t} softmax_j(tau cos(q_t^h, c_j^h))) + log M, untrained maps (identity)."""
    b, m, d = c.shape
    e = d // heads
    out = torch.zeros(b, m, dtype=torch.float64)
    for i in range(b):
        probs = []
        for t in range(q.shape[1]):
            if mask is not None and not mask[i, t]:
                continue
            for h in range(heads):
                qh = q[i, t, h * e : (h + 1) * e].double()
                ch = c[i, :, h * e : (h + 1) * e].double()
                cos = (ch @ qh) / (ch.norm(dim=1) * qh.norm())
                probs.append(torch.softmax(tau * cos, 0))
        if probs:
            out[i] = torch.stack(probs).mean(0).log() + math.log(m)
    return out


def test_pmi_matches_reference_and_is_a_log_density_ratio():
    b, m, d, t = 3, 12, 16, 4
    c = torch.randn(b, m, d, dtype=torch.float64)
    q = torch.randn(b, t, d, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    s = ParticipatoryScorer(num_heads=4, temperature=7.0).eval()
    out = s(c, q, mask)
    tau = s.log_temperature[0].double().exp().item()  # 7, as stored in float32
    assert tau == pytest.approx(7.0, rel=1e-6)
    ref = _reference_pmi(c, q, mask, 4, tau)
    torch.testing.assert_close(out.pmi, ref, atol=1e-9, rtol=0)
    # E_{p(j)}[exp(pmi_j)] = sum_j p(j | q) = 1; the all-padding row has pmi = 0
    torch.testing.assert_close((out.log_prior.exp() * out.pmi.exp()).sum(1), torch.ones(b, dtype=torch.float64))
    assert torch.all(out.pmi[1] == 0) and not out.has_query[1]
    # padded tokens are ignored: same as dropping them
    alone = s(c[:1], q[:1, [0, 1, 3]])
    torch.testing.assert_close(alone.pmi[0], out.pmi[0])
    torch.testing.assert_close(out.query_summary[0], q[0, [0, 1, 3]].mean(0))


def test_learned_prior_is_a_distribution_and_uniform_at_init():
    c = torch.randn(2, 9, 8)
    q = torch.randn(2, 2, 8)
    s = ParticipatoryScorer(prior="learned", num_heads=2).train()
    out = s(c, q)
    torch.testing.assert_close(out.log_prior, torch.full((2, 9), -math.log(9)))
    with torch.no_grad():
        s.candidate_map.prior.normal_()
    out = s(c, q)
    torch.testing.assert_close(out.log_prior.exp().sum(1), torch.ones(2))
    assert out.log_prior.std() > 0
    torch.testing.assert_close((out.log_prior.exp() * out.pmi.exp()).sum(1), torch.ones(2), atol=1e-5, rtol=0)


def test_candidate_equal_to_query_has_the_largest_pmi_and_rows_are_independent():
    c = torch.randn(4, 40, 32)
    target = torch.tensor([0, 7, 39, 20])
    q = c[torch.arange(4), target][:, None] * 3.0
    s = ParticipatoryScorer().eval()
    out = s(c, q)
    assert torch.equal(out.pmi.argmax(1), target)
    assert (out.pmi.max(1).values > 0).all()
    c2 = c.clone()
    c2[1:] = torch.randn(3, 40, 32)
    torch.testing.assert_close(s(c2, q).pmi[0], out.pmi[0])


def test_untrained_maps_preserve_cosines_and_serve_any_width():
    s = ParticipatoryScorer().eval()
    for d in (4, 24):
        c = torch.randn(2, 10, d)
        out = s(c, torch.randn(2, 3, d))
        assert torch.equal(out.candidate_emb, c)  # identity
    assert not s.candidate_map.materialized
    # an explicit wider relevance space: semi-orthogonal map, cosines exactly preserved
    wide = ParticipatoryScorer(vision_dim=8, query_dim=8, relevance_dim=16, num_heads=4).eval()
    c = torch.randn(2, 10, 8, dtype=torch.float64)
    emb = wide(c).candidate_emb
    cos_raw = F.normalize(c, dim=-1) @ F.normalize(c, dim=-1).transpose(1, 2)
    cos_rel = F.normalize(emb, dim=-1) @ F.normalize(emb, dim=-1).transpose(1, 2)
    torch.testing.assert_close(cos_rel, cos_raw, atol=1e-6, rtol=0)  # float32 basis


def test_training_materializes_in_place_and_gradients_reach_every_parameter():
    s = ParticipatoryScorer(prior="learned", num_heads=2).train()
    c = torch.randn(2, 10, 8)
    q = torch.randn(2, 3, 6)  # another width than the candidates: a projection is needed
    out = s(c, q)
    assert s.candidate_map.materialized and s.query_map.materialized
    loss = (out.pmi * torch.randn_like(out.pmi)).sum() + out.candidate_emb.pow(2).sum()
    loss.backward()
    for name, p in s.named_parameters():
        assert p.grad is not None, name
    assert s.candidate_map.up.grad.abs().sum() > 0 and s.query_map.weight.grad.abs().sum() > 0
    assert s.log_temperature.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="candidates"):
        s(torch.randn(2, 10, 5))
    # state dict round trip into a fresh lazy scorer
    fresh = ParticipatoryScorer(prior="learned", num_heads=2)
    fresh.load_state_dict(s.state_dict())
    torch.testing.assert_close(fresh.eval()(c, q).pmi, s.eval()(c, q).pmi)


def test_scorer_bad_arguments():
    with pytest.raises(ValueError, match="prior"):
        ParticipatoryScorer(prior="zipf")
    with pytest.raises(ValueError, match="relevance_dim"):
        ParticipatoryScorer(relevance_dim=10, num_heads=4)
    with pytest.raises(ValueError, match="candidates"):
        ParticipatoryScorer()(torch.randn(3, 4))
    with pytest.raises(ValueError, match="query_mask"):
        ParticipatoryScorer()(torch.randn(2, 3, 4), torch.randn(2, 2, 4), torch.ones(2, 3, dtype=torch.bool))


def test_masked_mean():
    x = torch.arange(12.0).reshape(1, 3, 4)
    torch.testing.assert_close(masked_mean(x, torch.tensor([[True, False, True]])), (x[0, 0] + x[0, 2])[None] / 2)
    assert torch.all(masked_mean(x, torch.zeros(1, 3, dtype=torch.bool)) == 0)


# ---------------------------------------------------------------------- query-agnostic
def test_propositional_and_perspectival_wrap_the_pure_functions():
    fine = torch.randn(2, 16, 8)
    prefix = torch.randn(2, 1, 8)
    torch.testing.assert_close(PropositionalScorer()(fine), fine.norm(dim=-1))
    torch.testing.assert_close(PerspectivalScorer()(fine, prefix=prefix), token_scores.cls_attention_scores(prefix, fine))
    pixels = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(
        PropositionalScorer("pixels")(pixels=pixels, grid=(4, 4)), texture.patch_entropy(pixels, (4, 4))
    )
    torch.testing.assert_close(
        PerspectivalScorer("pixels")(pixels=pixels, grid=(4, 4)), texture.perspectival_salience(pixels, (4, 4))
    )
    with pytest.raises(ValueError, match="pixels"):
        PropositionalScorer("pixels")(fine)
    with pytest.raises(ValueError, match="source"):
        PerspectivalScorer("audio")


def test_pixel_entropy_is_in_nats_and_per_image():
    # patch 0 constant (0 nats), patch 1 half black half white (log 2 nats)
    img = torch.zeros(1, 3, 8, 16)
    img[:, :, :4, 8:] = 1.0
    h = PropositionalScorer("pixels")(pixels=img, grid=(1, 2))
    torch.testing.assert_close(h, torch.tensor([[0.0, math.log(2)]]))
    other = torch.rand(1, 3, 8, 16)
    both = PropositionalScorer("pixels")(pixels=torch.cat([img, other]), grid=(1, 2))
    torch.testing.assert_close(both[:1], h)


def test_pyramid_scores_average_children():
    s = torch.arange(16.0).reshape(1, 16)
    ps = pyramid_scores(s, (4, 4), (1, 2))
    assert ps.shape == (1, 16 + 4 + 1)
    torch.testing.assert_close(ps[0, 16], torch.tensor([0.0, 1, 4, 5]).mean())
    torch.testing.assert_close(ps[0, 20], s.mean())
