"""The reported-gain vs Barber-Agakov check: the bound in closed form, rank correlations against
scipy (test-only oracle), exact bootstrap resamples, and the recording loop on a micro VLM."""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from arr_coc.allocators import create_allocator
from arr_coc.analysis.allocation_information import (
    AllocationInformation,
    _auroc_weighted,
    _cluster_counts,
    _kendall_resampled,
    _spearman_weighted,
    answer_token_ids,
    auroc,
    gain_saturation,
    barber_agakov_bound,
    information_check,
    kendall_tau,
    rank_correlation,
    record_allocation_information,
    spearman_rho,
    type_breakdown,
)


# ---------------------------------------------------------------------------- the bound
def test_bound_is_log_answers_plus_log_softmax_at_the_answer():
    logits = torch.tensor([[2.0, 0.0, -1.0, 5.0], [0.0, 0.0, 0.0, 0.0], [1.0, 3.0, 1.0, -2.0]])
    answer = torch.tensor([0, 2, 1])
    b = barber_agakov_bound(logits, answer)
    # closed form, whole vocabulary: log 4 + l_a - log sum exp l
    expect = [math.log(4) + 2.0 - math.log(math.exp(2) + 1 + math.exp(-1) + math.exp(5)), 0.0,
              math.log(4) + 3.0 - math.log(2 * math.e + math.exp(3) + math.exp(-2))]
    assert b.dtype == torch.float64
    assert b.tolist() == pytest.approx(expect, abs=1e-12)
    # uniform logits tell nothing: the term is exactly 0; its mean is log|A| - CE
    assert float(b.mean()) == pytest.approx(math.log(4) - float(F.cross_entropy(logits.double(), answer)), abs=1e-12)
    # answer set A = {0, 1, 2}: softmax over those logits alone
    a = barber_agakov_bound(logits, answer, candidates=[0, 1, 2])
    expect_a = [math.log(3) + 2.0 - math.log(math.exp(2) + 1 + math.exp(-1)), 0.0,
                math.log(3) + 3.0 - math.log(2 * math.e + math.exp(3))]
    assert a.tolist() == pytest.approx(expect_a, abs=1e-12)
    # a certain, correct decoder reaches log |A|
    sure = barber_agakov_bound(torch.tensor([[0.0, 80.0, 0.0]]), torch.tensor([1]))
    assert float(sure[0]) == pytest.approx(math.log(3), abs=1e-12)


def test_bound_rejects_bad_input_naming_the_argument():
    logits, answer = torch.zeros(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="logits"):
        barber_agakov_bound(torch.zeros(3), answer)
    with pytest.raises(ValueError, match="logits"):
        barber_agakov_bound(torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]]), answer)
    with pytest.raises(ValueError, match="answer"):
        barber_agakov_bound(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="answer"):
        barber_agakov_bound(logits, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="answer"):
        barber_agakov_bound(logits, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="candidates"):
        barber_agakov_bound(logits, answer, candidates=[0, 2])  # answer 1 is not a candidate
    with pytest.raises(ValueError, match="candidates"):
        barber_agakov_bound(logits, answer, candidates=[0, 1, 1])
    with pytest.raises(ValueError, match="candidates"):
        barber_agakov_bound(logits, answer, candidates=[0, 1, 5])


# ---------------------------------------------------------------------------- rank statistics
def test_perfectly_rank_aligned_bound_gives_one_and_reversed_gives_minus_one():
    gain = torch.rand(50, dtype=torch.float64)
    bound = torch.exp(3 * gain) - 7.0  # strictly increasing in the gain, not linear
    c = rank_correlation(gain, bound, num_bootstrap=200)
    assert c.spearman == pytest.approx(1.0, abs=1e-12) and c.kendall == pytest.approx(1.0, abs=1e-12)
    assert c.spearman_ci == pytest.approx((1.0, 1.0)) and c.kendall_ci == pytest.approx((1.0, 1.0))
    r = rank_correlation(gain, -bound, num_bootstrap=0)
    assert r.spearman == pytest.approx(-1.0) and r.kendall == pytest.approx(-1.0)
    assert all(math.isnan(v) for v in r.spearman_ci + r.kendall_ci)


def test_spearman_and_kendall_match_scipy_with_ties():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 6, (40,), generator=g).double()  # many ties
    y = x + torch.randint(0, 4, (40,), generator=g).double()
    assert float(spearman_rho(x, y)) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert float(kendall_tau(x, y, chunk=7)) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    # column by column
    xs, ys = torch.randn(5, 30, generator=g), torch.randn(5, 30, generator=g)
    xs[:, 3] = ys[:, 3] = 1.0  # a constant column: undefined
    rho, tau = spearman_rho(xs, ys), kendall_tau(xs, ys)
    for f in range(30):
        if f == 3:
            assert math.isnan(rho[f]) and math.isnan(tau[f])
            continue
        assert float(rho[f]) == pytest.approx(stats.spearmanr(xs[:, f], ys[:, f]).statistic, abs=1e-12)
        assert float(tau[f]) == pytest.approx(stats.kendalltau(xs[:, f], ys[:, f]).statistic, abs=1e-12)


def test_weighted_statistics_equal_scipy_on_the_explicit_resample():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 8, (25,), generator=g).double()
    y = 0.5 * x + torch.randn(25, generator=g).double()
    lab = torch.rand(25, generator=g) > 0.5
    w = _cluster_counts(torch.arange(25), 6, g)  # [25, 6] multinomial counts
    rho = _spearman_weighted(x[:, None].expand(-1, 6), y[:, None].expand(-1, 6), w)
    tau = _kendall_resampled(x, y, w, chunk=4)
    au = _auroc_weighted(x[:, None].expand(-1, 6), lab[:, None].expand(-1, 6), w)
    for r in range(6):
        rows = torch.repeat_interleave(torch.arange(25), w[:, r].long())
        xr, yr, lr = x[rows].numpy(), y[rows].numpy(), lab[rows].numpy()
        assert float(rho[r]) == pytest.approx(stats.spearmanr(xr, yr).statistic, abs=1e-10)
        assert float(tau[r]) == pytest.approx(stats.kendalltau(xr, yr).statistic, abs=1e-10)
        u = stats.mannwhitneyu(xr[lr], xr[~lr]).statistic
        assert float(au[r]) == pytest.approx(u / (lr.sum() * (~lr).sum()), abs=1e-10)


def test_cluster_bootstrap_draws_whole_questions():
    clusters = torch.tensor([0, 1, 2, 0, 1, 2])  # two rows per question
    w = _cluster_counts(clusters, 50, torch.Generator().manual_seed(0))
    assert torch.equal(w[:3], w[3:])  # a question's rows are drawn together
    assert torch.equal(w[:3].sum(0), torch.full((50,), 3.0, dtype=torch.float64))


def test_auroc_closed_form_and_undefined_cases():
    s = torch.tensor([0.1, 0.4, 0.35, 0.8])
    lab = torch.tensor([False, False, True, True])
    assert auroc(s, lab) == pytest.approx(0.75)  # 3 of 4 (pos, neg) pairs ordered
    assert auroc(torch.ones(4), lab) == pytest.approx(0.5)
    assert math.isnan(auroc(s, torch.ones(4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="label"):
        auroc(s, torch.tensor([0, 0, 1, 1]))


def test_correlations_reject_bad_input_naming_the_argument():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="y"):
        rank_correlation(x, torch.randn(9))
    with pytest.raises(ValueError, match="x"):
        spearman_rho(torch.randn(1), torch.randn(1))
    with pytest.raises(ValueError, match="x"):
        kendall_tau(torch.tensor([0.0, float("inf")]), torch.randn(2))
    with pytest.raises(ValueError, match="num_bootstrap"):
        rank_correlation(x, x, num_bootstrap=-1)
    with pytest.raises(ValueError, match="level"):
        rank_correlation(x, x, level=1.5)
    with pytest.raises(ValueError, match="clusters"):
        rank_correlation(x, x, clusters=torch.zeros(10))
    with pytest.raises(ValueError, match="chunk"):
        kendall_tau(x, x, chunk=0)


# ---------------------------------------------------------------------------- the check
def _cell(name, k, gain, bound, correct=None, qt=None, qlen=None):
    q = gain.shape[0]
    return AllocationInformation(
        name, k, gain.double(), bound.double(),
        correct if correct is not None else torch.ones(q, dtype=torch.bool),
        torch.full((q,), float(k), dtype=torch.float64),
        qt if qt is not None else torch.zeros(q, dtype=torch.long),
        qlen,
    )


def test_information_check_values():
    g = torch.Generator().manual_seed(3)
    q = 30
    base = torch.randn(q, generator=g).double()
    # per question, the bound rises with the budget as the gain does; across questions the
    # bound is the reversed gain: per-question correlation +1, per-cell -1
    cells = [_cell("a", k, base + k, -base + 0.1 * k, correct=base > 0) for k in (4, 8, 16)]
    check = information_check(cells, num_bootstrap=100)
    assert math.isnan(check.per_cell[0].gain_query_tokens_spearman)  # not recorded
    assert check.per_cell[0].gain_type_share == pytest.approx(0.0, abs=1e-12)  # one type: all within
    assert [(c.allocator, c.budget) for c in check.per_cell] == [("a", 4), ("a", 8), ("a", 16)]
    for c in check.per_cell:
        assert c.correlation.spearman == pytest.approx(-1.0) and c.correlation.kendall == pytest.approx(-1.0)
        assert c.within_type_spearman == pytest.approx(-1.0)
        assert c.accuracy == pytest.approx(float((base > 0).double().mean()))
        assert c.gain_auroc == pytest.approx(1.0)  # correct exactly where the gain is high
        assert c.gain_right == pytest.approx(float((base[base > 0] + c.budget).mean()))
    (pq,) = check.per_question
    assert pq.questions == q and pq.spearman == pytest.approx(1.0) and pq.kendall == pytest.approx(1.0)
    assert pq.spearman_ci == pytest.approx((1.0, 1.0))
    # pooled: scipy on the stacked rows
    gx = torch.cat([c.gain for c in cells])
    by = torch.cat([c.bound for c in cells])
    assert check.pooled.n == 3 * q
    assert check.pooled.spearman == pytest.approx(stats.spearmanr(gx, by).statistic, abs=1e-12)
    assert check.pooled.kendall == pytest.approx(stats.kendalltau(gx, by).statistic, abs=1e-12)
    lo, hi = check.pooled.spearman_ci
    assert lo <= check.pooled.spearman <= hi


def test_information_check_leaves_constant_questions_out_and_adds_the_cross_allocator_scope():
    gain = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # question 0 has the same bound at both budgets: undefined there
    cells = [
        _cell("a", 4, gain, torch.tensor([0.5, 0.1, 0.2, 0.3])),
        _cell("a", 8, gain + 1, torch.tensor([0.5, 0.4, 0.1, 0.9])),
        _cell("b", 4, gain + 0.5, torch.tensor([0.2, 0.3, 0.3, 0.4])),
    ]
    check = information_check(cells, num_bootstrap=0)
    scopes = {p.scope: p for p in check.per_question}
    a = scopes["a: across its budgets"]
    assert a.questions == 3 and a.total_questions == 4
    # questions 1..3 at budgets 4 -> 8: the bound goes 0.1->0.4 (+), 0.2->0.1 (-), 0.3->0.9 (+)
    assert a.spearman == pytest.approx(1 / 3) and a.kendall == pytest.approx(1 / 3)
    assert scopes["b: across its budgets"].questions == 0  # one budget: nothing to rank
    assert "every allocator x budget" in scopes
    with pytest.raises(ValueError, match="cells"):
        information_check([])
    with pytest.raises(ValueError, match="cells"):
        information_check([cells[0], _cell("c", 4, torch.ones(3), torch.ones(3))])


def test_gain_follows_type_and_query_length_diagnostics():
    # the gain is a function of the question type alone (type share 1) and rises with the
    # question's length (Spearman 1); the bound is noise
    qt = torch.tensor([0, 0, 1, 1, 2, 2])
    gain = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0])
    qlen = torch.tensor([5.0, 5.0, 6.0, 6.0, 7.0, 7.0])
    bound = torch.tensor([0.3, 0.1, 0.6, 0.2, 0.5, 0.4])
    (c,) = information_check([_cell("a", 4, gain, bound, qt=qt, qlen=qlen)], num_bootstrap=0).per_cell
    assert c.gain_type_share == pytest.approx(1.0) and c.gain_query_tokens_spearman == pytest.approx(1.0)
    # values (0, 2 | 2, 4): total SS 8, within-group SS 2 + 2 -> eta^2 = 1 - 4 / 8
    (c,) = information_check(
        [_cell("a", 4, torch.tensor([0.0, 2.0, 2.0, 4.0]), torch.randn(4), qt=torch.tensor([0, 0, 1, 1]))], num_bootstrap=0
    ).per_cell
    assert c.gain_type_share == pytest.approx(0.5)


def test_gain_saturation_counts_questions_whose_gain_stopped_growing():
    b = torch.zeros(4)
    cells = [
        _cell("a", 4, torch.tensor([1.0, 1.0, 1.0, 1.0]), b),
        _cell("a", 16, torch.tensor([1.0, 2.0, 3.0, 1.0]), b),
        _cell("a", 8, torch.tensor([1.0, 2.0, 2.0, 1.0 + 1e-13]), b),  # the next largest budget
        _cell("b", 4, torch.ones(4), b),
    ]
    assert gain_saturation(cells) == {"a": pytest.approx(0.75)}
    with pytest.raises(ValueError, match="cells"):
        gain_saturation(["a"])


def test_type_breakdown_values():
    gain = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0])
    bound = torch.tensor([0.3, 0.2, 0.1, 1.0, 1.0])
    correct = torch.tensor([True, False, True, True, True])
    qt = torch.tensor([0, 0, 0, 2, 2])
    rows = type_breakdown(_cell("a", 4, gain, bound, correct=correct, qt=qt))
    assert [(r.question_type, r.n) for r in rows] == [(0, 3), (2, 2)]
    assert rows[0].accuracy == pytest.approx(2 / 3) and rows[0].gain == pytest.approx(2.0)
    assert rows[0].bound == pytest.approx(0.2) and rows[0].spearman == pytest.approx(-1.0)
    assert rows[1].gain == pytest.approx(15.0) and math.isnan(rows[1].spearman)  # 2 questions: undefined
    with pytest.raises(ValueError, match="cell"):
        type_breakdown("a")


# ---------------------------------------------------------------------------- the recording loop
def test_record_matches_the_evaluation_pipeline_on_a_micro_vlm():
    from arr_coc.evaluation import build_eval_batches, run_allocation
    from arr_coc.training.task import VQATask
    from arr_coc.training.tokenizer import build_tokenizer
    from tests.training._helpers import micro_vlm

    task = VQATask(seed=3)
    tok = build_tokenizer(task)
    vlm = micro_vlm(0).eval()
    batches = build_eval_batches(task, tok, start=100, size=6, batch_size=6)
    ids = answer_token_ids(task, tok)
    allocs = {"arr_coc": create_allocator("arr_coc"), "random": create_allocator("random", seed=0)}
    rec = record_allocation_information(vlm, allocs, batches, [4, 9], answer_ids=ids)
    assert rec.without_gain == ["random"] and rec.num_answers == len(task.answer_words())
    assert [(c.allocator, c.budget) for c in rec.cells] == [("arr_coc", 4), ("arr_coc", 9)]
    for cell in rec.cells:
        gains, bounds, correct = [], [], []
        for b in batches:
            res = run_allocation(vlm, allocs["arr_coc"], b, cell.budget)
            gains.append(res.out.gain.double())
            logp = torch.log_softmax(res.logits.double()[:, ids], -1)
            pos = torch.tensor([ids.index(int(a)) for a in b["answer"]])
            bounds.append(math.log(len(ids)) + logp.gather(1, pos[:, None])[:, 0])
            correct.append(res.logits.argmax(-1) == b["answer"])
        assert torch.allclose(cell.gain, torch.cat(gains), atol=1e-6)
        assert torch.allclose(cell.bound, torch.cat(bounds), atol=1e-6)
        assert torch.equal(cell.correct, torch.cat(correct))
        assert (cell.bound <= math.log(len(ids)) + 1e-12).all()
        assert (cell.gain >= 0).all() and cell.tokens.max() <= cell.budget
        assert torch.equal(cell.query_tokens, torch.cat([b["question_mask"].sum(1) for b in batches]).double())
    full = torch.cat([
        barber_agakov_bound(vlm(b["pixels"], b["question_ids"], b["question_mask"]), b["answer"], candidates=ids)
        for b in batches
    ])
    assert torch.allclose(rec.full_bound, full, atol=1e-6) and rec.full_correct.shape == (6,)
    with pytest.raises(ValueError, match="budgets"):
        record_allocation_information(vlm, allocs, batches, [0], answer_ids=ids)
    with pytest.raises(ValueError, match="allocators"):
        record_allocation_information(vlm, {"x": "oracle"}, batches, [4])
    with pytest.raises(ValueError, match="batches"):
        record_allocation_information(vlm, allocs, [], [4])


# ---------------------------------------------------------------------------- the entry point
@pytest.mark.slow  # builds, saves and loads a model and runs the entry point (about 10 s idle, minutes on a loaded machine)
def test_information_check_section_writes_the_report(tmp_path):
    """experiments/analysis.py sections=[information_check]: a tiny case on a saved micro VLM,
    one allocator built untrained, one loaded from a saved folder, one without a gain."""
    import importlib.util
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from arr_coc.training.hub import save_allocator
    from tests.training._helpers import micro_vlm

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("analysis_job", root / "experiments" / "analysis.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    micro_vlm(0).save_pretrained(tmp_path / "vlm")
    # a saved folder loads through arr_coc.training.hub (random: no lazy weights, and no gain)
    save_allocator(create_allocator("random", seed=0), tmp_path / "alloc", name="random", config={"seed": 0})
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("analysis", overrides=["sections=[information_check]", "+information_check=default",
                                             f"results_dir={tmp_path / 'results'}"])
    OmegaConf.set_struct(cfg, False)
    cfg.information_check.num_bootstrap = 20
    cfg.information_check.cases = {
        "tiny": {
            "title": "tiny case", "base_vlm": str(tmp_path / "vlm"),
            "task": {"name": "sort_of_clevr", "image_size": 64, "grid": 8}, "task_seed": 3,
            "start": 100, "size": 8, "budgets": [4, 9],
            "allocators": {"arr_coc": {"name": "arr_coc"}, "saved": {"checkpoint": str(tmp_path / "alloc")},
                           "adapter": {"name": "arr_coc_adapter"}},
        }
    }
    paths = job.run(cfg)
    md = paths["information_check"].read_text()
    assert paths["information_check"] == tmp_path / "results" / "information_check.md"
    assert "## tiny case" in md and "Commit:" in md and "Reporting no gain (no rows): saved" in md
    assert "| arr_coc | 9 |" in md and "| adapter | 4 |" in md and "| saved |" not in md
    assert "trained, loaded from" in md and "Pooled over every (allocator, budget, question), 32 rows" in md
    assert "| every allocator x budget | 4 | " in md
    cfg.information_check.cases = {}
    with pytest.raises(ValueError, match="information_check.cases"):
        job.run(cfg)
