"""Prefill time and peak memory of a ~0.5B Qwen2-VL-class model at full vs 1/4, 1/9, 1/18 visual tokens.

``python -m benchmarks qwen_vl [--repeats=3] [--allocator=random] [--layers=24] [--threads=1]``

The model is built from a config with random weights (no download): a Qwen2-0.5B-shaped
language model (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocabulary 151,936,
tied embeddings) behind a small Qwen2-VL vision tower (2 blocks, width 256, 14-pixel
patches, 2 x 2 merger). One 672 x 672 image gives a 48 x 48 patch grid, i.e. 24 x 24 = 576
merged tokens, after a short text prompt. Each configuration runs a full prefill (vision
tower, allocation, language model with ``use_cache=True``) through
:func:`arr_coc.integrations.qwen_vl.wrap`; the unwrapped model is the reference row.

Peak memory is the peak resident set size during the call minus the size before it,
sampled every millisecond from ``/proc/self/statm`` (CPU; on CUDA the allocator's peak).
Results go to ``experiments/results/qwen_vl.md``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import threading
import time
from fractions import Fraction

import torch

from benchmarks._report import markdown_table, median_time, write_report

IMG, VID, VS, VE = 151655, 151656, 151652, 151653


def build_model(layers: int = 24, device: str = "cpu"):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[8, 12, 12]),
            bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, tie_word_embeddings=True,
        ),
        vision_config=dict(depth=2, embed_dim=256, hidden_size=896, num_heads=4, mlp_ratio=4, patch_size=14,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
        tie_word_embeddings=True, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(cfg).eval().to(device)


def make_inputs(side: int = 48, text: int = 24, device: str = "cpu") -> dict[str, torch.Tensor]:
    """One prompt: ``text`` tokens, the image (side x side patches), 8 more tokens."""
    n = (side // 2) ** 2
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(1000, 100000, (text + 8,), generator=gen).tolist()
    ids = words[:text] + [VS] + [IMG] * n + [VE] + words[text:]
    input_ids = torch.tensor([ids], device=device)
    return dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.randn(side * side, 3 * 2 * 14 * 14, generator=gen).to(device),
        image_grid_thw=torch.tensor([[1, side, side]], device=device),
    )


def _precise_malloc() -> bool:
    """Make glibc serve every allocation >= 64 KiB by mmap, so that freed tensors leave the RSS.

    Without this, memory freed by an earlier (larger) configuration is reused and the RSS of
    a later one does not grow at all. Returns False when glibc is not available.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 64 * 1024)
        libc.mallopt(m_trim_threshold, 64 * 1024)
        _precise_malloc.trim = libc.malloc_trim
        return True
    except OSError:  # pragma: no cover - not glibc
        return False


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn, device: str = "cpu") -> int:
    """Peak extra memory (bytes) while ``fn()`` runs."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    trim = getattr(_precise_malloc, "trim", None)
    if trim is not None:
        trim(0)
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], _rss())
    return peak[0] - base


def main(argv: list[str] | None = None) -> None:
    from arr_coc.integrations.qwen_vl import wrap

    ap = argparse.ArgumentParser(prog="python -m benchmarks qwen_vl")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--side", type=int, default=48, help="image side in patches (48 -> 576 merged tokens)")
    ap.add_argument("--allocator", default="random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: CPU time is not inflated by idle OpenMP workers spinning on a busy machine)")
    args = ap.parse_args(argv or [])
    torch.set_num_threads(args.threads)
    precise = args.device.startswith("cuda") or _precise_malloc()

    t0 = time.perf_counter()
    model = build_model(args.layers, args.device)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    lm_params = sum(p.numel() for p in model.get_decoder().parameters())
    inputs = make_inputs(args.side, device=args.device)
    n_img = int(inputs["image_grid_thw"][0, 1:].prod()) // 4
    text_len = int(inputs["input_ids"].shape[1]) - n_img
    cfg = model.config.get_text_config()
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    configs = []  # (label, merged tokens given to the LM or None, callable)

    def vision():
        model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        sync()

    def plain():
        model(**inputs, use_cache=True, logits_to_keep=1)
        sync()

    configs.append(("vision tower alone", None, vision))
    configs.append(("unwrapped model", n_img, plain))
    for frac in [Fraction(1), Fraction(1, 4), Fraction(1, 9), Fraction(1, 18)]:
        k = max(1, round(float(frac) * n_img))
        name = "full" if frac == 1 else args.allocator
        vlm = wrap(model, name, budget=k, query="prompt")  # random prompts: no chat template

        def run(vlm=vlm, k=k):
            out = vlm(**inputs, use_cache=True, logits_to_keep=1)
            assert out.past_key_values.get_seq_length() == text_len + k
            sync()

        configs.append(("`full` (wrapper)" if frac == 1 else f"`{name}`, {frac} of the image ({k} tokens)", k, run))

    wall = {c[0]: [] for c in configs}
    cpu = {c[0]: [] for c in configs}
    mem = {}
    with torch.inference_mode():
        for label, _, fn in configs:  # warm-up
            fn()
        for label, _, fn in configs:
            mem[label] = peak_memory(fn, args.device)
        # interleaved repeats: load from other processes drifts over minutes, hits every row alike
        for rep in range(args.repeats):
            for label, _, fn in configs:
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[label].append(time.perf_counter() - w0)
                cpu[label].append(time.process_time() - c0)
            print(f"repeat {rep + 1}/{args.repeats}:", {k: round(v[-1], 2) for k, v in wall.items()}, flush=True)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    base_wall, base_cpu = med(wall["unwrapped model"]), med(cpu["unwrapped model"])
    table_rows = []
    for label, k, _ in configs:
        seq = "-" if k is None else text_len + k
        kv = "-" if k is None else (text_len + k) * kv_per_token / 2**20
        speed = "-" if k is None else base_cpu / med(cpu[label])
        table_rows.append([label, seq, med(wall[label]), med(cpu[label]), speed, mem[label] / 2**20, kv])
    body = (
        f"Model: Qwen2-VL-class, random weights, {params / 1e6:.0f}M parameters ({lm_params / 1e6:.0f}M in the "
        f"language model: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, "
        f"{cfg.num_key_value_heads} KV heads, tied embeddings), vision tower 2 blocks of width 256, "
        f"built in {build_s:.1f} s.  \n"
        f"Threads: {torch.get_num_threads()}.  \n"
        f"Input: batch 1, one image of {args.side} x {args.side} patches = {n_img} merged tokens, "
        f"{text_len} text tokens (incl. vision start/end). Device: {args.device}, fp32, SDPA.  \n"
        f"Prefill = vision tower + allocation + language model with `use_cache=True`, logits of the last "
        f"position only (as in `generate`'s prefill). Allocator for the reduced rows: `{args.allocator}`.  \n"
        f"Time: median of {args.repeats} repeats after a warm-up, configurations interleaved; wall seconds and "
        f"CPU seconds of this process (all threads). The machine is shared, so wall time carries other "
        f"processes' load; CPU time is the steadier figure and the speed-up is computed from it.  \n"
        f"Peak memory: peak RSS during one call minus the RSS before it, sampled every ms, with glibc serving "
        f"allocations of 64 KiB and more by mmap "
        f"({'on' if precise else 'NOT available: figures include allocator reuse'}) so that freed tensors "
        f"leave the RSS; an estimate (a peak shorter than 1 ms can be missed).  \n"
        f"The vision tower runs on every patch whatever the budget, so its own peak (first row) bounds the "
        f"peak of the reduced rows from below; allocation shrinks the language model's part and the KV cache.  \n"
        f"KV cache: fp32 keys and values of the prefilled sequence, "
        f"{kv_per_token / 1024:.0f} KiB per token.\n\n"
        + markdown_table(
            ["configuration", "LM sequence", "wall s", "CPU s", "speed-up (CPU) vs unwrapped", "peak extra MiB",
             "KV cache MiB"],
            table_rows,
        )
        + f"\n\nWall times per repeat: {{{', '.join(f'{k!r}: {[round(x, 2) for x in v]}' for k, v in wall.items())}}}\n"
    )
    command = "python -m benchmarks qwen_vl" + "".join(f" {a}" for a in (argv or []))
    write_report("qwen_vl", "Qwen2-VL-class prefill at reduced visual tokens", command, body)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
