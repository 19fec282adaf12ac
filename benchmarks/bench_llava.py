"""Prefill time, time to first token and peak memory of a LLaVA with fewer image tokens.

The model: ``LlavaForConditionalGeneration`` built from a config with random weights
(nothing downloaded): a Qwen2-0.5B-shaped causal LM (hidden 896, 24 layers, 14 heads,
2 KV heads, intermediate 4864, vocabulary 151,936; about 0.49B parameters) behind a
small CLIP vision tower (336 px, patch 14: a 24 x 24 grid = 576 image tokens). One
prompt of ``--text`` text tokens around the image, float32, CPU, SDPA attention.

Settings, side by side: ``full`` (576 image tokens) and ``arr_coc`` at 144 / 64 / 32
(``random`` at the same budgets as a cheap-allocator reference; if ``arr_coc`` is not
registered the table says so and only ``random`` runs).

Columns:
- vision+alloc: ``vlm.prepare`` (vision tower, projector, allocator, sequence rebuild);
- LM prefill: the host model's forward on the shortened ``inputs_embeds``
  (``logits_to_keep=1``, as ``generate`` does);
- TTFT: ``vlm.generate(max_new_tokens=1)``, everything from pixels to the first token;
- peak memory: a fresh subprocess per setting builds the model, resets the peak RSS
  (``echo 5 > /proc/self/clear_refs``), runs one prefill through the wrapper and reads
  ``VmHWM``; the column is that peak minus the RSS just before the prefill (weights
  excluded); measured for ``full`` and the main allocator's rows.
Times are medians over ``--repeats`` rounds that visit every setting in turn (after one
warm-up round), so that load changes on a shared machine hit every row alike.

``python -m benchmarks llava [--repeats=3] [--text=40] [--no-memory]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks._report import markdown_table, write_report

BUDGETS = (144, 64, 32)


def build_model():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    vision = CLIPVisionConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        image_size=336, patch_size=14, projection_dim=256,
    )
    text = Qwen2Config(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True,
        pad_token_id=151643,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=151646,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 151643
    return model


def make_inputs(text_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    before = 5
    t1 = torch.randint(0, 150000, (before,), generator=g)
    t2 = torch.randint(0, 150000, (text_tokens - before,), generator=g)
    ids = torch.cat([t1, torch.full((576,), 151646), t2])[None]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(1, 3, 336, 336, generator=g),
    }


def settings() -> tuple[list[tuple[str, int]], str]:
    from arr_coc.allocators import list_allocators

    names = list_allocators()
    rows: list[tuple[str, int]] = [("full", 576)]
    note = ""
    if "arr_coc" in names:
        rows += [("arr_coc", k) for k in BUDGETS]
    else:
        note = "`arr_coc` was not registered when this ran; `random` stands in for it.\n"
    rows += [("random", k) for k in BUDGETS]
    return rows, note


def make_allocator(name: str):
    from arr_coc.allocators import create_allocator

    return create_allocator("random", seed=0) if name == "random" else create_allocator(name)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(spec: str, text_tokens: int) -> None:
    """Peak-memory measurement of one setting in this (fresh) process; prints JSON."""
    from arr_coc.integrations import llava

    name, k = spec.split(":")
    model = build_model()
    inputs = make_inputs(text_tokens)
    vlm = llava.wrap(model, make_allocator(name), budget=int(k), query="prompt")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    with torch.no_grad():
        vlm(**inputs, logits_to_keep=1)
    peak = _status("VmHWM")
    print(json.dumps({"base": base, "peak": peak}))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks llava")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text", type=int, default=40, help="text tokens in the prompt")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.text)
        return

    from arr_coc.integrations import llava

    load_start = os.getloadavg()[0]
    model = build_model()
    n_lm = sum(p.numel() for p in model.model.language_model.parameters())
    n_all = sum(p.numel() for p in model.parameters())
    inputs = make_inputs(args.text)
    rows_spec, note = settings()
    primary = rows_spec[1][0]
    vlms = [llava.wrap(model, make_allocator(name), budget=k, query="prompt") for name, k in rows_spec]
    with torch.no_grad():
        prepared = [vlm.prepare(**inputs) for vlm in vlms]
    # round robin over the settings, so that a change in the machine's load hits all alike
    times = [{"prep": [], "lm": [], "ttft": []} for _ in rows_spec]
    for r in range(1 + args.repeats):  # the first round warms up
        for vlm, s, t in zip(vlms, prepared, times):
            with torch.no_grad():
                t0 = time.perf_counter()
                vlm.prepare(**inputs)
                t1 = time.perf_counter()
                model(**s.model_kwargs(), logits_to_keep=1)
                t2 = time.perf_counter()
            vlm.generate(**inputs, max_new_tokens=1, do_sample=False)
            t3 = time.perf_counter()
            if r:
                t["prep"].append(t1 - t0)
                t["lm"].append(t2 - t1)
                t["ttft"].append(t3 - t2)
        print(f"round {r} done", flush=True)
    rows = []
    for (name, k), s, t in zip(rows_spec, prepared, times):
        mem: object = "-"
        if not args.no_memory and (name == "full" or name == primary):
            res = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_llava", f"--child={name}:{k}", f"--text={args.text}"],
                capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
            )
            m = json.loads(res.stdout.strip().splitlines()[-1])
            mem = (m["peak"] - m["base"]) / 2**20
        med = {key: statistics.median(v) * 1e3 for key, v in t.items()}
        rows.append([name, int(s.image_counts[0]), s.inputs_embeds.shape[1], med["prep"], med["lm"], med["ttft"], mem])
        print(rows[-1], flush=True)
    full_lm, full_ttft = rows[0][4], rows[0][5]
    for r in rows:
        r.insert(6, f"{full_ttft / r[5]:.2f}x")
        r.insert(5, f"{full_lm / r[4]:.2f}x")
    table = markdown_table(
        ["allocator", "image tokens", "sequence", "vision+alloc ms", "LM prefill ms", "prefill speed-up",
         "TTFT ms", "TTFT speed-up", "peak prefill MiB"],
        rows,
    )
    body = (
        f"LLaVA with a Qwen2-0.5B-shaped LM ({n_lm / 1e6:.0f}M parameters in the LM, {n_all / 1e6:.0f}M in all), "
        f"random weights, float32, batch 1, {args.text} text tokens + a 24x24 image grid, SDPA, "
        f"median of {args.repeats}. Load average (1 min) {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores: the machine was shared, so absolute "
        f"times are inflated and noisy; compare rows.\n{note}\n{table}\n\n"
        "vision+alloc = `vlm.prepare` (vision tower, projector, allocator, sequence rebuild); "
        "LM prefill = the model's forward on the shortened `inputs_embeds` with `logits_to_keep=1`; "
        "TTFT = `vlm.generate(max_new_tokens=1)` from pixels; peak prefill MiB = peak RSS (VmHWM, reset via "
        "`/proc/self/clear_refs`) during one wrapped prefill minus the RSS before it, in a fresh subprocess per "
        f"setting (`full` and `{primary}` rows only).\n"
    )
    command = " ".join(["python -m benchmarks llava", *argv])
    write_report("llava", "LLaVA integration: prefill time and memory vs image tokens", command, body)


if __name__ == "__main__":
    main(sys.argv[1:])
