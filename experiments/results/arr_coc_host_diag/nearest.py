"""Diagnostic for issue 16 goal 2 (experiments/results/arr_coc_host_diag/nearest.md): on the "nearest"
questions, what the relational module's relation reading ranks first instead of the named object's
nearest neighbour, and what the greedy keeps at 4 tokens.

Reads modules saved by ``python experiments/main.py +experiment=v2_trained_readings_more``
(``logs/diag/<label>``, seed 0; validation split). For every nearest question (the anchor is the named
object, the target its nearest object, nearer than the second by the task's margin), the relation
reading's best fine cell other than the anchor is classed as the target, another object (by its
distance rank from the anchor), a distractor pattern or background; the module's own anchor (the
token the relation is conditioned on) is checked against the named object. At 4 tokens the kept cells
are classed the same way, with the accuracy when both relevant cells are kept and when not.

    .venv/bin/python experiments/results/arr_coc_host_diag/nearest.py [threads] [label ...]
"""
import sys
import time
from collections import Counter

import torch

from _setup import ROOT, saved_module, validation_set
from arr_coc.evaluation import run_allocation
from arr_coc.pyramid import coverage_mask
from arr_coc.reporting import commit, environment, write_report

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
labels = sys.argv[2:] or ["t_ga_ar_4k", "t_gaof_ar_trained"]
data = validation_set("v2_trained_readings_more", threads)
cfg, vlm, task, batches, types, start, size = data.cfg, data.vlm, data.task, data.batches, data.types, data.start, data.size
g = int(vlm.grid[1])
n = int(vlm.num_patches)


def cell_classes(i: int) -> tuple[torch.Tensor, dict[int, int]]:
    """[N] long: 0 background, 1 distractor, 2 object; and object cell -> distance rank from the anchor."""
    scene, ex = task.scene(start + i), task.example(start + i)
    cls = torch.zeros(n, dtype=torch.long)
    for r, c in scene.distractors:
        cls[r * g + c] = 1
    for o in scene.objects:
        cls[o[0] * g + o[1]] = 2
    anchor = int(torch.as_tensor(ex.anchor).flatten().nonzero()[0])
    ar, ac = divmod(anchor, g)
    others = sorted(((o[0] - ar) ** 2 + (o[1] - ac) ** 2, o[0] * g + o[1]) for o in scene.objects if o[0] * g + o[1] != anchor)
    return cls, {cell: k + 1 for k, (_, cell) in enumerate(others)}, anchor


t_start = time.perf_counter()
sections = []
for label in labels:
    alloc = saved_module(label)
    top_class, own_anchor_ok, target_rank = Counter(), [], []
    kept_rows, q_count = [], 0
    with torch.no_grad():
        offset = 0
        for b, enc in zip(batches, data.encodings):
            res = run_allocation(vlm, alloc, b, 4, encoded=enc)
            ex = res.out.extras
            ok = (res.logits.argmax(-1) == b["answer"])
            kept = coverage_mask(res.positions, res.mask.bool(), tuple(vlm.grid)).flatten(1)
            rel = b["relevance"].flatten(1)
            for i in torch.nonzero(b["question_type"] == types.index("nearest")).flatten().tolist():
                cls, rank, anchor = cell_classes(offset + i)
                target = [c for c in rel[i].nonzero().flatten().tolist() if c != anchor][0]
                s = ex["pmi_relation"][i, :n].clone()
                s[anchor] = -float("inf")
                order = s.argsort(descending=True)
                best = int(order[0])
                if best == target:
                    top_class["target"] += 1
                elif cls[best] == 2:
                    top_class[f"object, distance rank {min(rank[best], 4)}{'+' if rank[best] >= 4 else ''}"] += 1
                else:
                    top_class[["background", "distractor"][int(cls[best])]] += 1
                target_rank.append(int((order == target).nonzero()[0]) + 1)
                own_anchor_ok.append(int(ex["anchor"][i]) == anchor)
                k = kept[i]
                both = bool(k[anchor]) and bool(k[target])
                kept_rows.append((bool(ok[i]), both, bool(k[anchor]), bool(k[target]),
                                  int((k & (cls == 2)).sum()) - int(k[anchor]) - int(k[target]),
                                  int((k & (cls == 1)).sum()), int((k & (cls == 0)).sum())))
                q_count += 1
            offset += rel.shape[0]
    kr = torch.tensor(kept_rows, dtype=torch.float)
    acc, both = kr[:, 0], kr[:, 1].bool()
    fmt = lambda t: f"{float(t.mean()):.3f}" if t.numel() else "-"  # noqa: E731
    ranks = torch.tensor(target_rank, dtype=torch.float)
    sections.append(
        f"### `{label}` ({q_count} nearest questions)\n\n"
        f"Module's own anchor is the named object: {fmt(torch.tensor(own_anchor_ok, dtype=torch.float))}. "
        f"Target's rank in the relation reading (anchor excluded): mean {float(ranks.mean()):.2f}, "
        f"first on {fmt((ranks == 1).float())}, top 3 on {fmt((ranks <= 3).float())}.\n\n"
        "| relation's best cell other than the anchor | questions | fraction |\n|---|---|---|\n"
        + "\n".join(f"| {k} | {v} | {v / q_count:.3f} |" for k, v in sorted(top_class.items(), key=lambda kv: -kv[1]))
        + "\n\nAt 4 tokens: accuracy " + fmt(acc) + f"; anchor kept {fmt(kr[:, 2])}, target kept {fmt(kr[:, 3])}, both "
        f"{fmt(both.float())}; accuracy with both kept {fmt(acc[both])}, without {fmt(acc[~both])} ({int((~both).sum())} questions); "
        f"kept cells besides them: other objects {float(kr[:, 4].mean()):.2f}, distractors {float(kr[:, 5].mean()):.2f}, "
        f"background {float(kr[:, 6].mean()):.2f}.\n"
    )
    print(sections[-1], flush=True)
body = (
    f"Validation split (task seed {cfg.data.task_seed}, examples {start}..{start + size - 1}); modules of "
    f"`python experiments/main.py +experiment=v2_trained_readings_more` (seed 0, saved to `logs/diag/<label>`). "
    f"{environment()}; {time.perf_counter() - t_start:.0f} s.\n\n" + "\n".join(sections)
)
write_report("nearest", "Issue 16 goal 2 diagnostic: what the relation reading ranks first on nearest questions",
             f".venv/bin/python experiments/results/arr_coc_host_diag/nearest.py {threads} {' '.join(labels)}", body,
             results_dir=ROOT / "experiments/results/arr_coc_host_diag")
print("commit", commit())
