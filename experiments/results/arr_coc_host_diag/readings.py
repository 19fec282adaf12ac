"""Diagnostic for issue 16 goal 2 (experiments/results/arr_coc_host_diag/readings.md): how well each
reading of the round-5 relational module ranks a question's relevant cells, and which readings
should enter the greedy's gain.

Reads the module trained and saved by ``python experiments/main.py +experiment=v2_trained_fill``
(``logs/diag/t_ga_noprior_2k``, seed 0, 2,000 steps; validation split). Part 1: per question
type, the fraction of the relevant cells R among each reading's top-|R| fine tokens (R-precision):
the first scorer (a cross-attention of the question's words: a mixture over them), the anchor
reading (one query vector per question) and the relation (conditioned on the anchor, with its
distance kernel). Part 2: accuracy at 16 / 8 / 4 tokens with the same weights and other
``gain_readings``.

    .venv/bin/python experiments/results/arr_coc_host_diag/readings.py [threads]
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
torch.set_num_threads(threads)
with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
    cfg = compose(config_name="main", overrides=["+experiment=v2_trained_fill"])
vlm = BaseVLM.from_pretrained(M._path(cfg.model_folder)).eval()
vlm.requires_grad_(False)
task = M.build_eval_task(cfg, int(cfg.data.task_seed))
batches = build_eval_batches(task, build_tokenizer(task), start=int(cfg.eval.start), size=int(cfg.eval.size), batch_size=64)
types = list(task.question_types)
source = ROOT / "logs/diag/t_ga_noprior_2k"
trained = load_allocator(source)
saved = json.loads((source / "config.json").read_text())


def with_readings(readings):
    alloc = create_allocator(saved["name"], **saved["allocator_config"], gain_readings=readings)
    alloc.load_state_dict(trained.state_dict())  # the same weights, other readings in the gain
    return alloc.eval()


t_start = time.perf_counter()
n = int(vlm.num_patches)
# part 1: R-precision of each reading
prec = {k: [] for k in ("first", "anchor", "relation")}
qts = []
alloc = with_readings(None)
with torch.no_grad():
    for b in batches:
        ex = run_allocation(vlm, alloc, b, 4, encoded=_encode(vlm, b)).out.extras
        rel = b["relevance"].flatten(1)
        size = rel.sum(1)
        for key, name in (("first", "pmi"), ("anchor", "pmi_anchor"), ("relation", "pmi_relation")):
            order = ex[name][:, :n].argsort(1, descending=True)
            top = torch.arange(n)[None, :] < size[:, None]  # the first |R| of each row's order
            hits = rel.gather(1, order) & top
            prec[key].append(hits.sum(1).float() / size.clamp_min(1).float())
        qts.append(b["question_type"])
qt = torch.cat(qts)
prec = {k: torch.cat(v) for k, v in prec.items()}
lines1 = ["| reading | " + " | ".join(types) + " | all |", "|" + "---|" * (len(types) + 2)]
for key, v in prec.items():
    lines1.append(f"| {key} | " + " | ".join(f"{float(v[qt == i].mean()):.3f}" for i in range(len(types))) + f" | {float(v.mean()):.3f} |")
print("\n".join(lines1), flush=True)
# part 2: accuracy with other readings in the gain
variants = [("first + relation (as trained)", None), ("anchor + relation", ["anchor", "relation"]),
            ("first + relation + anchor", ["first", "relation", "anchor"]), ("anchor", ["anchor"]), ("first", ["first"])]
lines2 = ["| gain readings | budget | accuracy | " + " | ".join(types) + " |", "|" + "---|" * (len(types) + 3)]
for label, readings in variants:
    alloc = with_readings(readings)
    for k in (16, 8, 4):
        ok, qs = [], []
        with torch.no_grad():
            for b in batches:
                res = run_allocation(vlm, alloc, b, k, encoded=_encode(vlm, b))
                ok.append((res.logits.argmax(-1) == b["answer"]).float())
                qs.append(b["question_type"])
        ok, qs = torch.cat(ok), torch.cat(qs)
        lines2.append(f"| {label} | {k} | {float(ok.mean()):.3f} | " + " | ".join(f"{float(ok[qs == i].mean()):.3f}" for i in range(len(types))) + " |")
        print(lines2[-1], flush=True)
body = (
    f"Validation split (task seed {cfg.data.task_seed}, examples {int(cfg.eval.start)}..{int(cfg.eval.start) + int(cfg.eval.size) - 1}); "
    f"the module of `python experiments/main.py +experiment=v2_trained_fill` (seed 0, 2,000 steps, saved to `logs/diag/t_ga_noprior_2k`). "
    f"{environment()}; {time.perf_counter() - t_start:.0f} s.\n\n"
    "## R-precision of each reading\n\nFraction of the question's relevant cells R among the reading's top-|R| fine tokens "
    "(a question with no relevant cell counts 0).\n\n" + "\n".join(lines1) + "\n\n"
    "## Accuracy with other readings in the gain (same weights)\n\n" + "\n".join(lines2) + "\n"
)
write_report("readings", "Issue 16 goal 2 diagnostic: how each reading of the relational module ranks the relevant cells",
             f".venv/bin/python experiments/results/arr_coc_host_diag/readings.py {threads}", body,
             results_dir=ROOT / "experiments/results/arr_coc_host_diag")
print("commit", commit())
