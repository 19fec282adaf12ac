"""Diagnostic for experiments/results/arr_coc_host.md: what the step-3,200 snapshot rewards.
Accuracy when the relevant cells are kept and the rest of the budget is filled at random, with
the most salient cells (other objects, distractors) or with the least salient (background), or
left unspent (the relevant cells alone, session 12);
and top-k by the LLM's layer-0 attention. Validation split, budget K (default 16).

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python experiments/results/arr_coc_host_diag/fill.py 512 16
"""
import sys, torch, numpy as np
torch.set_num_threads(1)
from arr_coc.training.base_vlm import BaseVLM
from arr_coc.training.tasks import build_task
from arr_coc.training.tokenizer import build_tokenizer
from arr_coc.evaluation import build_eval_batches
from arr_coc.training.base_host import BaseVLMHost
from arr_coc.allocators.arr_coc_host import LayerAttentionProbe
# session 4 ran this on a stage-1 snapshot of the old drawings (git: c514176, checkpoints/base_vlm_v2_run/snapshot);
# that snapshot is gone, so it now reads the accepted base VLM (its figures in arr_coc_host.md are session 4's)
vlm = BaseVLM.from_pretrained("checkpoints/base_vlm_v2").eval()
task = build_task({"name": "clutter", "image_size": 128, "grid": 16}, 1000003)
tok = build_tokenizer(task); qtypes = list(task.question_types)
batches = build_eval_batches(task, tok, start=0, size=int(sys.argv[1]), batch_size=64)
K = int(sys.argv[2]) if len(sys.argv) > 2 else 16
g = torch.Generator().manual_seed(0)
acc = {}; qts = []
def answer(bt, proj, idx, p, mask=None):
    fine = proj[:, p:]
    if mask is None:
        mask = torch.ones_like(idx, dtype=torch.bool)
    order = torch.where(mask, idx, idx + fine.shape[1]).argsort(1)  # kept tokens in raster order, padding last
    idx, mask = idx.gather(1, order), mask.gather(1, order)
    vis = fine.gather(1, idx[..., None].expand(-1, -1, fine.shape[-1]))
    pos = vlm.fine_positions(fine.shape[0]).gather(1, idx[..., None].expand(-1, -1, 3))
    lg = vlm.answer_logits(vis, mask, pos, bt["question_ids"], bt["question_mask"])
    return (lg.argmax(-1) == bt["answer"]).float()
def fill(first_score, fill_score, k):
    # take relevant (score>0.5 on first) first, then fill by fill_score
    s = first_score * 1e6 + fill_score
    return s.topk(k, 1).indices
with torch.no_grad():
  for bt in batches:
    vis = vlm.encode_image(bt["pixels"]); p = vlm.num_prefix_tokens; proj = vlm.project(vis)
    host = BaseVLMHost(vlm, bt["pixels"], vis, bt["question_ids"], bt["question_mask"])
    rel = bt["relevance"].flatten(1).float()
    x = proj[:, p:]; sal = (x - x.mean(1, keepdim=True)).norm(dim=-1); sal = sal / sal.amax(1, keepdim=True)
    pr = LayerAttentionProbe(0, "question"); host.answer_in_llm(pr, x, None, None, bt["question_ids"], bt["question_mask"], 1)
    a0 = pr.attention; a0n = a0 / a0.amax(1, keepdim=True)
    rnd = torch.rand(rel.shape, generator=g)
    cfg = {
      "rel+random": fill(rel, rnd, K),
      "rel+salient": fill(rel, sal, K),
      "rel+least_salient": fill(rel, -sal, K),
      "L0top": a0.topk(K, 1).indices,
      "L0top4+random": fill((a0n >= a0n.topk(4, 1).values[:, -1:]).float(), rnd, K),
      "L0top8+random": fill((a0n >= a0n.topk(8, 1).values[:, -1:]).float(), rnd, K),
      "L0top8+salient": fill((a0n >= a0n.topk(8, 1).values[:, -1:]).float(), sal, K),
      "salient": sal.topk(K, 1).indices,
    }
    for k_, idx in cfg.items():
        acc.setdefault(k_, []).append(answer(bt, proj, idx, p))
    # the relevant cells alone (at most K), no fill: the rest of the budget is not spent
    idx = fill(rel, rnd, K)
    acc.setdefault("rel only (no fill)", []).append(answer(bt, proj, idx, p, rel.gather(1, idx) > 0))
    qts.append(bt["question_type"])
qt = torch.cat(qts)
print("K", K, " types:", " ".join(qtypes))
for k_, v in acc.items():
    v = torch.cat(v)
    print(f"{k_:18s} {v.mean():.3f}  " + " ".join(f"{v[qt == i].mean():.2f}" for i in range(len(qtypes))))
