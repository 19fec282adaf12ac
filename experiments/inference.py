"""Information-guided inference on the embedded task (Hydra entry point).

Three reports under ``experiments/results/``, each with the command and commit:

- ``inference_kv.md`` + ``inference_kv.png``: base-VLM answer accuracy vs. KV compression
  ratio with the image tokens in the cache: prefill ``[visual][question]`` under a press,
  then read the answer with ``[READ]`` as a decode step. Our :class:`CMIPress` (per KV head
  and head-averaged) against kvpress's own SnapKV, StreamingLLM, Knorm and Random presses.
- ``inference_routing.md`` + ``inference_routing.png``: requests routed by the pointwise MI
  pmi(question; image) of a small InfoNCE critic (trained here; the package's scorer and
  adapter are untrained at this point) to the full-token path or a compressed path (an
  allocator at a small budget), each path batched separately; throughput and accuracy over
  thresholds, beside all-full, all-compressed and random routing at the same split.
- ``inference_retrieval.md``: gallery retrieval ("find the images with a red circle": the
  query is a shape/colour question with its answer) by the critic's pmi, by cosine in the
  critic's own embedding space (the same per-query ranking) and by cosine in the raw LLM
  space; precision@k, pooled AUC across queries (what pmi's normalisation adds), and time
  at gallery sizes up to 10^5.

```bash
python experiments/inference.py                                  # all three sections
python experiments/inference.py sections=[kv] kv.num_questions=256
```
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from arr_coc.inference import (
    CMIPress,
    MIRouter,
    compressed_answer_logits,
    cosine_topk,
    embed_gallery,
    mi_topk,
    pointwise_mi,
    train_critic,
    vlm_features,
)
from arr_coc.reporting import markdown_table, write_report

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- model and data
def load_vlm(cfg: DictConfig):
    """The base VLM: ``cfg.checkpoint``, else the newest ``experiments/runs/*/best``, else untrained.

    Returns (vlm, task, tokenizer, description).
    """
    from arr_coc.training.base_vlm import BaseVLM, BaseVLMConfig
    from arr_coc.training.task import VQATask
    from arr_coc.training.tokenizer import build_tokenizer

    task = VQATask(seed=int(cfg.task_seed), image_size=int(cfg.image_size), grid=int(cfg.grid))
    tok = build_tokenizer(task)
    folder = Path(cfg.checkpoint)
    folder = folder if folder.is_absolute() else ROOT / folder
    candidates = [folder] + sorted(ROOT.glob("experiments/runs/*/best"), key=lambda p: p.stat().st_mtime, reverse=True)
    for f in candidates:
        if (f / "config.json").is_file():
            import hashlib

            digest = hashlib.sha256((f / "model.safetensors").read_bytes()).hexdigest()[:12]
            vlm = BaseVLM.from_pretrained(f).eval()
            where = f.relative_to(ROOT) if f.is_relative_to(ROOT) else f
            return vlm, task, tok, f"trained checkpoint `{where}` (model.safetensors sha256 {digest}...)"
    log.warning("no base VLM checkpoint found: using an untrained one")
    torch.manual_seed(0)
    return BaseVLM(BaseVLMConfig.for_task(task, tok)).eval(), task, tok, "UNTRAINED base VLM (no checkpoint found)"


def make_batch(task, tok, start: int, length: int, qtypes=None):
    from arr_coc.training.datamodule import VQACollator
    from arr_coc.training.task import QUESTION_TYPES

    items = []
    for i in range(start, start + length):
        ex = task.example(i) if qtypes is None else task.example(i, qtypes[(i - start) % len(qtypes)])
        items.append({"image": ex.image, "question": ex.question, "answer": ex.answer, "question_type": ex.qtype})
    return VQACollator(tok, question_types=QUESTION_TYPES)(items), items


@torch.no_grad()
def encode(vlm, pixels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """[B, 3, H, W] -> fine ViT tokens [B, N, Dv] (chunked)."""
    return torch.cat([vlm.encode_image(pixels[a : a + chunk])[:, vlm.num_prefix_tokens :] for a in range(0, len(pixels), chunk)])


def _save_figure(path: Path, draw) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # pragma: no cover - matplotlib is installed in the project env
        return None
    fig = plt.figure(figsize=(6.4, 4.2))
    draw(fig.gca())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- KV compression
def kv_section(vlm, task, tok, cfg, out_dir: Path, model_desc: str) -> str:
    from kvpress import KnormPress, RandomPress, SnapKVPress, StreamingLLMPress

    c = cfg.kv
    batch, _ = make_batch(task, tok, int(c.start), int(c.num_questions))
    with torch.no_grad():
        visual = vlm.project(encode(vlm, batch["pixels"]))
    q_ids, q_mask, answer = batch["question_ids"], batch["question_mask"], batch["answer"]
    w = int(c.window_size)
    alphas = [float(a) for a in c.cmi_alphas]
    presses = {}
    for i, a in enumerate(alphas):
        presses[f"CMI (ours, per KV head, alpha {a:g})"] = lambda r, a=a: CMIPress(compression_ratio=r, window_size=w, alpha=a)
        if i == 0:
            presses[f"CMI (ours, head-averaged, alpha {a:g})"] = lambda r, a=a: CMIPress(
                compression_ratio=r, window_size=w, alpha=a, per_head=False
            )
    presses |= {
        "SnapKV": lambda r: SnapKVPress(compression_ratio=r, window_size=w, kernel_size=int(c.snapkv_kernel)),
        "StreamingLLM": lambda r: StreamingLLMPress(compression_ratio=r, n_sink=int(c.n_sink)),
        "Knorm": lambda r: KnormPress(compression_ratio=r),
        "Random": lambda r: RandomPress(compression_ratio=r, seed=0),
    }
    ratios = [float(r) for r in c.ratios]
    ref = vlm.answer_logits(visual, None, None, q_ids, q_mask).argmax(-1)
    layers, hkv = len(vlm.llm.model.layers), int(vlm.llm.config.num_key_value_heads)
    head_dim = int(getattr(vlm.llm.config, "head_dim", None) or vlm.llm.config.hidden_size // vlm.llm.config.num_attention_heads)
    bytes_per = 2 * head_dim * visual.element_size()  # K and V of one (position, head)
    acc: dict[str, list[float]] = {}
    agree: dict[str, list[float]] = {}
    kept: dict[float, float] = {}
    secs: dict[str, float] = {}
    for name, make in presses.items():
        acc[name], agree[name] = [], []
        t0 = time.perf_counter()
        for r in ratios:
            press = make(r)
            logits, entries = compressed_answer_logits(vlm, visual, None, q_ids, q_mask, press=press)
            pred = logits.argmax(-1)
            acc[name].append(float((pred == answer).float().mean()))
            agree[name].append(float((pred == ref).float().mean()))
            kept.setdefault(r, float(entries.float().mean()))
        secs[name] = time.perf_counter() - t0
    full_entries = kept[ratios[0]] if ratios[0] == 0 else float(layers * hkv * (visual.shape[1] + q_mask.sum(1)).float().mean())
    header = ["press"] + [f"ratio {r:g}" for r in ratios] + ["s (all ratios)"]
    rows_acc = [[n] + [round(a, 4) for a in acc[n]] + [round(secs[n], 2)] for n in presses]
    rows_agree = [[n] + [round(a, 4) for a in agree[n]] for n in presses]
    mem_rows = [
        [f"{r:g}", round(kept[r], 1), round(kept[r] * bytes_per / 1024, 2), f"{100 * (1 - kept[r] / full_entries):.1f}%"]
        for r in ratios
    ]
    png = _save_figure(out_dir / "inference_kv.png", lambda ax: (
        [ax.plot(ratios, acc[n], marker="o", label=n) for n in presses],
        ax.axhline(float((ref == answer).float().mean()), color="k", ls=":", lw=1, label="no press"),
        ax.set_xlabel("compression ratio (fraction of KV entries removed)"),
        ax.set_ylabel("answer accuracy"),
        ax.set_title("KV-cache compression, image tokens in the cache"),
        ax.legend(fontsize=7),
    ))
    q_len = q_mask.sum(1).float()
    return (
        f"Model: {model_desc}. {len(answer)} questions (task seed {cfg.task_seed}, examples "
        f"{c.start}..{int(c.start) + len(answer) - 1}, the default question mix). Cache per question: "
        f"{visual.shape[1]} visual tokens + {q_len.min():.0f}-{q_len.max():.0f} question tokens, "
        f"{layers} layers x {hkv} KV heads. Prefill `[visual][question]` inside `with press(vlm.llm)` "
        "(kvpress's hooks on every attention layer compress the cache at the end of each layer's "
        "prefill), then `[READ]` is fed as one decode step on the compressed cache "
        "(`arr_coc.inference.compressed_answer_logits`); positions as in `BaseVLM.answer_logits` "
        "(visual at RoPE 0, question 1..T, [READ] T+1), so ratio 0 reproduces `answer_logits` "
        f"(tested). Observation window: the last {w} positions for CMI and SnapKV (kept by both); "
        "CMI's alpha weighs I(k; Q | S) against the coverage term R(k | S) of `arr_coc.attending` "
        f"(alpha 1: query information only); {c.alpha_note} "
        f"StreamingLLM keeps {c.n_sink} sink positions (the first visual tokens) and the most recent ones. "
        "Every press keeps `max(1, int(L (1 - ratio)))` entries per head (kvpress's count), so the memory "
        "column is the same for all.\n\n"
        "All kvpress presses ran on this model as they are: the hooks need `model.model.layers[i].self_attn` "
        "with `q_proj`, `head_dim`, `config` and `kwargs['position_embeddings']`, which the transformers Llama "
        "reading `inputs_embeds` provides; our non-monotone position ids (every visual token at 0) are "
        "irrelevant to them since they score post-RoPE keys and never re-rotate.\n\n"
        "### Answer accuracy\n\n" + markdown_table(header, rows_acc)
        + f"\n\nNo press: {float((ref == answer).float().mean()):.4f}.\n\n"
        "### Agreement with the uncompressed answer\n\n" + markdown_table(header[:-1], rows_agree)
        + "\n\n### KV memory per question\n\n"
        + markdown_table(["ratio", "KV entries (pos x head x layer)", "KiB (fp32 K+V)", "saved"], mem_rows)
        + ("\n\n![accuracy vs compression](inference_kv.png)\n" if png else "\n")
    )


# ---------------------------------------------------------------------- critics
def critic_data(vlm, task, tok, start: int, length: int, *, with_answer: bool, qtypes=None):
    """Paired critic features: (queries [N, Dl], images [N, 2 Dv], batch, items)."""
    batch, items = make_batch(task, tok, start, length, qtypes)
    q_ids, q_mask = batch["question_ids"], batch["question_mask"]
    if with_answer:  # append the answer word to the question
        q_ids = torch.cat([q_ids, batch["answer"][:, None]], 1)
        lengths = q_mask.sum(1)
        q_ids[torch.arange(len(q_ids)), lengths] = batch["answer"]
        q_mask = torch.cat([q_mask, torch.zeros_like(q_mask[:, :1])], 1)
        q_mask[torch.arange(len(q_ids)), lengths] = True
    q, _ = vlm_features(vlm, None, q_ids, q_mask)
    tokens = encode(vlm, batch["pixels"])
    x = torch.cat([tokens.mean(1), tokens.amax(1)], -1)
    return q, x, batch, items, tokens, (q_ids, q_mask)


# ---------------------------------------------------------------------- routing
def routing_section(vlm, task, tok, cfg, out_dir: Path, model_desc: str) -> str:
    from arr_coc.allocators import create_allocator

    c = cfg.routing
    t0 = time.perf_counter()
    q_tr, x_tr, *_ = critic_data(vlm, task, tok, int(c.train_start), int(c.train_pairs), with_answer=False)
    critic, hist = train_critic(q_tr, x_tr, steps=int(c.critic_steps), batch_size=int(c.critic_batch), seed=0)
    train_s = time.perf_counter() - t0
    q, x, batch, items, tokens, _ = critic_data(vlm, task, tok, int(c.start), int(c.num_requests), with_answer=False)
    reference = x_tr[: int(c.reference)]
    allocator = create_allocator(str(c.allocator))
    budget = int(c.budget)
    p = vlm.num_prefix_tokens

    def full_path(b):
        visual = vlm.project(b["tokens"])
        return vlm.answer_logits(visual, None, None, b["question_ids"], b["question_mask"])

    def compressed_path(b):
        visual = vlm.project(b["tokens"])
        query = vlm.query_embeddings(b["question_ids"])
        out = allocator(visual, query=query, query_mask=b["question_mask"], budget=budget, grid=vlm.grid, num_prefix_tokens=0)
        return vlm.answer_logits(out.tokens, out.mask, out.positions, b["question_ids"], b["question_mask"])

    requests = {
        "tokens": tokens,
        "question_ids": batch["question_ids"],
        "question_mask": batch["question_mask"],
        "q": q,
        "x": x,
    }
    del p

    def score(b=requests):
        return pointwise_mi(critic, b["q"], b["x"], reference)

    with torch.no_grad():
        scores = score()
        score_s = min(_timed(score) for _ in range(int(c.repeats)))
    answer = batch["answer"]
    qtypes = [it["question_type"] for it in items]
    fractions = [float(f) for f in c.full_fractions]
    sorted_scores = scores.sort(descending=True).values
    gen = torch.Generator().manual_seed(0)
    random_scores = torch.rand(len(scores), generator=gen)
    rows, plot = [], {"MI routing": [], "random routing": []}
    configs = []
    for f in fractions:
        n_full = round(f * len(scores))
        thr = math.inf if n_full == 0 else float(sorted_scores[n_full - 1])
        rthr = math.inf if n_full == 0 else float(random_scores.sort(descending=True).values[n_full - 1])
        configs.append((f, "MI routing", thr, scores, True))
        configs.append((f, "random routing", rthr, random_scores, False))
    results = {}
    with torch.no_grad():
        for rep in range(int(c.repeats)):  # interleaved repeats: shared-machine load hits every row alike
            for f, name, thr, sc, uses_score in configs:
                router = MIRouter(full_path, compressed_path, threshold=thr, max_batch_size=int(c.max_batch_size))
                t = time.perf_counter()
                res = router(requests, sc)
                dt = time.perf_counter() - t + (score_s if uses_score and 0 < f < 1 else 0.0)
                key = (f, name)
                prev = results.get(key)
                results[key] = (res, dt if prev is None else min(prev[1], dt))
    full_acc_by = {}
    for (f, name), (res, dt) in results.items():
        correct = res.outputs.argmax(-1) == answer
        acc = float(correct.float().mean())
        n_full = int(res.full.sum())
        rows.append([name, f"{f:g}", n_full, round(acc, 4), round(len(answer) / dt, 1), len(res.batches)])
        plot[name].append((f, acc, len(answer) / dt))
        if f in (0.0, 1.0):
            full_acc_by[f] = correct
    rows.sort(key=lambda r: (r[0] != "MI routing", float(r[1])))
    # per question type: mean pmi and the accuracy of each path
    from collections import defaultdict

    by_type = defaultdict(list)
    for i, t in enumerate(qtypes):
        by_type[t].append(i)
    type_rows = []
    for t, idx in sorted(by_type.items()):
        idx_t = torch.tensor(idx)
        type_rows.append([
            t, len(idx), round(float(scores[idx_t].mean()), 3),
            round(float(full_acc_by[1.0][idx_t].float().mean()), 4) if 1.0 in full_acc_by else "-",
            round(float(full_acc_by[0.0][idx_t].float().mean()), 4) if 0.0 in full_acc_by else "-",
        ])
    png = _save_figure(out_dir / "inference_routing.png", lambda ax: (
        [ax.plot([v[2] for v in sorted(plot[n])], [v[1] for v in sorted(plot[n])], marker="o", label=n) for n in plot],
        ax.set_xlabel("throughput (requests / s)"),
        ax.set_ylabel("answer accuracy"),
        ax.set_title("routing: fraction of requests on the full path varies along each curve"),
        ax.legend(fontsize=8),
    ))
    mi_est = float(pointwise_mi(critic, q, x, reference).mean())
    return (
        f"Model: {model_desc}. Workload: {len(answer)} requests (examples {c.start}..), the task's default "
        f"question mix, in arrival order; `max_batch_size={c.max_batch_size}` per path. Full path: the "
        f"{vlm.num_patches} fine tokens. Compressed path: allocator `{c.allocator}` at budget {budget} on the "
        "projected tokens (query = the question's LLM embeddings). Routing score: pmi(question; image) in nats from an "
        f"InfoNCE critic (`arr_coc.inference.critic`, trained here for {c.critic_steps} steps on {c.train_pairs} "
        f"pairs in {train_s:.1f} s incl. features; final InfoNCE bound {hist[-1]:.3f} nats of log {c.critic_batch} = "
        f"{math.log(int(c.critic_batch)):.3f}; mean pmi on the workload {mi_est:.3f} nats, reference sample "
        f"{len(reference)} images). The package's ParticipatoryScorer / QualityAdapter critic are untrained at this "
        "point, hence this small critic. A request goes to the full path when its pmi >= threshold; the threshold "
        "is set at the score quantile that sends the given fraction to full. Random routing sends the same number "
        "at random. Throughput = requests / (serving time + scoring time, the latter only where both paths are used), "
        f"best of {c.repeats} interleaved repeats, {torch.get_num_threads()} thread(s). Scoring the workload took "
        f"{score_s * 1000:.1f} ms. ViT encoding is excluded (shared by both paths).\n\n"
        + markdown_table(["routing", "fraction full", "# full", "accuracy", "requests/s", "batches"], rows)
        + "\n\n### By question type (all-full vs all-compressed accuracy, mean pmi)\n\n"
        + markdown_table(["type", "n", "mean pmi (nats)", "acc full", "acc compressed"], type_rows)
        + ("\n\n![routing](inference_routing.png)\n" if png else "\n")
    )


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------------- retrieval
def retrieval_section(vlm, task, tok, cfg, out_dir: Path, model_desc: str) -> str:
    from arr_coc.training.task import COLOURS, SHAPES

    c = cfg.retrieval
    qtypes = ["shape", "colour"]
    t0 = time.perf_counter()
    q_tr, x_tr, *_ = critic_data(vlm, task, tok, int(c.train_start), int(c.train_pairs), with_answer=True, qtypes=qtypes)
    critic, hist = train_critic(q_tr, x_tr, steps=int(c.critic_steps), batch_size=int(c.critic_batch), seed=0)
    train_s = time.perf_counter() - t0
    # gallery: images with the objects they hold; queries: questions + answers about some of them
    g = int(c.gallery)
    q_all, x_all, batch, items, tokens, (qa_ids, qa_mask) = critic_data(
        vlm, task, tok, int(c.start), g, with_answer=True, qtypes=qtypes
    )
    has = torch.zeros(g, len(COLOURS), len(SHAPES), dtype=torch.bool)
    for i in range(g):
        for _, _, ci, si in task.scene(int(c.start) + i).objects:
            has[i, ci, si] = True
    colours, shapes = list(COLOURS), list(SHAPES)
    nq = int(c.num_queries)
    want, rows = [], []
    for i, it in enumerate(items):  # a type with no valid question on a scene falls back to another type
        words = (it["question"] + " " + it["answer"]).split()
        ci = [colours.index(w) for w in words if w in colours]
        si = [shapes.index(w) for w in words if w in shapes]
        if it["question_type"] in qtypes and ci and si:
            want.append((ci[0], si[0]))
            rows.append(i)
        if len(rows) == nq:
            break
    nq = len(rows)
    relevant = torch.stack([has[:, ci, si] for ci, si in want])  # [Q, G]
    queries = q_all[torch.tensor(rows)]
    with torch.no_grad():
        img_llm = vlm.project(tokens).mean(1)  # [G, Dl] the raw-space cosine's image vector
        gal_emb = embed_gallery(critic, x_all)  # [G, dim] unit vectors in the critic's space
        q_emb = critic.embed_query(queries)  # [Q, dim]
    k_list = [int(k) for k in c.k]
    kmax = max(k_list)
    cs = int(c.chunk_size)
    mi_s, mi_idx = mi_topk(critic, queries, gal_emb, kmax, chunk_size=cs)
    cc_s, cc_idx = cosine_topk(q_emb, gal_emb, kmax, chunk_size=cs)
    _, raw_idx = cosine_topk(queries, img_llm, kmax, chunk_size=cs)
    methods = {
        "pmi (InfoNCE critic)": mi_idx,
        "cosine, critic space (the critic's own embeddings)": cc_idx,
        "cosine, raw LLM space (untrained)": raw_idx,
    }
    acc_rows = []
    for name, idx in methods.items():
        hits = relevant.gather(1, idx).float()
        acc_rows.append([name] + [round(float(hits[:, :k].mean()), 4) for k in k_list])
    acc_rows.append(["chance (base rate)"] + [round(float(relevant.float().mean()), 4)] * len(k_list))
    same_rank = float((mi_idx == cc_idx).all(1).float().mean())
    # pooled over queries: pmi subtracts a per-query log-sum-exp, so unlike the per-query
    # ranking its scores can be compared across queries; ROC AUC over all (query, image)
    # pairs measures that (1 = every relevant pair above every irrelevant one)
    with torch.no_grad():
        cos_critic = q_emb @ gal_emb.T  # [Q, G]
        pmi_all = cos_critic * critic.scale - (torch.logsumexp(cos_critic * critic.scale, 1, keepdim=True) - math.log(g))
        qn = torch.nn.functional.normalize(queries, dim=-1)
        cos_raw = qn @ torch.nn.functional.normalize(img_llm, dim=-1).T
    auc_rows = [
        ["pmi (InfoNCE critic)", round(_pooled_auc(pmi_all, relevant), 4)],
        ["cosine, critic space", round(_pooled_auc(cos_critic, relevant), 4)],
        ["cosine, raw LLM space", round(_pooled_auc(cos_raw, relevant), 4)],
    ]
    thr_rows = []
    sel_pmi = pmi_all > 0
    n_sel = int(sel_pmi.sum())
    top_cos = torch.zeros(cos_critic.numel(), dtype=torch.bool)
    top_cos[cos_critic.flatten().topk(max(n_sel, 1)).indices] = True
    for name, sc in (("pmi > 0 nats", sel_pmi), ("critic cosine, the same number of top pairs", top_cos.view_as(cos_critic))):
        sel = sc.float()
        prec = float((sel * relevant).sum() / sel.sum().clamp_min(1))
        rec = float((sel * relevant).sum() / relevant.sum())
        thr_rows.append([name, int(sel.sum()), round(prec, 4), round(rec, 4)])
    # speed at growing gallery sizes (tiled embeddings beyond the generated gallery)
    time_rows = []
    for size in [int(s) for s in c.timing_sizes]:
        reps = math.ceil(size / g)
        ge = gal_emb.repeat(reps, 1)[:size]
        gl = img_llm.repeat(reps, 1)[:size]
        t_mi = min(_timed(lambda: mi_topk(critic, queries, ge, kmax, chunk_size=cs)) for _ in range(int(c.repeats)))
        t_cc = min(_timed(lambda: cosine_topk(q_emb, ge, kmax, chunk_size=cs)) for _ in range(int(c.repeats)))
        t_cos = min(_timed(lambda: cosine_topk(queries, gl, kmax, chunk_size=cs)) for _ in range(int(c.repeats)))
        time_rows.append([size, round(t_mi * 1000, 1), round(t_cc * 1000, 1), round(t_cos * 1000, 1), round(nq / t_mi, 1), round(nq / t_cos, 1)])
    t_embed = _timed(lambda: embed_gallery(critic, x_all))
    return (
        f"Model: {model_desc}. Gallery: {g} generated images (examples {c.start}..). Queries: the first {nq} of "
        "their shape / colour questions with the answer appended (\"what shape is the red object ? circle\"), i.e. "
        "\"find images with a red circle\"; a gallery image is relevant when it holds an object of that colour and "
        "shape (ground truth from the scenes). MI ranking: pmi(query; image) of an InfoNCE critic on (question + "
        "answer word embeddings, mean+max pooled ViT tokens), trained here for "
        f"{c.critic_steps} steps on {c.train_pairs} disjoint pairs ({train_s:.1f} s incl. features; final bound "
        f"{hist[-1]:.3f} nats). Three rankings, so that like is compared with like: (1) pmi; (2) cosine "
        "similarity in the critic's own embedding space (the same trained encoders, no MI correction); (3) cosine "
        "in the raw LLM space: the query's mean LLM input embedding vs. the image's mean projected visual token "
        "(no training for this task). All rank with the same chunked top-k "
        f"(`chunk_size={c.chunk_size}`), on CPU, {torch.get_num_threads()} thread(s).\n\n"
        "### Precision@k\n\n" + markdown_table(["ranking"] + [f"P@{k}" for k in k_list], acc_rows)
        + f"\n\nFor one query, pmi(q; x) = s cos(g(q), h(x)) - c(q) with s > 0 and c(q) the same for every "
        f"image, so (1) and (2) rank every query's gallery identically: the top-{kmax} lists agree exactly on "
        f"{100 * same_rank:.1f}% of the queries (ties in float rounding aside). The gap to (3) is what the "
        "trained critic's encoders learnt, not something the MI formula adds.\n\n"
        "### What the MI normalisation does add: scores comparable across queries\n\n"
        "Pooled over every (query, image) pair, the ROC AUC of relevant vs. irrelevant pairs "
        "(one threshold for all queries; 1 = every relevant pair scores above every irrelevant one):\n\n"
        + markdown_table(["score", "pooled ROC AUC"], auc_rows)
        + "\n\nA fixed, query-independent cut: pmi > 0 (the pair is more likely under p(x | q) than under "
        "p(x)), against the same number of pairs taken from the top of the pooled critic cosine (cosine has no "
        "natural zero, so it is given pmi's count):\n\n"
        + markdown_table(["selection", "pairs selected", "precision", "recall"], thr_rows)
        + f"\n\n### Time for {nq} queries (top-{kmax}; gallery rows beyond {g} are tiled copies)\n\n"
        + markdown_table(
            ["gallery", "pmi ms", "critic cosine ms", "raw cosine ms", "pmi queries/s", "raw cosine queries/s"], time_rows
        )
        + f"\n\nEmbedding the {g}-image gallery with the critic once: {t_embed * 1000:.1f} ms (the raw cosine "
        "baseline's projection is not timed).\n"
    )


def _pooled_auc(scores: torch.Tensor, relevant: torch.Tensor) -> float:
    """ROC AUC of scores [Q, G] for relevant [Q, G] pairs pooled over queries (Mann-Whitney, ties halved)."""
    from scipy.stats import rankdata

    s = scores.flatten().double().numpy()
    r = relevant.flatten().numpy()
    n_pos = int(r.sum())
    n_neg = r.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[r].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ---------------------------------------------------------------------- entry point
SECTIONS = {
    "kv": ("inference_kv", "KV-cache compression by conditional MI vs. kvpress baselines", kv_section),
    "routing": ("inference_routing", "MI-based request routing: throughput vs. accuracy", routing_section),
    "retrieval": ("inference_retrieval", "MI retrieval vs. cosine similarity", retrieval_section),
}


def run(cfg: DictConfig, command: str = "python experiments/inference.py") -> dict[str, Path]:
    """Run the configured sections; returns {report name: path}."""
    unknown = set(cfg.sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"sections: unknown {sorted(unknown)}, expected some of {sorted(SECTIONS)}")
    torch.manual_seed(int(cfg.seed))
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    out_dir = Path(cfg.results_dir)
    out_dir = out_dir if out_dir.is_absolute() else ROOT / out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    vlm, task, tok, desc = load_vlm(cfg)
    paths = {}
    for name in cfg.sections:
        report, title, fn = SECTIONS[name]
        t = time.perf_counter()
        with torch.no_grad() if name == "kv" else contextlib.nullcontext():
            body = fn(vlm, task, tok, cfg, out_dir, desc)
        body += f"\n(section wall time {time.perf_counter() - t:.0f} s)\n"
        paths[report] = write_report(report, title, command, body, results_dir=out_dir)
    return paths


@hydra.main(version_base="1.3", config_path="../conf", config_name="inference")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run(cfg, " ".join(["python experiments/inference.py", *HydraConfig.get().overrides.task]))


if __name__ == "__main__":
    main()
