"""Diagnostic for experiments/results/arr_coc_host.md: the LLM's own attention (layers 0-2,
from a probe run through BaseVLMHost.answer_in_llm that keeps every token) as a relevance
score: recall of the top-k and R-precision among the 20 most salient cells, validation split.

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python experiments/results/arr_coc_host_diag/signals_llm.py 256
"""
import sys, torch, numpy as np
torch.set_num_threads(1)
from arr_coc.training.base_vlm import BaseVLM
from arr_coc.training.tasks import build_task
from arr_coc.training.tokenizer import build_tokenizer
from arr_coc.evaluation import build_eval_batches
from arr_coc.training.base_host import BaseVLMHost
from arr_coc.allocators.host import PruneDecision
import torch.nn.functional as F

class Probe:
    in_llm = True
    def __init__(self): self.rec = {}
    def prune_layers(self, L): return (0, 1, 2)
    def prune(self, st):
        kc = st.num_visual_slots
        att = st.attention.mean(1)  # B L L
        tm = st.text_mask
        self.rec[st.layer] = dict(last=att[:, -1, :kc].clone(),
            text=(att[:, kc:, :kc] * tm[:, :, None]).sum(1) / tm.sum(1, keepdim=True),
            hid=st.hidden.clone(), tm=tm.clone(), kc=kc)
        keep = torch.arange(kc)[None].expand(st.hidden.shape[0], -1)
        return PruneDecision(keep=keep)

# session 4 ran this on a stage-1 snapshot of the old drawings (git: c514176, checkpoints/base_vlm_v2_run/snapshot);
# that snapshot is gone, so it now reads the accepted base VLM (its figures in arr_coc_host.md are session 4's)
vlm = BaseVLM.from_pretrained("checkpoints/base_vlm_v2").eval()
task = build_task({"name": "clutter", "image_size": 128, "grid": 16}, 1000003)
tok = build_tokenizer(task)
batches = build_eval_batches(task, tok, start=0, size=int(sys.argv[1]), batch_size=64)
rows = []
with torch.no_grad():
  for bt in batches:
    vis = vlm.encode_image(bt["pixels"]); p = vlm.num_prefix_tokens
    proj = vlm.project(vis)
    host = BaseVLMHost(vlm, bt["pixels"], vis, bt["question_ids"], bt["question_mask"])
    pr = Probe()
    host.answer_in_llm(pr, proj[:, p:], None, None, bt["question_ids"], bt["question_mask"], 256)
    sc = {}
    for l, r in pr.rec.items():
        sc[f"L{l}_last"] = r["last"]; sc[f"L{l}_text"] = r["text"]
        h = r["hid"]; kc = r["kc"]; hv = F.normalize(h[:, :kc] - h[:, :kc].mean(1, keepdim=True), dim=-1)
        ht = F.normalize(h[:, kc:], dim=-1)
        s = hv @ ht.transpose(1, 2)
        sc[f"L{l}_hidmax"] = s.masked_fill(~r["tm"][:, None], -9).amax(-1)
    x = proj[:, p:]; sc["proj_dev"] = (x - x.mean(1, keepdim=True)).norm(dim=-1)
    att = host.vision_attention(-2); sc["cls"] = att[:, :, 0, p:].mean(1)
    rows.append((sc, bt["relevance"].flatten(1).bool(), bt["question_type"]))
names = list(rows[0][0]); rel = torch.cat([r[1] for r in rows]); qt = torch.cat([r[2] for r in rows])
sal = torch.cat([r[0]["proj_dev"] for r in rows]); top = sal.topk(20, 1).indices; relc = rel.gather(1, top); nrel = relc.sum(1)
print("chance R-prec", (nrel[nrel > 0].float() / 20).mean().item())
for nm in names:
    s = torch.cat([r[0][nm] for r in rows])
    rec = []
    for k in (28, 16, 8, 4):
        idx = s.topk(k, 1).indices
        rec.append((rel.gather(1, idx).sum(1).float() / rel.sum(1).clamp_min(1)).mean().item())
    s_ = s.gather(1, top); rp = []
    for i in range(len(s_)):
        if nrel[i] == 0: continue
        kk = int(nrel[i]); o = s_[i].topk(kk).indices; rp.append(relc[i, o].float().mean().item())
    print(f"{nm:12s} recall@28/16/8/4 " + " ".join(f"{v:.3f}" for v in rec) + f"  R-prec among salient {np.mean(rp):.3f}")
