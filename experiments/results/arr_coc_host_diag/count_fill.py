"""Diagnostic for issue 16 goal 2 (experiments/results/arr_coc_host_diag/count_fill.md): where the
relational module of round 5 (``arr_coc_host_trained(relational=True, relation_geometry=True,
anchor_query=True, prior=None)``) loses count, nearest and compare questions at 8 and 4 tokens.

Reads the module trained and saved by ``python experiments/main.py +experiment=v2_trained_fill``
(``logs/diag/t_ga_noprior_2k``, seed 0, 2,000 steps) and, on the validation questions of each of
those types, the fraction whose relevant cells are all kept, the accuracy when they are and when
they are not, and what else is kept: other objects (cells with an object outside the mask),
distractor patterns, background. Variants: as trained (the greedy fills the budget), and with
``fill="background"`` at evidence threshold 4 nats (at 2 and 3 nats every pick at 8 and 4 tokens is evidence: v2_trained_fill_val.md).

    .venv/bin/python experiments/results/arr_coc_host_diag/count_fill.py [threads]
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
from arr_coc.pyramid import coverage_mask  # noqa: E402
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
# which cells hold an object / a distractor pattern: the scenes of the evaluated examples
scenes = [task.scene(int(cfg.eval.start) + i) for i in range(int(cfg.eval.size))]
source = ROOT / "logs/diag/t_ga_noprior_2k"
variants = [("as trained (greedy fill)", {})] + [
    (f"fill=background, threshold {t:g}", {"fill": "background", "evidence_threshold": t}) for t in (4.0,)
]
lines = ["| variant | budget | type | questions | accuracy | all relevant kept | accuracy, all kept | accuracy, not all kept "
         "| other objects kept | distractor cells kept | background kept |", "|" + "---|" * 11]
t_start = time.perf_counter()
for label, kwargs in variants:
    trained = load_allocator(source)
    saved = json.loads((source / "config.json").read_text())
    alloc = create_allocator(saved["name"], **saved["allocator_config"], **kwargs)
    alloc.load_state_dict(trained.state_dict())  # the same weights under other inference options
    alloc.eval()
    for k in (8, 4):
        acc, allk, other, dis, bg, qt = [], [], [], [], [], []
        start = 0
        with torch.no_grad():
            for b in batches:
                res = run_allocation(vlm, alloc, b, k, encoded=_encode(vlm, b))
                ok = (res.logits.argmax(-1) == b["answer"]).float()
                rel = b["relevance"].flatten(1)
                kept = coverage_mask(res.positions, res.mask.bool(), tuple(vlm.grid)).flatten(1)
                obj = torch.zeros_like(rel)
                dst = torch.zeros_like(rel)
                for i in range(rel.shape[0]):
                    sc, g = scenes[start + i], vlm.grid[1]
                    for o in sc.objects:
                        obj[i, o[0] * g + o[1]] = True
                    for r, c in sc.distractors:
                        dst[i, r * g + c] = True
                start += rel.shape[0]
                acc.append(ok)
                allk.append(((kept & rel).sum(1) == rel.sum(1)).float())
                other.append((kept & obj & ~rel).sum(1).float())
                dis.append((kept & dst).sum(1).float())
                bg.append((kept & ~obj & ~dst).sum(1).float())
                qt.append(b["question_type"])
        acc, allk, other, dis, bg, qt = (torch.cat(v) for v in (acc, allk, other, dis, bg, qt))
        for name in ("count", "nearest", "compare"):
            sel = qt == types.index(name)
            a, kk = acc[sel], allk[sel].bool()
            fmt = lambda t: f"{float(t.mean()):.3f}" if t.numel() else "-"  # noqa: E731
            lines.append(f"| {label} | {k} | {name} | {int(sel.sum())} | {fmt(a)} | {fmt(kk.float())} | {fmt(a[kk])} | "
                         f"{fmt(a[~kk])} ({int((~kk).sum())}) | {fmt(other[sel])} | {fmt(dis[sel])} | {fmt(bg[sel])} |")
            print(lines[-1], flush=True)
body = (
    f"Validation split (task seed {cfg.data.task_seed}, examples {int(cfg.eval.start)}..{int(cfg.eval.start) + int(cfg.eval.size) - 1}); "
    f"the module of `python experiments/main.py +experiment=v2_trained_fill` (seed 0, 2,000 steps, saved to `logs/diag/t_ga_noprior_2k`). "
    f"{environment()}; {time.perf_counter() - t_start:.0f} s.\n\n"
    "`all relevant kept`: every cell of the question's mask is covered by a kept token. `other objects kept`, "
    "`distractor cells kept`, `background kept`: mean number of kept cells holding an object outside the mask, a "
    "distractor pattern, nothing. `accuracy, not all kept` gives the number of such questions in brackets.\n\n"
    + "\n".join(lines) + "\n"
)
write_report("count_fill", "Issue 16 goal 2 diagnostic: what the relational module keeps on count, nearest and compare questions",
             f".venv/bin/python experiments/results/arr_coc_host_diag/count_fill.py {threads}", body,
             results_dir=ROOT / "experiments/results/arr_coc_host_diag")
print("commit", commit())
