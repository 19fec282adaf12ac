"""Diagnostic for issue 16 goal 2 (experiments/results/arr_coc_host_diag/combine.md): how the readings
enter the gain, on the same trained weights: the sum of their positive pmi (as trained), the largest
(``gain_combine="max"``), the relation alone, the anchor reading alone (``gain_readings``).

Reads the modules saved by ``v2_trained_readings_more`` and ``v2_trained_gate`` (``logs/diag/<label>``,
seed 0; validation split) and evaluates each at 16 / 8 / 4 tokens.

    .venv/bin/python experiments/results/arr_coc_host_diag/combine.py [threads] [label ...]
"""
import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "experiments"))
import main as M  # noqa: E402

from arr_coc.allocators import create_allocator  # noqa: E402
from arr_coc.evaluation import _encode, build_eval_batches, run_allocation  # noqa: E402
from arr_coc.reporting import commit, environment, write_report  # noqa: E402
from arr_coc.training.base_vlm import BaseVLM  # noqa: E402
from arr_coc.training.hub import load_allocator  # noqa: E402
from arr_coc.training.tokenizer import build_tokenizer  # noqa: E402

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
labels = sys.argv[2:] or ["t_ga_ar_4k", "t_gaof_ar_trained", "t_gate_ar", "t_gate_of_ar"]
torch.set_num_threads(threads)
with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
    cfg = compose(config_name="main", overrides=["+experiment=v2_trained_gate"])
vlm = BaseVLM.from_pretrained(M._path(cfg.model_folder)).eval()
vlm.requires_grad_(False)
task = M.build_eval_task(cfg, int(cfg.data.task_seed))
start, size = int(cfg.eval.start), int(cfg.eval.size)
batches = build_eval_batches(task, build_tokenizer(task), start=start, size=size, batch_size=64)
types = list(task.question_types)
t_start = time.perf_counter()
with torch.no_grad():
    encs = [_encode(vlm, b) for b in batches]
VARIANTS = [("sum (as trained)", {}), ("max", {"gain_combine": "max"}),
            ("relation alone", {"gain_readings": ["relation"]}), ("anchor reading alone", {"gain_readings": ["anchor"]})]
lines = ["| module | gain | budget | accuracy | nearest | compare | count |", "|---|---|---|---|---|---|---|"]
for label in labels:
    source = ROOT / "logs/diag" / label
    trained = load_allocator(source)
    saved = json.loads((source / "config.json").read_text())
    for combine, kwargs in VARIANTS:
        alloc = create_allocator(saved["name"], **{**saved["allocator_config"], **kwargs})
        alloc.load_state_dict(trained.state_dict())  # the same weights, another gain
        alloc.eval()
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
