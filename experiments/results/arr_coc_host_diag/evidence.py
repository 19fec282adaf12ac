"""Diagnostic for issue 16 goals 1-2 (experiments/results/arr_coc_host_diag/evidence.md): what
``fill="background"`` keeps as evidence. For each allocator and evidence threshold (nats), at each
budget: accuracy, evidence tokens kept per question, their precision (the fraction that are
ground-truth relevant cells) and recall (the fraction of the relevant cells among them), and the
accuracy on the question types that need more than one cell.

The trained row is round 13's module saved by ``v2_trained_mixture_fill`` (``logs/diag/t_gmix_of_ar``,
seed 0: the same weights as the first seed of the test run, whose training never sees the evaluation
split); the training-free row is ``arr_coc_host`` (LLM layer-0 prior, question reader). The questions
are those of the experiment named (default the validation split's ``v2_trained_mixture_fill``; with
``v2_trained_mixture_fill_test`` the test split, to explain the test run after it, not to choose).

    .venv/bin/python experiments/results/arr_coc_host_diag/evidence.py [threads] [experiment]
"""
import sys
import time

import torch

from _setup import ROOT, evidence_counts, saved_module, validation_set
from arr_coc.allocators import create_allocator
from arr_coc.reporting import commit, environment, write_report

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
experiment = sys.argv[2] if len(sys.argv) > 2 else "v2_trained_mixture_fill"
t_start = time.perf_counter()
data = validation_set(experiment, threads)
cfg, vlm, batches, encs, types, start, size = data.cfg, data.vlm, data.batches, data.encodings, data.types, data.start, data.size
ROWS = [("`t_gmix_of_ar` (trained, round 13)", lambda **kw: saved_module("t_gmix_of_ar", **kw), (0.5, 1.0, 1.5, 2.0)),
        ("`arr_coc_host` (training-free)", lambda **kw: create_allocator("arr_coc_host", **kw).eval(), (1.0, 2.0))]
lines = ["| allocator | threshold | budget | accuracy | evidence / question | precision | recall | nearest | nearest, both cells in the evidence | compare | count |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
for name, build, thresholds in ROWS:
    for tau in (None, *thresholds):
        alloc = build() if tau is None else build(fill="background", evidence_threshold=tau)
        for k in (64, 16, 4):
            c = evidence_counts(vlm, alloc, batches, encs, k, tau)
            ok, qs = c.correct, c.qtype
            n_ev, n_hit, n_rel = (t.float() for t in (c.evidence, c.hits, c.relevant))
            near = qs == types.index("nearest")
            both = float(c.all_in[near].float().mean())
            by = {t: float(ok[qs == types.index(t)].mean()) for t in ("nearest", "compare", "count")}
            label = "greedy fill" if tau is None else f"{tau:g}"
            lines.append(f"| {name} | {label} | {k} | {float(ok.mean()):.3f} | {float(n_ev.mean()):.2f} | "
                         f"{float(n_hit.sum() / n_ev.sum().clamp_min(1)):.3f} | {float(n_hit.sum() / n_rel.sum()):.3f} | "
                         f"{by['nearest']:.3f} | {both:.3f} | {by['compare']:.3f} | {by['count']:.3f} |")
            print(lines[-1], flush=True)
split = "Test" if experiment.endswith("_test") else "Validation"
body = (
    f"{split} split (task seed {cfg.data.task_seed}, examples {start}..{start + size - 1}); the trained module saved by "
    "`python experiments/main.py +experiment=v2_trained_mixture_fill threads=2 progress=false` (seed 0, `logs/diag/t_gmix_of_ar`). "
    "`greedy fill`: the greedy spends the budget (every pick counted as evidence). Precision and recall are pooled over the "
    f"questions; a relevant cell is one of the ground-truth mask. {environment()}; {time.perf_counter() - t_start:.0f} s.\n\n"
    + "\n".join(lines) + "\n"
)
name = "evidence_test" if split == "Test" else "evidence"
write_report(name, f"Issue 16 goals 1-2 diagnostic: what background fill keeps as evidence ({split.lower()} split)",
             f".venv/bin/python experiments/results/arr_coc_host_diag/evidence.py {threads} {experiment}", body,
             results_dir=ROOT / "experiments/results/arr_coc_host_diag")
print("commit", commit())
