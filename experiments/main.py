"""The main job (``make run``): train the ARR-COC modules on the frozen base VLM, then evaluate
every registered allocator and the oracle at budgets of 1/4, 1/9 and 1/18 of the visual
tokens, and write one table, plots and an allocation image grid under experiments/results/.

```bash
python experiments/main.py                                   # the headline run (1 seed)
python experiments/main.py seeds=[0,1,2]                     # mean and spread over 3 seeds
python experiments/main.py +experiment=ablation_alpha        # an ablation (conf/experiment/ablation_*.yaml)
python experiments/main.py model_folder=experiments/runs/x/best train.steps=50
```

Steps (each with a progress bar):

1. load the base VLM (``model_folder``: ``config.json`` + ``model.safetensors``);
2. per seed, train the allocators named in ``train.allocators`` that have trainable
   parameters (stage 2, :class:`arr_coc.training.module.ARRCOCModule`, ``train.steps``
   steps) and save those of the first seed (``save_allocators``: label -> folder, loadable
   with :func:`arr_coc.training.hub.load_allocator`);
3. evaluate every allocator (and the oracle) at every budget on a fixed held-out set
   (:func:`arr_coc.evaluation.evaluate_allocators`);
4. write ``{name}.md`` (the table, by question type, the oracle's fit rate, command, commit),
   ``{name}.csv`` (every metric per allocator x budget x seed), ``{name}_accuracy.png``,
   ``{name}_recall.png`` and ``{name}_allocations.png`` under ``results_dir``.

``run(cfg)`` is the testable function; ``main`` is the ``@hydra.main`` around it.
"""

from __future__ import annotations

import csv
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "conf")
log = logging.getLogger(__name__)

# columns of the headline table: (row key, header)
TABLE_COLUMNS = (
    ("accuracy", "accuracy"),
    ("ci", "95% interval"),
    ("retained_pct", "% of full"),
    ("recall", "relevance recall"),
    ("tokens", "tokens used"),
    ("alloc_ms", "alloc ms / example"),
)
CATEGORY_COLUMNS = ("acc_single_object", "acc_relational", "acc_counting")
# rows that are references, not allocators
REFERENCE_ROWS = ("full", "oracle")
# the published methods among the rows (same harness): the "strongest published baseline" of each
# budget is the best of these, in-LLM methods (fastv, sparsevlm) and both CDPruner signs included
PUBLISHED_BASELINES = (
    "cdpruner", "cdpruner_paper_sign", "cls_attention", "divprune", "fastv", "fastv_k1", "sparsevlm", "tome", "visionzip",
)


def _container(node: Any) -> dict[str, Any]:
    """A config node (or None / a plain dict) as a plain dict."""
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return dict(OmegaConf.to_container(node, resolve=True))
    return dict(node)


def _path(p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else ROOT / p


# ---------------------------------------------------------------------------- allocators
def allocator_specs(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """label -> {"name": registry name, "kwargs": {...}} for every allocator to evaluate.

    ``cfg.allocators``: null (every registered allocator with its defaults) or a list of
    registry names; ``cfg.benchmark_allocators`` (the benchmark's own rows, e.g. v2's CDPruner
    signs) and then ``cfg.extra_allocators`` (ablation variants): label -> {name, kwargs, train,
    reference, weights_from, seed_alone}; a label that is a registered name replaces that row.
    ``reference: true`` reports the row as a reference (a control beside full and the oracle), not a
    ranked allocator. ``seed_alone: true`` builds the row right after ``torch.manual_seed(seed)``, as
    ``seed_rows`` does for every row, so its initial weights do not depend on the rows before it (a
    row added to a table made without ``seed_rows`` reproduces the file where it was chosen).
    ``weights_from: <label>`` evaluates the parameters that row ``<label>`` (same registry name,
    trained in this run) learned under other inference-time arguments (a price, a weight), so a
    choice among them is made on one trained module instead of one training per variant.
    """
    from arr_coc.allocators import list_allocators

    names = list_allocators() if cfg.get("allocators") is None else list(cfg.allocators)
    known = set(list_allocators())
    specs: dict[str, dict[str, Any]] = {}
    for n in names:
        if n not in known:
            raise ValueError(f"allocators: unknown allocator {n!r}; known: {sorted(known)}")
        specs[n] = {"name": n, "kwargs": {}, "reference": False}
    for key in ("benchmark_allocators", "extra_allocators"):
        for label, spec in _container(cfg.get(key)).items():
            if not isinstance(spec, dict) or spec.get("name") not in known:
                raise ValueError(f"{key}.{label}: expected {{name: <registered>, kwargs: {{...}}}}, got {spec!r}")
            for flag in ("reference", "seed_alone"):
                if not isinstance(spec.get(flag, False), bool):
                    raise ValueError(f"{key}.{label}.{flag}: expected a bool, got {spec.get(flag)!r}")
            specs[label] = {"name": spec["name"], "kwargs": dict(spec.get("kwargs") or {}), "train": spec.get("train"),
                            "reference": spec.get("reference", False), "weights_from": spec.get("weights_from"),
                            "seed_alone": spec.get("seed_alone", False)}
    for label, spec in specs.items():
        src = spec.get("weights_from")
        if src is None:
            continue
        if src not in specs or specs[src].get("weights_from") is not None or src == label:
            raise ValueError(f"weights_from: {label!r} names {src!r}, expected another row's label that has its own weights")
        if specs[src]["name"] != spec["name"]:
            raise ValueError(f"weights_from: {label!r} ({spec['name']}) cannot take the weights of {src!r} ({specs[src]['name']})")
        if spec.get("train"):
            raise ValueError(f"weights_from: {label!r} takes {src!r}'s weights, so it cannot also train (train: {spec['train']!r})")
    return specs


def reference_rows(specs: Mapping[str, Mapping[str, Any]]) -> tuple[str, ...]:
    """full, the oracle, and the labels whose spec says ``reference: true`` (controls)."""
    return (*REFERENCE_ROWS, *(lab for lab, spec in specs.items() if spec.get("reference")))


def build_allocator(spec: Mapping[str, Any], seed: int):
    from arr_coc.allocators import create_allocator

    kwargs = dict(spec.get("kwargs") or {})
    if spec["name"] == "random":
        kwargs.setdefault("seed", seed)
    if "levels" in kwargs:
        kwargs["levels"] = tuple(kwargs["levels"])
    return create_allocator(spec["name"], **kwargs)


def build_allocators(specs: Mapping[str, Mapping[str, Any]], seed: int, *, seed_rows: bool) -> dict[str, Any]:
    """label -> allocator for one seed. ``seed_rows``: seed torch before each row, so a row's
    initial weights depend on its spec and the seed alone; otherwise once before all of them, so
    they also depend on the rows built before it (the behaviour before ``seed_rows`` existed),
    except the rows whose spec says ``seed_alone: true``."""
    torch.manual_seed(seed)
    allocators = {}
    for label, spec in specs.items():
        if seed_rows or spec.get("seed_alone", False):
            torch.manual_seed(seed)
        allocators[label] = build_allocator(spec, seed)
    return allocators


def train_allocator(vlm, allocator, cfg: DictConfig, *, seed: int, overrides: Mapping[str, Any] | None = None):
    """Stage 2: ``cfg.train.steps`` optimiser steps of :class:`ARRCOCModule` (allocator only).

    ``overrides`` (per label, ``cfg.train.overrides``): steps, batch_size, budget, lr, loss_weights.

    Returns the trained allocator (eval mode) and the last training loss, or None when the
    allocator has no trainable parameters.
    """
    import lightning as L
    from functools import partial

    from arr_coc.training.datamodule import EmbeddedVQADataModule
    from arr_coc.training.module import ARRCOCModule
    from arr_coc.training.tokenizer import build_tokenizer

    t = cfg.train
    over = dict(overrides or {})
    lr = float(over.get("lr", t.lr))
    weights = _container(t.loss_weights)
    weights.update(over.get("loss_weights", {}) or {})
    L.seed_everything(seed, workers=True, verbose=False)
    task = build_eval_task(cfg, int(cfg.train.get("task_seed", cfg.data.task_seed)))
    dm = EmbeddedVQADataModule(
        task, build_tokenizer(task), train_size=int(t.train_size), val_size=0, test_size=0,
        batch_size=int(over.get("batch_size", t.batch_size)), seed=seed,
    )
    module = ARRCOCModule(
        vlm, allocator, optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.0),
        budget=int(over.get("budget", t.budget)), loss_weights=weights, question_types=dm.question_types,
    )
    if not module.trainable_parameters():
        return None
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=int(over.get("steps", t.steps)), max_epochs=-1, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=bool(cfg.progress), gradient_clip_val=1.0, default_root_dir=str(_path(cfg.work_dir)),
    )
    trainer.fit(module, datamodule=dm)
    allocator.eval()
    return float(trainer.callback_metrics.get("train/loss", float("nan")))


def build_eval_task(cfg: DictConfig, seed: int):
    """The embedded task named by ``cfg.data`` (``task``: clutter | sort_of_clevr) with ``seed``."""
    from arr_coc.training.tasks import build_task

    name = str(cfg.data.get("task", "sort_of_clevr"))
    spec = {"name": name, "image_size": int(cfg.data.image_size), "grid": int(cfg.data.grid)}
    return build_task(spec, seed)


# ---------------------------------------------------------------------------- aggregation
def aggregate(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of several seeds -> one row per (allocator, budget): mean of every metric and
    ``<metric>_std`` (sample standard deviation over seeds; 0 with one seed), ``seeds``."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["allocator"], int(r["budget"])), []).append(r)
    out = []
    for (name, k), rs in groups.items():
        row: dict[str, Any] = {"allocator": name, "budget": k, "seeds": len(rs)}
        for key in rs[0]:
            if key in ("allocator", "budget", "seed"):
                continue
            vals = torch.tensor([float(r[key]) for r in rs], dtype=torch.float64)
            ok = ~torch.isnan(vals)
            row[key] = float(vals[ok].mean()) if ok.any() else float("nan")
            row[f"{key}_std"] = float(vals[ok].std()) if int(ok.sum()) > 1 else 0.0
        out.append(row)
    return out


def _fmt(row: Mapping[str, Any], key: str, digits: int) -> str:
    v = row.get(key, float("nan"))
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    s = f"{v:.{digits}f}"
    std = row.get(f"{key}_std", 0.0)
    if row.get("seeds", 1) > 1 and std and not math.isnan(std):
        s += f" ± {std:.{digits}f}"
    return s


def _ci(row: Mapping[str, Any]) -> str:
    lo, hi = row.get("ci_lo"), row.get("ci_hi")
    if lo is None or hi is None or math.isnan(lo):
        return "-"
    return f"[{lo:.3f}, {hi:.3f}]"


def add_intervals(agg: list[dict[str, Any]], correct: Mapping[tuple[str, int], list[torch.Tensor]], budgets) -> None:
    """Add ``ci_lo`` / ``ci_hi`` (bootstrap over questions and seeds) to every aggregated row."""
    from arr_coc.stats import bootstrap_interval

    for r in agg:
        key = (r["allocator"], int(r["budget"]))
        if key in correct:
            r["ci_lo"], r["ci_hi"] = bootstrap_interval(torch.stack(correct[key]))


def _paired(correct: Mapping[tuple[str, int], list[torch.Tensor]], a: str, b: str, k: int) -> dict[str, Any]:
    """Row ``a`` vs row ``b`` at budget k on the same questions: paired bootstrap and McNemar."""
    from arr_coc.stats import mcnemar, paired_bootstrap

    ca, cb = torch.stack(correct[(a, k)]), torch.stack(correct[(b, k)])
    d, (lo, hi), p = paired_bootstrap(ca, cb)
    nb, nc, p_mc = mcnemar(ca[0], cb[0])
    return {"budget": k, "ours": a, "other": b, "diff": d, "lo": lo, "hi": hi,
            "p_bootstrap": p, "ours_only": nb, "other_only": nc, "p_mcnemar": p_mc,
            "n": int(ca.shape[1]), "seeds": int(max(ca.shape[0], cb.shape[0]))}


def paired_tests(
    agg: Sequence[Mapping[str, Any]], correct: Mapping[tuple[str, int], list[torch.Tensor]], budgets, *, trained=(),
    references: Sequence[str] = REFERENCE_ROWS,
) -> list[dict[str, Any]]:
    """Per budget: the best ``arr_coc*`` row vs the strongest other non-reference row."""
    out = []
    for k in budgets:
        at = [r for r in agg if r["budget"] == k and r["allocator"] not in references]
        ours = [r for r in at if r["allocator"].startswith("arr_coc")]
        others = [r for r in at if not r["allocator"].startswith("arr_coc")]
        if not ours or not others:
            continue
        a = max(ours, key=lambda r: r["accuracy"])
        b = max(others, key=lambda r: r["accuracy"])
        out.append(_paired(correct, a["allocator"], b["allocator"], k))
    return out


def compare_tests(
    pairs: Sequence[Sequence[str]], correct: Mapping[tuple[str, int], list[torch.Tensor]], budgets
) -> list[dict[str, Any]]:
    """``cfg.compare``: for each [a, b] of evaluated row labels, the paired tests at every budget."""
    out = []
    for pair in pairs:
        if len(pair) != 2 or any((lab, budgets[0]) not in correct for lab in pair):
            known = sorted({lab for lab, _ in correct})
            raise ValueError(f"compare: expected pairs [a, b] of evaluated rows {known}, got {list(pair)!r}")
        out.extend(_paired(correct, str(pair[0]), str(pair[1]), k) for k in budgets)
    return out


def paired_table(paired: Sequence[Mapping[str, Any]], heads: tuple[str, str] = ("best arr_coc", "strongest other")) -> str:
    from arr_coc.reporting import markdown_table

    if not paired:
        return "(no arr_coc row and other allocator to compare)"
    body = [
        [p["budget"], f"`{p['ours']}`", f"`{p['other']}`", f"{p['diff']:+.3f}", f"[{p['lo']:+.3f}, {p['hi']:+.3f}]",
         f"{p['p_bootstrap']:.3g}", f"{p['ours_only']} / {p['other_only']}", f"{p['p_mcnemar']:.3g}", p["n"], p["seeds"]]
        for p in paired
    ]
    return markdown_table(
        ["budget", heads[0], heads[1], "difference", "95% interval", "p (bootstrap)",
         "only ours / only other right", "p (McNemar)", "questions", "seeds"], body)


def headline_table(agg: Sequence[Mapping[str, Any]], budgets: Sequence[int], num_tokens: int) -> str:
    from arr_coc.reporting import markdown_table

    order = {k: i for i, k in enumerate(budgets)}
    rows = sorted(agg, key=lambda r: (order.get(r["budget"], 99), -r["accuracy"]))
    body = []
    for r in rows:
        body.append(
            [r["allocator"], f"{r['budget']} (1/{num_tokens / max(r['budget'], 1):.0f})"]
            + [_fmt(r, "accuracy", 3), _ci(r), _fmt(r, "retained_pct", 1), _fmt(r, "recall", 3), _fmt(r, "tokens", 1),
               _fmt(r, "alloc_ms", 3)]
        )
    return markdown_table(["allocator", "budget"] + [h for _, h in TABLE_COLUMNS], body)


def type_table(agg: Sequence[Mapping[str, Any]], budgets: Sequence[int], question_types: Sequence[str]) -> str:
    from arr_coc.reporting import markdown_table

    order = {k: i for i, k in enumerate(budgets)}
    rows = sorted(agg, key=lambda r: (order.get(r["budget"], 99), -r["accuracy"]))
    keys = [f"acc_{t}" for t in question_types] + list(CATEGORY_COLUMNS)
    body = [[r["allocator"], r["budget"]] + [_fmt(r, k, 3) for k in keys] for r in rows]
    return markdown_table(["allocator", "budget"] + [k.removeprefix("acc_") for k in keys], body)


def tokens_table(agg: Sequence[Mapping[str, Any]], budgets: Sequence[int], question_types: Sequence[str]) -> str:
    """Tokens used per question type beside accuracy per type, for the rows whose spending differs
    between question types by more than half a token (an adaptive budget: arr_coc's price; not a
    pooled grid that is merely smaller than its budget) and, as the fixed-budget comparison,
    random, full, the oracle and the arr_coc rows at the same budgets; empty when no row adapts."""
    from arr_coc.reporting import markdown_table

    adaptive = adaptive_rows(agg, question_types)
    if not adaptive:
        return ""
    order = {k: i for i, k in enumerate(budgets)}
    rows = sorted(
        (r for r in agg if r["allocator"] in adaptive | {"random", "full", "oracle"} or r["allocator"].startswith("arr_coc")),
        key=lambda r: (order.get(r["budget"], 99), r["allocator"]),
    )
    head = ["allocator", "budget", "tokens"] + [f"{t}: tokens / acc" for t in question_types]
    body = [
        [r["allocator"], r["budget"], _fmt(r, "tokens", 1)]
        + [f"{_fmt(r, f'tokens_{t}', 1)} / {_fmt(r, f'acc_{t}', 3)}" for t in question_types]
        for r in rows
    ]
    return markdown_table(head, body)


def adaptive_rows(agg: Sequence[Mapping[str, Any]], question_types: Sequence[str]) -> set[str]:
    """Labels of the rows whose mean spending differs between question types by > 0.5 tokens."""

    def spread(r: Mapping[str, Any]) -> float:
        spent = [r.get(f"tokens_{t}", float("nan")) for t in question_types]
        spent = [v for v in spent if v == v]
        return max(spent) - min(spent) if spent else 0.0

    return {r["allocator"] for r in agg if spread(r) > 0.5}


def tokens_frontier(
    agg: Sequence[Mapping[str, Any]], question_types: Sequence[str], pairs: Sequence[Sequence[str]],
    references: Sequence[str] = REFERENCE_ROWS,
) -> list[str] | None:
    """The fixed-budget rows the tokens figure draws beside the adaptive rows: the rows a
    ``compare`` pair sets against an adaptive row, plus the references but full (the oracle, the
    controls); None (every row) when no pair names an adaptive row."""
    adaptive = adaptive_rows(agg, question_types)
    partners = {b for a, b in pairs if a in adaptive} | {a for a, b in pairs if b in adaptive}
    if not partners - adaptive:
        return None
    present = {r["allocator"] for r in agg}
    return sorted(((partners - adaptive) | set(references)) & present - {"full"})


def plot_tokens_per_type(
    agg: Sequence[Mapping[str, Any]], question_types: Sequence[str], path: Path, *, caption: str,
    fixed: Sequence[str] | None = None,
) -> Path:
    """One panel per question type: accuracy against mean tokens kept. The adaptive rows
    (:func:`adaptive_rows`) are points, one per budget cap; ``fixed`` rows (default: every
    non-adaptive row but full, random and pool; the oracle dotted grey) are curves over their
    budgets, the fixed-budget frontier. The token axis is log-scaled above one token and linear
    below it (a price that keeps nothing is drawn at 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adaptive = adaptive_rows(agg, question_types)
    if fixed is None:
        fixed = sorted({r["allocator"] for r in agg} - adaptive - {"full", "random", "pool"})
    n = len(question_types)
    cols = min(4, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 3.0 * rows_n), squeeze=False)
    markers = "osD^vP*X"
    for ax, t in zip(axes.flat, question_types):
        for name in fixed:
            rs = sorted((r for r in agg if r["allocator"] == name), key=lambda r: r[f"tokens_{t}"])
            style = dict(color="grey", ls=":", marker="s", ms=3) if name == "oracle" else dict(marker=".")
            ax.plot([r[f"tokens_{t}"] for r in rs], [r[f"acc_{t}"] for r in rs], lw=1.5, label=f"{name} (fixed budgets)",
                    **style)
        for i, name in enumerate(sorted(adaptive)):
            rs = [r for r in agg if r["allocator"] == name]
            ax.scatter([r[f"tokens_{t}"] for r in rs], [r[f"acc_{t}"] for r in rs], marker=markers[i % len(markers)],
                       s=28, label=name, zorder=3)
        ax.set_xscale("symlog", base=2, linthresh=1.0)
        ax.set_xlim(left=0)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("tokens kept (mean)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower right", ncol=1)
    fig.text(0.01, 0.005, caption, fontsize=6, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def verdict(
    agg: Sequence[Mapping[str, Any]], budgets: Sequence[int], *, ours: str = "arr_coc",
    references: Sequence[str] = REFERENCE_ROWS,
) -> str:
    """Plain sentences: at each budget, the best non-reference row, and where ``ours`` stands."""
    lines = []
    for k in budgets:
        at = [r for r in agg if r["budget"] == k and r["allocator"] not in references]
        if not at:
            continue
        best = max(at, key=lambda r: r["accuracy"])
        me = next((r for r in at if r["allocator"] == ours), None)
        if me is None:
            lines.append(f"- budget {k}: best row `{best['allocator']}` ({best['accuracy']:.3f}).")
            continue
        rank = 1 + sum(r["accuracy"] > me["accuracy"] for r in at)
        line = (
            f"- budget {k}: `{ours}` {me['accuracy']:.3f} ({me['retained_pct']:.1f}% of full), rank {rank} of {len(at)};"
            f" best row `{best['allocator']}` {best['accuracy']:.3f} ({best['retained_pct']:.1f}%)"
        )
        published = [r for r in at if r["allocator"] in PUBLISHED_BASELINES]
        if published:
            strong = max(published, key=lambda r: r["accuracy"])
            line += f"; strongest published baseline `{strong['allocator']}` {strong['retained_pct']:.1f}%"
        lines.append(line + ".")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- outputs
def write_csv(rows: Sequence[Mapping[str, Any]], path: Path, *, command: str, commit: str) -> Path:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        f.write(f"# command: {command}\n# commit: {commit}\n")
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


def plot_vs_budget(
    agg: Sequence[Mapping[str, Any]], key: str, ylabel: str, path: Path, *, num_tokens: int, caption: str
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    names = sorted({r["allocator"] for r in agg})
    for name in names:
        rs = sorted((r for r in agg if r["allocator"] == name), key=lambda r: r["budget"])
        if name == "full":
            ax.axhline(rs[0][key], color="black", ls="--", lw=1, label=f"full ({num_tokens} tokens)")
            continue
        xs = [r["budget"] for r in rs]
        ys = [r[key] for r in rs]
        es = [r.get(f"{key}_std", 0.0) for r in rs]
        style = dict(lw=2.5, marker="o") if name.startswith("arr_coc") else dict(lw=1.2, marker=".")
        if name == "oracle":
            style = dict(lw=1.5, marker="s", color="grey", ls=":")
        ax.errorbar(xs, ys, yerr=es if any(es) else None, label=name, capsize=2, **style)
    ax.set_xscale("log", base=2)
    budgets = sorted({r["budget"] for r in agg})
    ax.set_xticks(budgets, [f"{k}\n(1/{num_tokens / k:.0f})" for k in budgets])
    ax.set_xlabel("token budget (of %d visual tokens)" % num_tokens)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.text(0.01, 0.005, caption, fontsize=6, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def plot_allocations(
    vlm, allocators: Mapping[str, Any], batch: Mapping[str, torch.Tensor], budget: int, path: Path,
    *, num_examples: int, questions: Sequence[str], caption: str, seed: int = 0,
) -> Path:
    """An image grid: rows = examples, columns = allocators; kept tokens outlined by level
    (fine = lime, 2x2 = orange, 4x4 and coarser = magenta), uncovered patches dimmed, the
    ground-truth relevant patches outlined in red (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from arr_coc.evaluation import run_allocation
    from arr_coc.training.module import coverage_mask

    e = min(num_examples, batch["pixels"].shape[0])
    sub = {k: v[:e] for k, v in batch.items()}
    gh, gw = (vlm.grid, vlm.grid) if isinstance(vlm.grid, int) else vlm.grid
    img_h, img_w = sub["pixels"].shape[-2:]
    ph, pw = img_h / gh, img_w / gw
    names = list(allocators)
    colours = {0: "lime", 1: "orange"}
    fig, axes = plt.subplots(e, len(names), figsize=(1.45 * len(names), 1.7 * e), squeeze=False)
    gen = torch.Generator().manual_seed(seed)
    for j, name in enumerate(names):
        res = run_allocation(vlm, allocators[name], sub, budget, generator=gen)
        cover = coverage_mask(res.positions, res.mask, (gh, gw))  # [E, gh, gw]
        for i in range(e):
            ax = axes[i, j]
            img = sub["pixels"][i].permute(1, 2, 0).clamp(0, 1).clone()
            dim = (~cover[i]).repeat_interleave(int(ph), 0).repeat_interleave(int(pw), 1)
            img[dim] *= 0.35
            ax.imshow(img.numpy(), interpolation="nearest")
            for (r, c, lv), ok in zip(res.positions[i].tolist(), res.mask[i].tolist()):
                if not ok:
                    continue
                s = 2**lv
                hh, ww = min(s, gh - r) * ph, min(s, gw - c) * pw
                ax.add_patch(Rectangle((c * pw - 0.5, r * ph - 0.5), ww, hh, fill=False,
                                       ec=colours.get(lv, "magenta"), lw=1.0 + 0.4 * lv))
            rel = sub["relevance"][i]
            for r, c in rel.nonzero().tolist():
                ax.add_patch(Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, ec="red", lw=0.9, ls="--"))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=7)
            if j == 0:
                q = questions[i]
                ax.set_ylabel(q if len(q) < 34 else q[:32] + "...", fontsize=5.5)
    fig.suptitle(
        f"kept tokens at budget {budget}: fine = lime, 2x2 = orange, 4x4 = magenta; relevant patches red dashed",
        fontsize=8,
    )
    fig.text(0.01, 0.003, caption, fontsize=6, color="grey")
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- the job
def _command(cfg: DictConfig) -> str:
    if cfg.get("command"):
        return str(cfg.command)
    return " ".join(["python experiments/main.py", *sys.argv[1:]])


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, evaluate, write the outputs; returns {"rows": per-seed rows, "table": aggregated
    rows, "files": {kind: path}, "seconds": {step: wall seconds}}."""
    from arr_coc.evaluation import ORACLE, build_eval_batches, evaluate_allocators
    from arr_coc.reporting import commit, environment, write_report
    from arr_coc.training.base_vlm import BaseVLM
    from arr_coc.training.hub import save_allocator
    from arr_coc.training.tokenizer import build_tokenizer

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    budgets = [int(k) for k in cfg.budgets]
    seeds = [int(s) for s in cfg.seeds]
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    folder = _path(cfg.model_folder)
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        raise ValueError(f"model_folder: expected config.json and model.safetensors in {folder} (the base VLM)")
    vlm = BaseVLM.from_pretrained(folder).eval()
    base_note = ""  # which stage-1 state was loaded (the folder may be rewritten while this runs)
    if (folder / "best.json").is_file():
        import json

        best = json.loads((folder / "best.json").read_text())
        base_note = f" (stage-1 step {best.get('step')}, its own val accuracy {best.get('val_acc', float('nan')):.3f})"
    vlm.requires_grad_(False)
    vlm.set_image_size(int(cfg.data.image_size))  # a no-op at the model's own size; v2_576 runs it at 192 px
    if tuple(vlm.grid) != (int(cfg.data.grid), int(cfg.data.grid)):
        raise ValueError(f"data.grid: expected {vlm.grid[0]} for image_size {vlm.image_size} with this base VLM, got {cfg.data.grid}")
    num_tokens = int(vlm.num_patches)
    task = build_eval_task(cfg, int(cfg.data.task_seed))
    question_types = list(task.question_types)
    tok = build_tokenizer(task)
    ev = cfg.eval
    batches = build_eval_batches(task, tok, start=int(ev.start), size=int(ev.size), batch_size=int(ev.batch_size))
    specs = allocator_specs(cfg)
    references = reference_rows(specs)
    train_labels = set(cfg.train.allocators or []) if cfg.train.enabled else set()
    train_labels |= {lab for lab, s in specs.items() if s.get("train") and cfg.train.enabled}
    borrowed = {lab: s["weights_from"] for lab, s in specs.items() if s.get("weights_from") is not None}
    for label, src in borrowed.items():
        if src not in train_labels:
            raise ValueError(f"weights_from: {label!r} names {src!r}, which this run does not train")
    save_to = _container(cfg.get("save_allocators"))
    seconds["load"] = time.perf_counter() - t_start

    rows: list[dict[str, Any]] = []
    correct: dict[tuple[str, int], list[torch.Tensor]] = {}  # (label, budget) -> per seed [Q] 0/1
    train_losses: dict[str, list[float]] = {}
    allocators: dict[str, Any] = {}
    for si, seed in enumerate(seeds):
        allocators = build_allocators(specs, seed, seed_rows=bool(cfg.get("seed_rows", False)))
        t0 = time.perf_counter()
        for label in [lab for lab in specs if lab in train_labels]:
            overrides = _container(cfg.train.get("overrides")).get(label)
            spec_train = specs[label].get("train")
            if isinstance(spec_train, dict):
                overrides = {**(overrides or {}), **spec_train}
            log.info("seed %d: training %s (%s)", seed, label, overrides or "defaults")
            loss = train_allocator(vlm, allocators[label], cfg, seed=seed, overrides=overrides)
            if loss is not None:
                train_losses.setdefault(label, []).append(loss)
            if si == 0 and label in save_to and loss is not None:
                spec = specs[label]
                save_allocator(allocators[label], _path(save_to[label]), name=spec["name"], config=spec["kwargs"])
        seconds["train"] = seconds.get("train", 0.0) + time.perf_counter() - t0
        for label, src in borrowed.items():  # rows that evaluate another row's trained weights
            allocators[label].load_state_dict(allocators[src].state_dict())
            allocators[label].eval()
            train_losses.setdefault(label, []).append(train_losses[src][-1])
        # a deterministic, untrained allocator gives the same answers under every seed: evaluate it once
        evaluated: dict[str, Any] = {
            lab: a for lab, a in allocators.items()
            if si == 0 or lab in train_labels or lab in borrowed or specs[lab]["name"] == "random"
        }
        if cfg.include_oracle:
            evaluated[ORACLE] = ORACLE
        t0 = time.perf_counter()
        per_q: dict[tuple[str, int], torch.Tensor] = {}
        for r in evaluate_allocators(
            vlm, evaluated, batches, budgets, question_types=question_types, seed=seed,
            progress=bool(cfg.progress), per_question=per_q,
        ):
            r["seed"] = seed
            rows.append(r)
        for key, c in per_q.items():
            correct.setdefault(key, []).append(c)
        seconds["evaluate"] = seconds.get("evaluate", 0.0) + time.perf_counter() - t0
    agg = aggregate(rows)
    trained = {lab for lab in train_losses}
    add_intervals(agg, correct, budgets)
    paired = paired_tests(agg, correct, budgets, trained=trained, references=references)
    compared = compare_tests([list(p) for p in (cfg.get("compare") or [])], correct, budgets)

    # ------------------------------------------------------------------ outputs
    out_dir = _path(cfg.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = str(cfg.name)
    command, sha = _command(cfg), commit()
    caption = f"{command}  (commit {sha})"
    files: dict[str, Path] = {}
    t0 = time.perf_counter()
    files["csv"] = write_csv(rows, out_dir / f"{name}.csv", command=command, commit=sha)
    if cfg.plots:
        files["accuracy_png"] = plot_vs_budget(
            agg, "accuracy", "answer accuracy", out_dir / f"{name}_accuracy.png", num_tokens=num_tokens, caption=caption
        )
        files["recall_png"] = plot_vs_budget(
            agg, "recall", "relevance recall", out_dir / f"{name}_recall.png", num_tokens=num_tokens, caption=caption
        )
        if adaptive_rows(agg, question_types):
            files["tokens_png"] = plot_tokens_per_type(
                agg, question_types, out_dir / f"{name}_tokens.png", caption=caption,
                fixed=tokens_frontier(agg, question_types, cfg.get("compare") or [], references),
            )
        grid_allocs = dict(allocators)
        if cfg.include_oracle:
            grid_allocs[ORACLE] = ORACLE
        grid_budget = int(cfg.grid_budget) if cfg.get("grid_budget") is not None else budgets[len(budgets) // 2]
        ds_questions = [task.example(int(ev.start) + i).question for i in range(int(cfg.grid_examples))]
        files["allocations_png"] = plot_allocations(
            vlm, grid_allocs, batches[0], grid_budget, out_dir / f"{name}_allocations.png",
            num_examples=int(cfg.grid_examples), questions=ds_questions, caption=caption, seed=seeds[0],
        )
    seconds["outputs"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    full_acc = rows[0]["full_accuracy"]
    oracle_fit = {r["budget"]: r["oracle_fit"] for r in agg if r["allocator"] == ORACLE}
    parts = [
        f"Base VLM: `{folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}`{base_note}; "
        f"evaluation set: {int(ev.size)} held-out questions of the embedded task (task seed {cfg.data.task_seed}, "
        f"examples {int(ev.start)}..{int(ev.start) + int(ev.size) - 1}); {num_tokens} visual tokens; "
        f"full-token accuracy {full_acc:.3f}.",
        f"Seeds: {seeds} ({'mean ± sample std over seeds' if len(seeds) > 1 else 'one seed: no spread; `seeds=[0,1,2]` for 3'}). "
        f"Trained (stage 2, {cfg.train.steps} steps at budget {cfg.train.budget}, batch {cfg.train.batch_size}"
        f"; per-allocator overrides {_container(cfg.train.get('overrides')) or 'none'}): "
        + (", ".join(f"`{k}` ({'weights of `' + specs[k]['weights_from'] + '`, ' if specs[k].get('weights_from') else ''}"
                     f"final loss {sum(v) / len(v):.3f})" for k, v in train_losses.items()) or "none")
        + ". Every other allocator is parameter-free and used as built.",
        "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + f" ({environment()}).",
        "## Allocator x budget\n\n`alloc ms / example`: the allocator call alone (batch "
        f"{int(ev.batch_size)}), not the ViT or the LLM. `% of full`: accuracy / full-token accuracy. "
        "`95% interval`: percentile bootstrap over the questions and (for trained rows) the training seeds. "
        "`relevance recall`: fraction of the ground-truth relevant patches covered by the kept tokens "
        "(a pooled token covers its region). The oracle reads the ground-truth relevance mask "
        "(relevant fine patches first, random fill): a reference, not an allocator.\n\n"
        + "### References\n\n" + headline_table([r for r in agg if r["allocator"] in references], budgets, num_tokens)
        + "\n\n### Training-free allocators\n\n"
        + headline_table([r for r in agg if r["allocator"] not in references and r["allocator"] not in trained], budgets, num_tokens)
        + (
            "\n\n### Trained allocators (stage 2 on the frozen VLM)\n\n"
            + headline_table([r for r in agg if r["allocator"] in trained], budgets, num_tokens)
            if trained else ""
        ),
        "## Paired tests\n\nAt each budget, the best `arr_coc` row against the strongest other allocator "
        "(references excluded): the accuracy difference with its paired-bootstrap 95% interval and p-value "
        "(questions and seeds resampled together) and the exact McNemar test on the first seed's questions.\n\n"
        + paired_table(paired),
        "## Where each allocator stands\n\n" + verdict(agg, budgets, references=references),
    ]
    if compared:
        parts.insert(-1, "## Paired comparisons (`compare`)\n\nEach pair named in the config, at every budget: "
                     "the first row minus the second, tested as above.\n\n" + paired_table(compared, ("row", "against")))
    if oracle_fit:
        parts.append(
            "## Oracle fit\n\nFraction of questions whose relevant patches all fit within the budget: "
            + ", ".join(f"K = {k}: {v:.3f}" for k, v in sorted(oracle_fit.items(), reverse=True))
            + "."
        )
    parts.append(
        "## Accuracy by question type\n\nsingle_object = shape, colour, side; relational = nearest, compare; "
        "counting = count; existence = exists.\n\n" + type_table(agg, budgets, question_types)
    )
    spent = tokens_table(agg, budgets, question_types)
    if spent:
        parts.append(
            "## Tokens used per question type\n\nRows that spend less than their budget (an adaptive price) "
            "beside the fixed-budget rows: mean tokens kept / accuracy, per question type.\n\n" + spent
        )
    if cfg.plots:
        parts.append(
            "## Figures\n\n"
            + "\n".join(f"![{k}]({p.name})" for k, p in files.items() if k.endswith("png"))
        )
    files["md"] = write_report(name, str(cfg.title), command, "\n\n".join(parts) + "\n", results_dir=out_dir)
    return {"rows": rows, "table": agg, "files": files, "seconds": seconds, "paired": paired, "compared": compared}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="main")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
