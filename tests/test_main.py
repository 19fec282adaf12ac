"""experiments/main.py: a tiny run(cfg) writes the table, CSV, plots and the saved allocator."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import main as main_job  # noqa: E402

from arr_coc.training.hub import load_allocator  # noqa: E402
from tests.training._helpers import micro_vlm, micro_vlm_v2  # noqa: E402


V1 = ("+experiment=v1",)


def _cfg(tmp_path, *extra, v2: bool = False):
    vlm_dir = tmp_path / "vlm"
    if not vlm_dir.exists():
        (micro_vlm_v2(0) if v2 else micro_vlm(0)).save_pretrained(vlm_dir)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "main",
            overrides=[
                f"model_folder={vlm_dir}",
                f"results_dir={tmp_path / 'results'}",
                f"work_dir={tmp_path / 'work'}",
                "name=tiny",
                "command=pytest tiny run",
                "allocators=[full,random,arr_coc]",
                "extra_allocators=null",  # v1's fastv_k1 needs 2 LLM layers; the micro VLM has 1
                "budgets=[4,2]",
                "eval.size=12",
                "eval.batch_size=6",
                "train.steps=2",
                "train.batch_size=4",
                "train.train_size=8",
                "train.allocators=[arr_coc]",
                f"save_allocators={{arr_coc: {tmp_path / 'alloc'}}}",
                "grid_examples=2",
                "progress=false",
                "seeds=[0]",
                *(() if v2 else V1),
                *extra,
            ],
        )


def test_tiny_run_writes_the_table_files(tmp_path):
    out = main_job.run(_cfg(tmp_path))
    files = out["files"]
    for kind in ("md", "csv", "accuracy_png", "recall_png", "allocations_png"):
        assert files[kind].is_file() and files[kind].stat().st_size > 0, kind
    md = files["md"].read_text()
    assert "pytest tiny run" in md and "Commit:" in md and "| allocator | budget | accuracy |" in md
    for name in ("full", "random", "arr_coc", "oracle"):
        assert f"| {name} |" in md
    lines = files["csv"].read_text().splitlines()
    assert lines[0] == "# command: pytest tiny run" and lines[1].startswith("# commit:")
    rows = list(csv.DictReader(lines[2:]))
    assert len(rows) == 4 * 2  # (3 allocators + oracle) x 2 budgets, one seed
    by = {(r["allocator"], int(r["budget"])): r for r in rows}
    assert float(by[("full", 4)]["tokens"]) == 64 and float(by[("random", 2)]["tokens"]) == 2
    full_acc = float(by[("full", 2)]["full_accuracy"])
    if full_acc > 0:
        assert float(by[("full", 2)]["retained_pct"]) == pytest.approx(100.0, abs=1e-3)
    # the trained allocator is saved and loads back
    alloc = load_allocator(tmp_path / "alloc")
    assert type(alloc).__name__ == "ArrCocAllocator"


def test_seeds_aggregate_mean_and_spread():
    rows = [
        {"allocator": "a", "budget": 4, "seed": 0, "accuracy": 0.5, "oracle_fit": float("nan")},
        {"allocator": "a", "budget": 4, "seed": 1, "accuracy": 0.7, "oracle_fit": float("nan")},
        {"allocator": "a", "budget": 4, "seed": 2, "accuracy": 0.9, "oracle_fit": float("nan")},
    ]
    (agg,) = main_job.aggregate(rows)
    assert agg["seeds"] == 3 and agg["accuracy"] == pytest.approx(0.7)
    assert agg["accuracy_std"] == pytest.approx(0.2)  # sample std of .5, .7, .9
    assert agg["oracle_fit"] != agg["oracle_fit"]  # NaN stays NaN


def test_ablation_configs_compose_and_unknown_names_are_refused(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        v2 = tuple(sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("v2_*.yaml")))  # every v2 study
        assert {"v2_validation", "v2_trained", "v2_trained_inllm", "v2_price_inllm"} <= set(v2)
        for exp in ("ablation_alpha", "ablation_price", "ablation_pyramid", "ablation_adapter") + v2:
            cfg = compose("main", overrides=[f"+experiment={exp}"])
            specs = main_job.allocator_specs(cfg)
            assert len(specs) >= 4
            for pair in cfg.get("compare") or []:  # every paired comparison names rows the config evaluates
                assert set(pair) <= set(specs), (exp, list(pair))
            if exp.startswith("ablation"):
                assert cfg.name == exp
            elif exp.endswith("_test"):  # run once on the test split, after a choice made on validation
                assert cfg.data.task_seed == 2000003 and cfg.data.task == "clutter" and not cfg.train.allocators
            else:  # every other v2 study reads the validation split, never the test split
                assert cfg.data.task_seed == 1000003 and cfg.data.task == "clutter"
            for spec in specs.values():  # every variant builds
                main_job.build_allocator(spec, 0)
        cfg = compose("main", overrides=["allocators=[full,nonsense]"])
    with pytest.raises(ValueError, match="allocators"):
        main_job.allocator_specs(cfg)
    with pytest.raises(ValueError, match="model_folder"):
        main_job.run(_cfg(tmp_path, f"model_folder={tmp_path / 'missing'}"))


def test_rows_marked_reference_are_controls_not_competitors():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("main")
        specs = main_job.allocator_specs(cfg)
        assert specs["no_visual_after_layer1"]["reference"] is True and specs["fastv"]["reference"] is False
        bad = compose("main", overrides=["+extra_allocators.x={name: random, reference: 1}"])
    with pytest.raises(ValueError, match="reference"):
        main_job.allocator_specs(bad)
    agg = [
        {"allocator": "control", "budget": 4, "accuracy": 0.95, "retained_pct": 99.0},
        {"allocator": "fastv", "budget": 4, "accuracy": 0.9, "retained_pct": 95.0},
        {"allocator": "arr_coc", "budget": 4, "accuracy": 0.8, "retained_pct": 85.0},
    ]
    assert "best row `control`" in main_job.verdict(agg, [4])
    text = main_job.verdict(agg, [4], references=("full", "oracle", "control"))
    assert "best row `fastv` 0.900" in text and "rank 2 of 2" in text


def test_weights_from_evaluates_a_trained_rows_parameters_under_other_arguments(tmp_path):
    out = main_job.run(_cfg(tmp_path, "allocators=[full,arr_coc]", "budgets=[16]", "plots=false", "benchmark_allocators=null",
                            "compare=null", "+extra_allocators.priced={name: arr_coc, kwargs: {price: 1000.0}, weights_from: arr_coc}",
                            v2=True))
    md = out["files"]["md"].read_text()
    assert "`priced` (weights of `arr_coc`, final loss" in md
    rows = {(r["allocator"], r["budget"]): r for r in out["table"]}
    # the same weights under a price no gain reaches: no token kept, where arr_coc keeps its budget
    assert rows[("arr_coc", 16)]["tokens"] == 16 and rows[("priced", 16)]["tokens"] == 0
    assert "### Trained allocators" in md and "| priced | 16 (1/16) |" in md.split("### Trained allocators")[1]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for extra, match in [
            ("+extra_allocators.x={name: arr_coc, weights_from: nothing}", "names 'nothing'"),
            ("+extra_allocators.x={name: arr_coc, weights_from: x}", "names 'x'"),
            ("+extra_allocators.x={name: arr_coc_adapter, weights_from: arr_coc}", "cannot take the weights"),
            ("+extra_allocators.x={name: arr_coc, weights_from: arr_coc, train: true}", "cannot also train"),
        ]:
            with pytest.raises(ValueError, match=match):
                main_job.allocator_specs(compose("main", overrides=[extra]))
    # a row whose source is not trained in the run is refused before anything is evaluated
    with pytest.raises(ValueError, match="does not train"):
        main_job.run(_cfg(tmp_path, "allocators=[full,arr_coc]", "budgets=[16]", "plots=false", "benchmark_allocators=null",
                          "train.allocators=[]", "compare=null", "+extra_allocators.priced={name: arr_coc, weights_from: arr_coc}", v2=True))


def test_verdict_says_when_arr_coc_is_not_the_best_row():
    agg = [
        {"allocator": "arr_coc", "budget": 7, "accuracy": 0.6, "retained_pct": 90.0},
        {"allocator": "divprune", "budget": 7, "accuracy": 0.65, "retained_pct": 97.5},
        {"allocator": "random", "budget": 7, "accuracy": 0.4, "retained_pct": 60.0},
        {"allocator": "tome", "budget": 7, "accuracy": 0.5, "retained_pct": 75.0},
        {"allocator": "oracle", "budget": 7, "accuracy": 0.9, "retained_pct": 135.0},  # not a competitor
        {"allocator": "full", "budget": 7, "accuracy": 0.667, "retained_pct": 100.0},
    ]
    text = main_job.verdict(agg, [7])
    assert "rank 2 of 4" in text and "best row `divprune` 0.650" in text
    assert "strongest published baseline `divprune` 97.5%" in text


def test_tiny_v2_run_reports_intervals_and_paired_tests(tmp_path):
    """Benchmark v2's layout: the clutter task, references / training-free / trained tables, a
    95% interval per row and, per budget, a paired test of arr_coc against the best other row."""
    # v2's in-LLM rows prune after layer 1; the micro VLM has one LLM layer
    out = main_job.run(_cfg(tmp_path, "allocators=[full,random,pool,arr_coc]", "budgets=[16]", "plots=false",
                            "benchmark_allocators=null", "compare=[[arr_coc,random],[pool,random]]", v2=True))
    md = out["files"]["md"].read_text()
    # compare: one paired test per named pair and budget, the same statistics as the headline test
    assert [(c["ours"], c["other"]) for c in out["compared"]] == [("arr_coc", "random"), ("pool", "random")]
    assert "## Paired comparisons (`compare`)" in md and "| 16 | `pool` | `random` |" in md
    assert out["compared"][0]["lo"] <= out["compared"][0]["diff"] <= out["compared"][0]["hi"]
    assert "### References" in md and "### Training-free allocators" in md and "### Trained allocators" in md
    assert "## Paired tests" in md and "95% interval" in md
    (p,) = out["paired"]
    assert p["ours"] == "arr_coc" and p["other"] in ("random", "pool") and p["n"] == 12
    assert 0.0 <= p["p_mcnemar"] <= 1.0 and p["lo"] <= p["diff"] <= p["hi"]
    rows = {(r["allocator"], r["budget"]): r for r in out["table"]}
    for key in (("random", 16), ("oracle", 16), ("arr_coc", 16)):
        assert rows[key]["ci_lo"] <= rows[key]["accuracy"] <= rows[key]["ci_hi"]
    text = out["files"]["csv"].read_text()
    for col in ("acc_compare", "acc_exists", "acc_count", "recall"):
        assert col in text.splitlines()[2]


def test_v2_576_config_runs_the_base_vlm_on_24_by_24_patches(tmp_path):
    """+experiment=v2_576: the 256-token base VLM's vision tower run at 192 px (576 candidates)."""
    out = main_job.run(_cfg(tmp_path, "+experiment=v2_576", "allocators=[full,random]", "budgets=[36]",
                            "plots=false", "train.enabled=false", "benchmark_allocators=null", "compare=null", v2=True))
    rows = {(r["allocator"], r["budget"]): r for r in out["table"]}
    assert rows[("full", 36)]["tokens"] == 576 and rows[("random", 36)]["tokens"] == 36
    assert rows[("oracle", 36)]["recall"] > rows[("random", 36)]["recall"]
    with pytest.raises(ValueError, match="data.grid"):
        main_job.run(_cfg(tmp_path, "+experiment=v2_576", "data.grid=16", "allocators=[full]", v2=True))


def test_tokens_table_lists_adaptive_rows_beside_fixed_ones():
    types = ["shape", "count"]

    def row(name, budget, tokens, **per):
        return {"allocator": name, "budget": budget, "accuracy": 0.5, "tokens": tokens, **per}

    fixed = [
        row("random", 16, 16.0, tokens_shape=16.0, acc_shape=0.4, tokens_count=16.0, acc_count=0.3),
        row("pool", 16, 9.0, tokens_shape=9.0, acc_shape=0.2, tokens_count=9.0, acc_count=0.4),  # under budget, not adaptive
    ]
    assert main_job.tokens_table(fixed, [16], types) == ""  # no row spends differently per type: no table
    adaptive = row("price_learned", 16, 9.0, tokens_shape=4.0, acc_shape=0.9, tokens_count=14.0, acc_count=0.5)
    table = main_job.tokens_table(fixed + [adaptive], [16], types)
    assert "| price_learned | 16 | 9.0 | 4.0 / 0.900 | 14.0 / 0.500 |" in table
    assert "| random | 16 | 16.0 |" in table


def test_tokens_per_type_figure_has_a_panel_per_type_and_the_fixed_frontier(tmp_path):
    types = ["shape", "colour", "count"]

    def row(name, budget, spent, acc):
        r = {"allocator": name, "budget": budget, "accuracy": float(sum(acc) / 3), "tokens": float(sum(spent) / 3)}
        r.update({f"tokens_{t}": v for t, v in zip(types, spent)})
        r.update({f"acc_{t}": v for t, v in zip(types, acc)})
        return r

    agg = [row("arr_coc_host", k, (k, k, k), (0.9, 0.8, 0.7)) for k in (4, 8, 16)]
    agg.append(row("host_price_05", 16, (3.0, 5.0, 11.0), (0.9, 0.85, 0.7)))
    assert main_job.adaptive_rows(agg, types) == {"host_price_05"}
    import matplotlib.image as mpimg

    path = main_job.plot_tokens_per_type(agg, types, tmp_path / "t.png", caption="c")
    img = mpimg.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 3 * 100  # three panels side by side
    # the frontier drawn beside the adaptive row: its compared partner and the references present
    agg += [row("oracle", 4, (4, 4, 4), (1.0, 1.0, 1.0)), row("full", 4, (256, 256, 256), (1.0, 1.0, 1.0)),
            row("fastv", 4, (4, 4, 4), (0.9, 0.9, 0.9)), row("control", 4, (0, 0, 0), (0.5, 0.5, 0.5))]
    pairs = [["host_price_05", "arr_coc_host"], ["fastv", "oracle"]]
    refs = ("full", "oracle", "control", "absent")
    assert main_job.tokens_frontier(agg, types, pairs, refs) == ["arr_coc_host", "control", "oracle"]
    assert main_job.tokens_frontier(agg, types, [["fastv", "oracle"]], refs) is None  # no pair names it: every row


def test_v2_ships_cdpruners_released_sign_and_v1_keeps_its_rows():
    """The default (v2) evaluates CDPruner with the released code's sign, and the paper's sign as a
    row of its own; v1 and the ablations built on it keep their rows (the class default)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        v2 = main_job.allocator_specs(compose("main"))
        v1 = main_job.allocator_specs(compose("main", overrides=["+experiment=v1"]))
        abl = main_job.allocator_specs(compose("main", overrides=["+experiment=ablation_alpha"]))
    assert v2["cdpruner"]["kwargs"] == {"negate_relevance": True}
    assert v2["cdpruner_paper_sign"]["kwargs"] == {"negate_relevance": False}
    assert v1["cdpruner"]["kwargs"] == {} and "cdpruner_paper_sign" not in v1 and "fastv_k1" in v1
    assert "cdpruner" not in abl and "alpha_0" in abl


def test_seed_rows_makes_a_rows_initial_weights_independent_of_the_rows_before_it():
    spec = {"name": "arr_coc_host_trained", "kwargs": {"relational": True, "relation_geometry": True, "anchor_query": True}}
    other = {"name": "arr_coc_host_trained", "kwargs": {"relational": True}}

    def weights(specs, seed_rows):
        alloc = main_job.build_allocators(specs, 0, seed_rows=seed_rows)["row"]
        return {k: v.detach().clone() for k, v in alloc.named_parameters() if not torch.nn.parameter.is_lazy(v)}

    alone = weights({"row": spec}, True)
    after = weights({"first": other, "row": spec}, True)
    assert alone and alone.keys() == after.keys()
    assert all(torch.equal(alone[k], after[k]) for k in alone)
    shared = weights({"first": other, "row": spec}, False)  # one manual_seed: the first row moved the stream
    assert any(not torch.equal(alone[k], shared[k]) for k in alone)
    assert all(torch.equal(alone[k], v) for k, v in weights({"row": spec}, False).items())  # first row: the same
    # seed_alone: that row alone is seeded, in a table built without seed_rows
    alone_row = weights({"first": other, "row": {**spec, "seed_alone": True}}, False)
    assert all(torch.equal(alone[k], alone_row[k]) for k in alone)


def test_seed_alone_must_be_a_bool():
    cfg = OmegaConf.create({"allocators": [], "benchmark_allocators": {"row": {"name": "random", "seed_alone": "yes"}}})
    with pytest.raises(ValueError, match="seed_alone"):
        main_job.allocator_specs(cfg)
