"""Diagnostic for issue 16 goal 2 (experiments/results/arr_coc_host_diag/combine.md): how the readings
enter the gain, on the same trained weights: the sum of their positive pmi (as trained), the largest
(``gain_combine="max"``), the relation alone, the anchor reading alone (``gain_readings``).

Reads the modules saved by ``v2_trained_readings_more`` and ``v2_trained_gate`` (``logs/diag/<label>``,
seed 0; validation split) and evaluates each at 16 / 8 / 4 tokens.

    .venv/bin/python experiments/results/arr_coc_host_diag/combine.py [threads] [label ...]
"""
import sys
import time

import torch

from _setup import ROOT, saved_module, validation_set
from arr_coc.evaluation import run_allocation
from arr_coc.reporting import commit, environment, write_report

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
labels = sys.argv[2:] or ["t_ga_ar_4k", "t_gaof_ar_trained", "t_gate_ar", "t_gate_of_ar"]
t_start = time.perf_counter()
data = validation_set("v2_trained_gate", threads)
cfg, vlm, batches, encs, types, start, size = data.cfg, data.vlm, data.batches, data.encodings, data.types, data.start, data.size
VARIANTS = [("sum (as trained)", {}), ("max", {"gain_combine": "max"}),
            ("relation alone", {"gain_readings": ["relation"]}), ("anchor reading alone", {"gain_readings": ["anchor"]})]
lines = ["| module | gain | budget | accuracy | nearest | compare | count |", "|---|---|---|---|---|---|---|"]
for label in labels:
    for combine, kwargs in VARIANTS:
        alloc = saved_module(label, **kwargs)  # the same weights, another gain
        for k in (16, 8, 4):
            ok, qs = [], []
            with torch.no_grad():
                for b, e in zip(batches, encs):
                    res = run_allocation(vlm, alloc, b, k, encoded=e)
                    ok.append((res.logits.argmax(-1) == b["answer"]).float())
                    qs.append(b["question_type"])
            ok, qs = torch.cat(ok), torch.cat(qs)
            by = {t: float(ok[qs == types.index(t)].mean()) for t in ("nearest", "compare", "count")}
            lines.append(f"| `{label}` | {combine} | {k} | {float(ok.mean()):.3f} | {by['nearest']:.3f} | {by['compare']:.3f} | {by['count']:.3f} |")
            print(lines[-1], flush=True)
body = (
    f"Validation split (task seed {cfg.data.task_seed}, examples {start}..{start + size - 1}); modules saved by "
    "`python experiments/main.py +experiment=v2_trained_readings_more` and `+experiment=v2_trained_gate` "
    f"(seed 0, `logs/diag/<label>`), trained with the sum. {environment()}; {time.perf_counter() - t_start:.0f} s.\n\n"
    + "\n".join(lines) + "\n"
)
write_report("combine", "Issue 16 goal 2 diagnostic: how the readings enter the gain (same weights)",
             f".venv/bin/python experiments/results/arr_coc_host_diag/combine.py {threads} {' '.join(labels)}", body,
             results_dir=ROOT / "experiments/results/arr_coc_host_diag")
print("commit", commit())
