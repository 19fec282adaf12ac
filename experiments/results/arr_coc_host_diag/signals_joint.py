"""Diagnostic for experiments/results/arr_coc_host.md: how well each host signal ranks the
ground-truth relevant cells (recall of the top-k by the score; R-precision among the 20 most
salient cells), on validation (task seed 1,000,003), step-3,200 snapshot.

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python experiments/results/arr_coc_host_diag/signals_joint.py 256
"""
import sys, torch, numpy as np
torch.set_num_threads(1)

from arr_coc.training.base_vlm import BaseVLM
from arr_coc.training.tasks import build_task
from arr_coc.training.tokenizer import build_tokenizer
from arr_coc.evaluation import build_eval_batches
from arr_coc.training.base_host import BaseVLMHost
import torch.nn.functional as F

# session 4 ran this on a stage-1 snapshot of the old drawings (git: c514176, checkpoints/base_vlm_v2_run/snapshot);
# that snapshot is gone, so it now reads the accepted base VLM (its figures in arr_coc_host.md are session 4's)
vlm = BaseVLM.from_pretrained("checkpoints/base_vlm_v2").eval()
task = build_task({"name": "clutter", "image_size": 128, "grid": 16}, 1000003)
tok = build_tokenizer(task)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 128
batches = build_eval_batches(task, tok, start=0, size=N, batch_size=64)
qtypes = list(task.question_types)
res = {}
with torch.no_grad():
  allrows = []
  for bt in batches:
    vis = vlm.encode_image(bt["pixels"])
    host = BaseVLMHost(vlm, bt["pixels"], vis, bt["question_ids"], bt["question_mask"])
    P = host.patch_features()           # B N Dj
    T, tm = host.text_features()
    e = host.text_embedding()
    att = host.vision_attention(-2)     # B h P+N P+N
    p = vlm.num_prefix_tokens
    cls = att[:, :, 0, p:].mean(1)      # B N
    proj = vlm.project(vis)[:, p:]
    qe = vlm.query_embeddings(bt["question_ids"])
    rel = bt["relevance"].flatten(1).bool()  # B N
    tmf = tm.float()
    S = P @ T.transpose(1, 2)                    # B N T
    scores = {}
    scores["pooled"] = P @ e[:, :, None]
    scores["pooled"] = scores["pooled"][..., 0]
    scores["tok_mean"] = (S * tmf[:, None]).sum(-1) / tmf.sum(-1, keepdim=True)
    scores["tok_max"] = S.masked_fill(~tm[:, None], -9).amax(-1)
    Pc = F.normalize(P - P.mean(1, keepdim=True), dim=-1)
    scores["pooled_c"] = (Pc @ e[:, :, None])[..., 0]
    Sc = Pc @ T.transpose(1, 2)
    scores["tok_max_c"] = Sc.masked_fill(~tm[:, None], -9).amax(-1)
    scores["tok_mean_c"] = (Sc * tmf[:, None]).sum(-1) / tmf.sum(-1, keepdim=True)
    scores["cls"] = cls
    scores["neg_pooled"] = -scores["pooled"]
    # deviation from image mean (saliency) in joint space
    scores["joint_dev"] = (P - P.mean(1, keepdim=True)).norm(dim=-1)
    scores["proj_dev"] = (proj - proj.mean(1, keepdim=True)).norm(dim=-1)
    qn = F.normalize(qe, dim=-1); pn = F.normalize(proj, dim=-1)
    qm = bt["question_mask"].bool()
    Sl = pn @ qn.transpose(1, 2)
    scores["llm_max"] = Sl.masked_fill(~qm[:, None], -9).amax(-1)
    pnc = F.normalize(proj - proj.mean(1, keepdim=True), dim=-1)
    Slc = pnc @ qn.transpose(1, 2)
    scores["llm_max_c"] = Slc.masked_fill(~qm[:, None], -9).amax(-1)
    z = lambda x: (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    for lam in (0.5, 1.0, 2.0):
        scores[f"pdev+{lam}pool"] = z(scores["proj_dev"]) + lam * z(scores["pooled"])
        scores[f"jdev+{lam}pool"] = z(scores["joint_dev"]) + lam * z(scores["pooled"])
        scores[f"cls+{lam}pool"] = z(scores["cls"]) + lam * z(scores["pooled"])
    scores["pdev+1tokmean"] = z(scores["proj_dev"]) + z(scores["tok_mean"])
    lp = torch.log_softmax(scores["pooled"] / 0.07, 1)
    scores["logcls+pool/.07"] = cls.clamp_min(1e-9).log() + lp
    allrows.append((scores, rel, bt["question_type"]))
names = list(allrows[0][0])
rel = torch.cat([r[1] for r in allrows]); qt = torch.cat([r[2] for r in allrows])
pool = torch.cat([r[0]["pooled"] for r in allrows]); print("pooled cos quantiles", torch.quantile(pool.flatten(), torch.tensor([0.01,0.5,0.99])).tolist())
tm_ = torch.cat([r[0]["tok_mean"] for r in allrows]); print("tokmean cos quantiles", torch.quantile(tm_.flatten(), torch.tensor([0.01,0.5,0.99])).tolist())
sal = torch.cat([r[0]["proj_dev"] for r in allrows])
top = sal.topk(20, 1).indices
relc = rel.gather(1, top)
nrel = relc.sum(1)
ok = nrel > 0
print("among top-20 salient: R-precision of relevant cells (chance = nrel/20)", (nrel[ok].float()/20).mean().item())
for nm in names:
    s_ = torch.cat([r[0][nm] for r in allrows]).gather(1, top)
    rp = []
    for i in range(len(s_)):
        if nrel[i] == 0: continue
        k = int(nrel[i]); o = s_[i].topk(k).indices
        rp.append(relc[i, o].float().mean().item())
    print(f"  {nm:14s} R-prec {np.mean(rp):.3f}")

print("types", {t: int((qt == i).sum()) for i, t in enumerate(qtypes)})
print(f"{'score':12s} " + " ".join(f"{'K'+str(k):>6s}" for k in (28, 16, 8, 4)) + "  per-type recall@16: " + " ".join(t[:5] for t in qtypes))
for nm in names:
    s = torch.cat([r[0][nm] for r in allrows])
    out = []
    for k in (28, 16, 8, 4):
        idx = s.topk(k, 1).indices
        hit = rel.gather(1, idx).sum(1).float() / rel.sum(1).clamp_min(1)
        out.append(hit)
    per = [out[1][qt == i].mean().item() for i in range(len(qtypes))]
    print(f"{nm:12s} " + " ".join(f"{o.mean():6.3f}" for o in out) + "  " + " ".join(f"{v:.2f}" for v in per))
