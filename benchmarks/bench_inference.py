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

import torch
from kvpress import KnormPress, RandomPress, SnapKVPress, StreamingLLMPress
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from arr_coc.inference import CMIPress, InfoNCECritic, cosine_topk, embed_gallery, mi_topk
from benchmarks._report import argv_command, markdown_table, median_time, write_report


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
    t_none = median_time(prefill, repeats=repeats)
    rows = [["no press", "-", round(1e3 * t_none, 1), "-", n_vis + n_txt]]
    for name, make in presses.items():
        for r in (0.5, 0.9):
            press = make(r)
            t = median_time(lambda: prefill(press), repeats=repeats)
            kept = prefill(press).get_seq_length()
            rows.append([name, r, round(1e3 * t, 1), f"{100 * (t - t_none) / t_none:+.0f}%", kept])
    sec1 = (
        f"Llama, {layers} layers, hidden 576, 9 / 3 heads (SmolLM2-135M attention shape, random weights), "
        f"{n_vis} + {n_txt} tokens, batch 1, median of {repeats}.\n\n"
        + markdown_table(["press", "ratio", "prefill ms", "vs no press", "kept per head"], rows)
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
        t_mi = median_time(lambda: mi_topk(critic, queries, gal, k), repeats=repeats)
        t_cos = median_time(lambda: cosine_topk(queries, vecs, k), repeats=repeats)
        t_emb = median_time(lambda: embed_gallery(critic, imgs), repeats=repeats)
        rows2.append([size, round(1e3 * t_mi, 1), round(1e3 * t_cos, 1), round(1e3 * t_emb, 1)])
    sec2 = (
        f"{nq} queries, top-{k}, chunk 8192, critic width 64 (gallery embedded once, timed separately).\n\n"
        + markdown_table(["gallery", "pmi top-k ms", "cosine top-k ms", "embed gallery ms"], rows2)
    )
    body = (
        f"Load average at start: {load:.1f} (shared machine).\n\n## Press overhead in prefill\n\n{sec1}\n\n"
        f"## Retrieval top-k\n\n{sec2}\n"
    )
    write_report("inference" if not quick else "inference_quick", "Inference: press overhead and retrieval speed",
                 argv_command("inference"), body)
