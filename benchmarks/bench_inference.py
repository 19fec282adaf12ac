"""Inference-time cost of the MI tools: press overhead in prefill, retrieval top-k.

1. Prefill time of a randomly initialised Llama shaped like SmolLM2-135M's attention
   (hidden 576, 9 query / 3 KV heads, head_dim 64; ``--layers`` of its 30 layers) on a
   LLaVA-like prompt (576 visual + 32 text tokens, batch 1), with no press and with each
   press at ratios 0.5 and 0.9; the press's share is the time over no press.
2. Chunked top-k over a gallery (pmi via an untrained critic's embeddings vs cosine),
   gallery 10^4 and 10^5, 256 queries, k = 10.

``python -m benchmarks inference [--quick] [--repeats=3] [--threads=1] [--layers=4]``
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from kvpress import KnormPress, RandomPress, SnapKVPress, StreamingLLMPress
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from arr_coc.inference import CMIPress, InfoNCECritic, cosine_topk, embed_gallery, mi_topk
from benchmarks._report import argv_command, markdown_table, write_report


def _flag(argv: list[str], name: str, default: str) -> str:
    key = f"--{name}="  # the runner passes only dash-prefixed arguments: --name=value
    return next((a[len(key):] for a in argv if a.startswith(key)), default)


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    repeats = int(_flag(argv, "repeats", "3"))
    threads = _flag(argv, "threads", "1")
    if threads:
        torch.set_num_threads(int(threads))
    layers = int(_flag(argv, "layers", "4" if not quick else "2"))
    n_vis, n_txt = (576, 32) if not quick else (64, 8)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(cfg).eval()
    x = torch.randn(1, n_vis + n_txt, 576) * 0.02
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    def prefill(press=None):
        cache = DynamicCache()
        with torch.no_grad():
            if press is None:
                model.model(inputs_embeds=x, past_key_values=cache, use_cache=True)
            else:
                with press(model):
                    model.model(inputs_embeds=x, past_key_values=cache, use_cache=True)
        return cache

    presses = {
        "CMI (per KV head)": lambda r: CMIPress(compression_ratio=r, window_size=16),
        "CMI (head-averaged)": lambda r: CMIPress(compression_ratio=r, window_size=16, per_head=False),
        "SnapKV": lambda r: SnapKVPress(compression_ratio=r, window_size=16),
        "StreamingLLM": lambda r: StreamingLLMPress(compression_ratio=r),
        "Knorm": lambda r: KnormPress(compression_ratio=r),
        "Random": lambda r: RandomPress(compression_ratio=r, seed=0),
    }
    configs = [("no press", "-", None)] + [(n, r, make(r)) for n, make in presses.items() for r in (0.5, 0.9)]
    wall = {i: [] for i in range(len(configs))}
    cpu = {i: [] for i in range(len(configs))}
    for i, (_, _, press) in enumerate(configs):  # warm-up
        prefill(press)
    for _ in range(repeats):  # round robin: shared-machine load hits every row alike
        for i, (_, _, press) in enumerate(configs):
            w0, c0 = time.perf_counter(), time.process_time()
            prefill(press)
            wall[i].append(time.perf_counter() - w0)
            cpu[i].append(time.process_time() - c0)
    c_none = statistics.median(cpu[0])
    rows = []
    for i, (name, r, press) in enumerate(configs):
        c = statistics.median(cpu[i])
        kept = prefill(press).get_seq_length()
        rows.append([name, r, round(1e3 * min(wall[i]), 1), round(1e3 * c, 1),
                     "-" if press is None else f"{100 * (c - c_none) / c_none:+.0f}%", kept])
    sec1 = (
        f"Llama, {layers} layers, hidden 576, 9 / 3 heads (SmolLM2-135M attention shape, random weights), "
        f"{n_vis} + {n_txt} tokens, batch 1, {repeats} round-robin repeats after a warm-up; CPU time of the "
        "process (one thread, so it is the work done, whatever the machine's load).\n\n"
        + markdown_table(["press", "ratio", "prefill wall ms (min)", "CPU ms (median)", "CPU vs no press", "kept per head"], rows)
    )

    g = torch.Generator().manual_seed(0)
    critic = InfoNCECritic(64, 192, dim=64)
    nq, k = (256, 10) if not quick else (16, 10)
    queries = torch.randn(nq, 64, generator=g)
    rows2 = []
    for size in ((10_000, 100_000) if not quick else (2_000,)):
        imgs = torch.randn(size, 192, generator=g)
        gal = embed_gallery(critic, imgs)
        vecs = torch.randn(size, 64, generator=g)
        vecs_unit = torch.nn.functional.normalize(vecs, dim=-1)
        fns = [lambda: mi_topk(critic, queries, gal, k), lambda: cosine_topk(queries, vecs, k),
               lambda: cosine_topk(queries, vecs_unit, k), lambda: embed_gallery(critic, imgs)]
        times = [[] for _ in fns]
        for _ in range(repeats):
            for j, fn in enumerate(fns):
                c0 = time.process_time()
                fn()
                times[j].append(time.process_time() - c0)
        rows2.append([size] + [round(1e3 * statistics.median(t), 1) for t in times])
    sec2 = (
        f"{nq} queries, top-{k}, chunk 8192, critic width 64 (gallery embedded once, timed separately).\n\n"
        + markdown_table(["gallery", "pmi top-k CPU ms", "cosine top-k CPU ms", "cosine, pre-normalised gallery", "embed gallery CPU ms"], rows2)
    )
    body = (
        f"Load average at start: {load:.1f} (shared machine).\n\n## Press overhead in prefill\n\n{sec1}\n\n"
        f"## Retrieval top-k\n\n{sec2}\n"
    )
    write_report("inference" if not quick else "inference_quick", "Inference: press overhead and retrieval speed",
                 argv_command("inference"), body)
