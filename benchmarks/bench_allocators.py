"""Time per call of every registered allocator, side by side.

B = 8 images, N = 576 patch tokens (24 x 24) after 1 CLS prefix token, D = 1024,
T = 16 query tokens (3 of the 8 queries padded to 9 real tokens), budget K = 64.
Flags: ``--repeats=N`` (default 5), ``--device=cpu|cuda`` (default cpu), ``--threads=N``.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from arr_coc.allocators import create_allocator, list_allocators
from benchmarks._report import markdown_table, write_report

B, GRID, P, D, T, K = 8, (24, 24), 1, 1024, 16, 64


def _flag(argv: list[str], name: str, default: str) -> str:
    for a in argv:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return default


def _time(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of ``fn()`` after one warm-up call.

    CPU time (all threads together) is reported beside wall time because on a shared
    machine the wall time mostly measures the other tenants.
    """
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def main(argv: list[str]) -> None:
    repeats = int(_flag(argv, "repeats", "5"))
    device = torch.device(_flag(argv, "device", "cpu"))
    threads = _flag(argv, "threads", "")
    if threads:
        torch.set_num_threads(int(threads))
    n = GRID[0] * GRID[1]
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(B, P + n, D, generator=g).to(device)
    query = torch.randn(B, T, D, generator=g).to(device)
    query_mask = torch.ones(B, T, dtype=torch.bool)
    query_mask[5:, 9:] = False
    query_mask = query_mask.to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows = []
    for name in list_allocators():
        try:
            alloc = create_allocator(name).to(device).eval()
        except Exception as exc:  # report, do not hide, an allocator that fails to build
            rows.append([name, "build failed", "", "", "", f"{type(exc).__name__}: {exc}"[:80]])
            continue

        def call():
            with torch.no_grad():
                out = alloc(tokens, query=query, query_mask=query_mask, budget=K, grid=GRID, num_prefix_tokens=P)
            sync()
            return out

        try:
            out = call()
            wall, cpu = _time(call, repeats)
        except Exception as exc:
            rows.append([name, "failed", "", "", "", f"{type(exc).__name__}: {exc}"[:80]])
            continue
        rows.append([name, 1e3 * wall, 1e3 * wall / B, 1e3 * cpu, float(out.counts.float().mean()),
                     type(alloc).__name__])
        print(name, f"{1e3 * wall:.1f} ms", flush=True)
    timed = [r for r in rows if isinstance(r[1], float)]
    fastest = min((r[1] for r in timed if r[0] != "full"), default=None)
    body = (
        f"B = {B}, N = {n} ({GRID[0]} x {GRID[1]}) + {P} CLS prefix token, D = {D}, T = {T} query tokens "
        f"(3 rows padded to 9), budget K = {K}, device {device}, {torch.get_num_threads()} threads, "
        f"median of {repeats} calls after 1 warm-up, no grad. `full` only validates and copies. "
        "No host is given, so the host-reading methods (cls_attention, visionzip, cdpruner, tome) time "
        "their host-free rule and the in-LLM methods (fastv, sparsevlm) their before-the-LLM fallback; "
        "with a host their cost is the signal (a ViT pass) or a partial LLM forward (see the v2 main job's "
        "`alloc ms`). "
        f"Load average when the run started: {load}.\n\n"
        + markdown_table(
            ["allocator", "wall ms / call (B = 8)", "wall ms / example", "CPU ms / call (all threads)",
             "tokens kept (mean)", "class"],
            rows,
        )
    )
    if fastest:
        body += f"\n\nFastest pruning allocator: {fastest:.3g} ms per batch of {B}."
    write_report(f"allocators{'' if device.type == 'cpu' else '_' + device.type}",
                 "Allocator time per call, side by side",
                 "python -m benchmarks bench_allocators" + "".join(f" {a}" for a in argv), body)
