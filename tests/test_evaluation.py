"""arr_coc.evaluation: metrics on hand-built cases, the oracle, and the evaluation loop."""

from __future__ import annotations

import math

import pytest
import torch

from arr_coc.allocators import create_allocator
from arr_coc.evaluation import (
    ORACLE,
    allocation_metrics,
    build_eval_batches,
    evaluate_allocators,
    oracle_allocation,
    retained_percent,
    run_allocation,
    summarize,
)
from arr_coc.training.task import QUESTION_TYPES, VQATask
from arr_coc.training.tokenizer import build_tokenizer
from tests.training._helpers import micro_vlm


def _rel(h, w, cells):
    r = torch.zeros(1, h, w, dtype=torch.bool)
    for i, j in cells:
        r[0, i, j] = True
    return r


# ------------------------------------------------------------------ metrics by hand
def test_recall_counts_a_pooled_token_as_covering_its_region():
    rel = _rel(4, 4, [(1, 1), (3, 3)])
    # one 2x2 token at the top-left (covers (0..1, 0..1)) and one fine token at (3, 2)
    pos = torch.tensor([[[0, 0, 1], [3, 2, 0]]])
    mask = torch.tensor([[True, True]])
    m = allocation_metrics(pos, mask, rel, (4, 4))
    assert m["recall"].tolist() == [0.5]  # (1, 1) covered by the pooled token, (3, 3) not
    assert m["recall_fine"].tolist() == [0.0]  # no relevant patch seen at full detail
    assert m["tokens"].tolist() == [2.0]
    # a 4x4 token covers everything; padding rows count for nothing
    pos = torch.tensor([[[0, 0, 2], [-1, -1, -1]]])
    m = allocation_metrics(pos, torch.tensor([[True, False]]), rel, (4, 4))
    assert m["recall"].tolist() == [1.0] and m["tokens"].tolist() == [1.0]


def test_retained_percent_math_and_bad_reference():
    assert retained_percent(0.6, 0.8) == pytest.approx(75.0)
    assert retained_percent(0.9, 0.8) == pytest.approx(112.5)  # pruning may help
    assert retained_percent(0.0, 0.5) == 0.0
    with pytest.raises(ValueError, match="full_accuracy"):
        retained_percent(0.5, 0.0)
    with pytest.raises(ValueError, match="accuracy"):
        retained_percent(1.5, 0.5)


def test_summarize_by_type_and_category():
    qt = torch.tensor([0, 3, 4, 0, 2])  # shape, nearest, count, shape, side
    correct = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    recall = torch.tensor([1.0, 0.5, float("nan"), 0.0, 1.0])
    tokens = torch.tensor([4.0, 2.0, 4.0, 1.0, 3.0])
    row = summarize(correct, recall, recall, tokens, qt, question_types=QUESTION_TYPES, full_acc=0.75)
    assert row["accuracy"] == pytest.approx(0.6)
    assert row["retained_pct"] == pytest.approx(80.0)
    assert row["recall"] == pytest.approx(2.5 / 4)  # NaN (no relevant patch) left out
    assert row["acc_shape"] == 0.5 and row["acc_nearest"] == 0.0 and row["acc_count"] == 1.0
    assert math.isnan(row["acc_colour"])
    assert row["acc_single_object"] == pytest.approx(2 / 3)  # shape, shape, side
    assert row["acc_relational"] == 0.0 and row["acc_counting"] == 1.0
    assert row["tokens"] == pytest.approx(14 / 5) and row["n"] == 5
    assert row["tokens_shape"] == 2.5 and row["tokens_nearest"] == 2.0 and row["tokens_side"] == 3.0
    assert math.isnan(row["tokens_colour"])
    with pytest.raises(ValueError, match="recall"):
        summarize(correct, recall[:3], recall, recall, qt, question_types=QUESTION_TYPES, full_acc=0.5)


# ------------------------------------------------------------------ the oracle
def test_oracle_keeps_relevant_patches_first_then_fills():
    rel = _rel(4, 4, [(0, 1), (2, 3)])  # fine indices 1 and 11
    idx, pos, mask, fits = oracle_allocation(rel, 5, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (1, 5) and mask.all()
    assert {1, 11} <= set(idx[0].tolist()) and len(set(idx[0].tolist())) == 5
    assert idx[0].tolist() == sorted(idx[0].tolist())  # raster order
    assert torch.equal(pos[0, :, 0] * 4 + pos[0, :, 1], idx[0]) and (pos[0, :, 2] == 0).all()
    assert fits.tolist() == [True]
    # budget below the relevant count: a subset of the relevant patches, and it does not fit
    idx, _, mask, fits = oracle_allocation(rel, 1, generator=torch.Generator().manual_seed(0))
    assert idx[0].item() in (1, 11) and fits.tolist() == [False]
    # no fill: exactly the relevant patches; a ragged batch is padded with -1
    rel2 = torch.cat([rel, _rel(4, 4, [(3, 3)])])
    idx, pos, mask, fits = oracle_allocation(rel2, 5, fill=False)
    assert idx.tolist() == [[1, 11], [15, -1]] and mask.tolist() == [[True, True], [True, False]]
    assert pos[1, 1].tolist() == [-1, -1, -1] and fits.tolist() == [True, True]
    # budget 0 keeps nothing; fits only where nothing is relevant
    idx, _, mask, fits = oracle_allocation(torch.cat([rel, torch.zeros_like(rel)]), 0)
    assert idx.shape == (2, 0) and fits.tolist() == [False, True]
    with pytest.raises(ValueError, match="budget"):
        oracle_allocation(rel, -1)
    with pytest.raises(ValueError, match="relevance"):
        oracle_allocation(rel[0], 3)


# ------------------------------------------------------------------ the loop on a micro VLM
@pytest.fixture(scope="module")
def setup():
    task = VQATask(seed=3)
    vlm = micro_vlm(0).eval()
    batches = build_eval_batches(task, build_tokenizer(task), start=100, size=12, batch_size=8)
    return vlm, batches


def test_evaluate_allocators_values(setup):
    vlm, batches = setup
    allocs = {"full": create_allocator("full"), "random": create_allocator("random", seed=0), ORACLE: ORACLE}
    rows = evaluate_allocators(vlm, allocs, batches, [4, 64], progress=False)
    by = {(r["allocator"], r["budget"]): r for r in rows}
    assert len(rows) == 6 and all(r["n"] == 12 for r in rows)
    full_acc = by[("full", 4)]["full_accuracy"]
    # the same examples through the plain VLM
    ref = torch.cat([(vlm(b["pixels"], b["question_ids"], b["question_mask"]).argmax(-1) == b["answer"]).float() for b in batches])
    assert full_acc == pytest.approx(float(ref.mean()))
    for k in (4, 64):
        assert by[("full", k)]["accuracy"] == pytest.approx(full_acc)
        assert by[("full", k)]["tokens"] == 64 and by[("full", k)]["recall"] == 1.0
    assert by[("random", 4)]["tokens"] == 4 and by[("oracle", 4)]["tokens"] == 4
    if full_acc > 0:
        assert by[("random", 4)]["retained_pct"] == pytest.approx(100 * by[("random", 4)]["accuracy"] / full_acc)
    # the oracle's fit rate is the fraction of questions with at most K relevant patches
    n_rel = torch.cat([b["relevance"].flatten(1).sum(1) for b in batches])
    assert by[("oracle", 4)]["oracle_fit"] == pytest.approx(float((n_rel <= 4).float().mean()))
    assert by[("oracle", 64)]["oracle_fit"] == 1.0 and by[("oracle", 64)]["recall"] == 1.0
    # where every question fits, the oracle sees every relevant patch
    if by[("oracle", 4)]["oracle_fit"] == 1.0:
        assert by[("oracle", 4)]["recall"] == 1.0
    assert math.isnan(by[("random", 4)]["oracle_fit"])
    assert all(r["alloc_ms"] >= 0 for r in rows)


def test_run_allocation_matches_the_vlm_for_full_tokens_and_rejects_bad_names(setup):
    vlm, batches = setup
    b = batches[0]
    res = run_allocation(vlm, create_allocator("full"), b, 4)
    ref = vlm(b["pixels"], b["question_ids"], b["question_mask"])
    torch.testing.assert_close(res.logits, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="allocator"):
        run_allocation(vlm, "orcale", b, 4)
    with pytest.raises(ValueError, match="budgets"):
        evaluate_allocators(vlm, {"full": create_allocator("full")}, batches, [-1], progress=False)
