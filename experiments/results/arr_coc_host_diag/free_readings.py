"""Diagnostic for issue 16 goal 1 (experiments/results/arr_coc_host_diag/free_readings.md): can a
training-free reading of the host mark a question's evidence sharply enough for
``fill="background"``?

Part 1: per question type, the R-precision (the fraction of the relevant cells R among a reading's
top-|R| fine tokens) of the LLM's layer-0 attention read in several training-free ways (heads
averaged unless said): the mean over the question tokens (``arr_coc_host``'s default reader); the
readout token (FastV's); the sum over question tokens of each token's pointwise information
``log(N p_t(j))`` (a conjunction of the words: every word must read j); its per-head version (the
sum over heads and tokens); the largest single token's pmi; and, for comparison, the trained mixture
of round 13 (``logs/diag/t_gmix_of_ar``, seed 0), whose evidence ``fill`` reads in round 14.
Part 2: ``arr_coc_host`` with its prior read deeper in the LLM (layers 1 and 2 of a partial
prefill on every token, then pruning before the LLM), with and without ``fill="background"``: does
a deeper reading give sharper evidence? Part 3: ``fill="background"`` on the layer-0 readings with
evidence rules that adapt to the question instead of a fixed threshold in nats: the cells with at
least r times the largest attention (relative), or the smallest set of cells holding a share of
the attention (mass).

    .venv/bin/python experiments/results/arr_coc_host_diag/free_readings.py [threads]
"""
import sys
import time

import torch

from _setup import ROOT, evidence_counts, saved_module, validation_set
from arr_coc.allocators import create_allocator
from arr_coc.allocators.arr_coc_host import LayerAttentionProbe, background_fill
from arr_coc.evaluation import run_allocation
from arr_coc.reporting import commit, environment, write_report
from arr_coc.training.base_host import BaseVLMHost


class TokenProbe(LayerAttentionProbe):
    """LayerAttentionProbe that also keeps the per-head, per-question-token attention [B, H, T, N]."""

    def prune(self, state):
        self.heads = state.attention.float()[:, :, state.text_slice, state.visual_slice]
        self.text_mask = state.text_mask
        return super().prune(state)


def r_precision(score: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """[B]: the fraction of the relevant cells among the top-|R| of ``score`` [B, N] (0 without any)."""
    order = score.argsort(1, descending=True)
    hits = rel.gather(1, order).float().cumsum(1)  # [B, N]
    size = rel.sum(1)
    got = hits.gather(1, (size - 1).clamp_min(0)[:, None])[:, 0]
    return torch.where(size > 0, got / size.clamp_min(1), torch.zeros_like(got))


threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
t_start = time.perf_counter()
data = validation_set("v2_host_fill", threads)
cfg, vlm, batches, encs, types = data.cfg, data.vlm, data.batches, data.encodings, data.types
READINGS = ["mean over question tokens (default)", "readout token (FastV's reader)", "sum of the tokens' pmi (conjunction)",
            "sum over heads and tokens of the pmi", "largest token pmi", "trained mixture (round 13)"]
prec = {r: [] for r in READINGS}
qts = []
trained = saved_module("t_gmix_of_ar")
with torch.no_grad():
    for b, e in zip(batches, encs):
        p = vlm.num_prefix_tokens
        host = BaseVLMHost(vlm, b["pixels"], e.vision, b["question_ids"], b["question_mask"])
        x = e.projected[:, p:]
        probe = TokenProbe(0, "question")
        host.answer_in_llm(probe, x, None, None, b["question_ids"], b["question_mask"], 1)
        heads, tm = probe.heads, probe.text_mask.float()  # [B, H, T, N], [B, T]
        n = heads.shape[-1]
        tokens = heads.mean(1)  # [B, T, N]
        pmi_t = torch.log(n * (tokens / tokens.sum(-1, keepdim=True).clamp_min(1e-12)).clamp_min(1e-12))
        pmi_ht = torch.log(n * (heads / heads.sum(-1, keepdim=True).clamp_min(1e-12)).clamp_min(1e-12))
        last = tm.long().cumsum(1).argmax(1)
        rel = b["relevance"].flatten(1).bool()
        scores = {
            READINGS[0]: (tokens * tm[..., None]).sum(1),
            READINGS[1]: tokens[torch.arange(tokens.shape[0]), last],
            READINGS[2]: (pmi_t * tm[..., None]).sum(1),
            READINGS[3]: (pmi_ht * tm[:, None, :, None]).sum((1, 2)),
            READINGS[4]: pmi_t.masked_fill(tm[..., None] == 0, -1e9).amax(1),
            READINGS[5]: run_allocation(vlm, trained, b, 4, encoded=e).out.extras["relevance_logits"][:, 3],
        }
        for r, s in scores.items():
            prec[r].append(r_precision(s, rel))
        qts.append(b["question_type"])
qts = torch.cat(qts)
lines1 = ["| reading | " + " | ".join(types) + " | all |", "|---" * (len(types) + 2) + "|"]
for r in READINGS:
    v = torch.cat(prec[r])
    lines1.append(f"| {r} | " + " | ".join(f"{float(v[qts == i].mean()):.3f}" for i in range(len(types))) + f" | {float(v.mean()):.3f} |")
    print(lines1[-1], flush=True)

lines2 = ["| prior read after LLM layer | reader | fill (evidence threshold) | budget | accuracy | evidence / question | precision | recall | nearest |",
          "|---|---|---|---|---|---|---|---|---|"]
for layer in (0, 1, 2):
    for reader in ("question", "readout"):
        for tau in (None, 1.0, 2.0):
            kw = dict(llm_layer=layer, llm_reader=reader)
            if tau is not None:
                kw.update(fill="background", evidence_threshold=tau)
            alloc = create_allocator("arr_coc_host", **kw).eval()
            for k in (64, 16, 4):
                c = evidence_counts(vlm, alloc, batches, encs, k, tau)
                ok, qs = c.correct, c.qtype
                n_ev, n_hit, n_rel = (t.float() for t in (c.evidence, c.hits, c.relevant))
                label = "greedy" if tau is None else f"background ({tau:g} nats)"
                lines2.append(f"| {layer} | {reader} | {label} | {k} | {float(ok.mean()):.3f} | {float(n_ev.mean()):.2f} | "
                              f"{float(n_hit.sum() / n_ev.sum().clamp_min(1)):.3f} | {float(n_hit.sum() / n_rel.sum()):.3f} | "
                              f"{float(ok[qs == types.index('nearest')].mean()):.3f} |")
                print(lines2[-1], flush=True)


class RuleEvidence:
    """``fill="background"`` on ``arr_coc_host`` with the evidence read by a relative or a mass rule
    from the prior's attention p [B, N] (instead of ``log(N p_j)`` above a threshold)."""

    def __init__(self, reader: str):
        self.alloc = create_allocator("arr_coc_host", llm_reader=reader, fill="background").eval()
        self.alloc._background = self.background  # this script's own rule, on our own allocator
        self.rule = ("relative", 0.1)

    def mask(self, p: torch.Tensor) -> torch.Tensor:
        kind, v = self.rule
        p = p / p.sum(1, keepdim=True).clamp_min(1e-12)
        if kind == "relative":
            return p >= v * p.amax(1, keepdim=True)
        ps, order = p.sort(1, descending=True)
        keep = (ps.cumsum(1) - ps) < v  # the cells before the share is reached, and the one that reaches it
        return torch.zeros_like(keep).scatter(1, order, keep)

    def background(self, ctx, sel, information):
        ev = self.mask(self.alloc._llm_attention(ctx, torch.float32).clamp_min(0))  # [B, N]
        m = sel.extras["prior_information"].shape[1]
        ev = torch.cat([ev, ev.new_zeros(ev.shape[0], m - ev.shape[1])], 1)  # pooled candidates: not evidence
        sel.indices, sel.extras["evidence"] = background_fill(sel.indices, ev, ctx.fine, ctx.pyramid.positions, ctx.grid)
        sel.gain = None
        return sel


lines3 = ["| reader | rule | budget | accuracy | evidence / question | nearest | compare | count |", "|---|---|---|---|---|---|---|---|"]
for reader in ("question", "readout"):
    ruled = RuleEvidence(reader)
    for rule in [("relative", v) for v in (0.1, 0.2, 0.3, 0.5)] + [("mass", v) for v in (0.2, 0.5, 0.7)]:
        ruled.rule = rule
        for k in (64, 16, 4):
            ok, qs, n_ev = [], [], []
            with torch.no_grad():
                for b, e in zip(batches, encs):
                    res = run_allocation(vlm, ruled.alloc, b, k, encoded=e)
                    ok.append((res.logits.argmax(-1) == b["answer"]).float())
                    qs.append(b["question_type"])
                    n_ev.append(res.out.extras["evidence"].float())
            ok, qs, n_ev = torch.cat(ok), torch.cat(qs), torch.cat(n_ev)
            by = " | ".join(f"{float(ok[qs == types.index(t)].mean()):.3f}" for t in ("nearest", "compare", "count"))
            lines3.append(f"| {reader} | {rule[0]} {rule[1]:g} | {k} | {float(ok.mean()):.3f} | {float(n_ev.mean()):.2f} | {by} |")
            print(lines3[-1], flush=True)
body = (
    f"Validation split (task seed {cfg.data.task_seed}, examples {data.start}..{data.start + data.size - 1}). "
    f"{environment()}; {time.perf_counter() - t_start:.0f} s.\n\n"
    "## R-precision of training-free readings of LLM layer 0 (and the trained mixture)\n\n"
    "Fraction of the question's relevant cells R among the reading's top-|R| fine tokens (a question with no relevant "
    "cell counts 0). pmi of a token: `log(N p_t(j))`, its attention renormalised over the N fine tokens.\n\n"
    + "\n".join(lines1) + "\n\n"
    "## The training-free greedy with its prior read deeper, with and without background fill\n\n"
    "`arr_coc_host` (pre-LLM selection) whose prior is read after LLM layer 0 (the default), 1 or 2 of a partial "
    "prefill on every token. `greedy`: every pick counted as evidence. Precision / recall of the evidence picks "
    "against the relevance masks, pooled over questions.\n\n" + "\n".join(lines2) + "\n\n"
    "## Background fill on the layer-0 readings with adaptive evidence rules\n\n"
    "`relative r`: the cells whose attention is at least r times the largest; `mass s`: the smallest set of cells "
    "holding a share s of the attention (sorted), as evidence among the greedy's picks; the rest of the budget the "
    "least salient cells. The same greedy without fill: the `greedy` rows of the table above (layer 0).\n\n"
    + "\n".join(lines3) + "\n"
)
write_report("free_readings", "Issue 16 goal 1 diagnostic: training-free readings as evidence",
             f".venv/bin/python experiments/results/arr_coc_host_diag/free_readings.py {threads}", body,
             results_dir=ROOT / "experiments/results/arr_coc_host_diag")
print("commit", commit())
