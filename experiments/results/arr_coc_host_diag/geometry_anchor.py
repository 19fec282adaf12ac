"""Diagnostic for issue 16 goal 2 (experiments/results/arr_coc_host_diag/geometry_anchor.md): why the
distance-kernel relational term (``arr_coc_host_trained(relational=True, relation_geometry=True,
prior=None)``) misses "nearest" at 4 tokens, on the validation split.

Trains each variant 600 steps (seed 0, the relevance masks, as the v2_trained_* configs) and reads,
on the validation "nearest" questions at budgets 8 and 4: whether the first scorer's best token is
one of the two relevant cells (the named object or the nearest), whether the anchor the relation
uses is, whether the relation's best token other than the anchor is, whether both relevant cells
are kept, the accuracy, and the distance kernel's rate (nats per cell) on nearest and on the other
questions. Variants: the rate unscaled (``RATE_SCALE = 1``, the first committed form) with the
first scorer's anchor; the same with ``anchor_query``; ``anchor_query`` with the committed scale.

    .venv/bin/python experiments/results/arr_coc_host_diag/geometry_anchor.py [threads]
"""
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "experiments"))
import main as M  # noqa: E402

from arr_coc.allocators import arr_coc_host_trained as T  # noqa: E402
from arr_coc.evaluation import _encode, build_eval_batches, run_allocation  # noqa: E402
from arr_coc.reporting import commit, environment, write_report  # noqa: E402
from arr_coc.training.base_vlm import BaseVLM  # noqa: E402
from arr_coc.training.module import coverage_mask  # noqa: E402
from arr_coc.training.tokenizer import build_tokenizer  # noqa: E402

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(threads)
with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
    cfg = compose(config_name="main", overrides=["+experiment=v2_trained_geometry"])
vlm = BaseVLM.from_pretrained(M._path(cfg.model_folder)).eval()
vlm.requires_grad_(False)
task = M.build_eval_task(cfg, int(cfg.data.task_seed))
batches = build_eval_batches(task, build_tokenizer(task), start=int(cfg.eval.start), size=int(cfg.eval.size), batch_size=64)
nearest = list(task.question_types).index("nearest")
n = int(vlm.num_patches)
variants = [
    ("first scorer's anchor, rate unscaled", {}, 1.0),
    ("anchor_query, rate unscaled", {"anchor_query": True}, 1.0),
    ("anchor_query, rate x 10 (committed)", {"anchor_query": True}, T.RATE_SCALE),
]
committed_scale = T.RATE_SCALE
lines = ["| variant | budget | accuracy (all) | accuracy (nearest) | first scorer's best in mask | anchor in mask "
         "| relation's best other in mask | both kept | rate nearest | rate other |", "|" + "---|" * 10]
t_start = time.perf_counter()
for label, extra, scale in variants:
    T.RATE_SCALE = scale  # the module constant, read at each call (a diagnostic of our own module)
    spec = {"name": "arr_coc_host_trained",
            "kwargs": {"relational": True, "relation_geometry": True, "prior": None, **extra}}
    torch.manual_seed(0)
    alloc = M.build_allocator(spec, 0)
    M.train_allocator(vlm, alloc, cfg, seed=0, overrides={"steps": 600, "loss_weights": {"relevance": 1.0}})
    alloc.eval()
    for k in (8, 4):
        s = {key: [] for key in ("acc", "acc_n", "first", "anchor", "other", "both", "rate_n", "rate_o")}
        with torch.no_grad():
            for b in batches:
                res = run_allocation(vlm, alloc, b, k, encoded=_encode(vlm, b))
                ok = (res.logits.argmax(-1) == b["answer"]).float()
                isn = b["question_type"] == nearest
                rel = b["relevance"].flatten(1)
                ex = res.out.extras
                rows = torch.arange(rel.shape[0])
                anchor, rate = ex["anchor"], ex["relation_rate"]
                p2 = ex["pmi_relation"][:, :n].clone()
                p2[rows, anchor] = -float("inf")
                kept = coverage_mask(res.positions, res.mask.bool(), tuple(vlm.grid)).flatten(1)
                s["acc"].append(ok)
                s["acc_n"].append(ok[isn])
                s["first"].append(rel[rows, ex["pmi"][:, :n].argmax(1)][isn].float())
                s["anchor"].append(rel[rows, anchor][isn].float())
                s["other"].append(rel[rows, p2.argmax(1)][isn].float())
                s["both"].append(((kept & rel).sum(1) == rel.sum(1))[isn].float())
                s["rate_n"].append(rate[isn])
                s["rate_o"].append(rate[~isn])
        m = {key: float(torch.cat(v).mean()) for key, v in s.items()}
        lines.append(f"| {label} | {k} | {m['acc']:.3f} | {m['acc_n']:.3f} | {m['first']:.3f} | {m['anchor']:.3f} | "
                     f"{m['other']:.3f} | {m['both']:.3f} | {m['rate_n']:.3f} | {m['rate_o']:.3f} |")
        print(lines[-1], flush=True)
T.RATE_SCALE = committed_scale
count = int(sum(int((b["question_type"] == nearest).sum()) for b in batches))
body = (
    f"Validation split (task seed {cfg.data.task_seed}, examples {int(cfg.eval.start)}..{int(cfg.eval.start) + int(cfg.eval.size) - 1}, "
    f"{count} nearest questions); each variant trained 600 steps, seed 0, relevance masks + the answer loss "
    f"(the v2_trained_* recipe); no LLM layer-0 prior. {environment()}; {time.perf_counter() - t_start:.0f} s.\n\n"
    "Columns on the nearest questions except `accuracy (all)` and `rate other`. \"in mask\": the token is one of the "
    "question's two relevant cells (the named object, the nearest object). `relation's best other`: the relation's "
    "highest-pmi fine token other than the anchor. `rate`: the distance kernel's g(q), nats per cell (starts at 0.127).\n\n"
    + "\n".join(lines) + "\n"
)
write_report("geometry_anchor", "Issue 16 goal 2 diagnostic: the anchor and the distance kernel of the relational term on nearest questions",
             f".venv/bin/python experiments/results/arr_coc_host_diag/geometry_anchor.py {threads}", body,
             results_dir=ROOT / "experiments/results/arr_coc_host_diag")
print("commit", commit())
