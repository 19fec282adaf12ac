"""Microscope: how fast the page answers a budget change, for one image, on this machine.

What a budget-slider move costs on the server: :func:`arr_coc.microscope.core.analyse` with
the image encoding and the relevance maps cached (they do not depend on the budget), for
one allocator at a time and for the page's default selection, over budgets 4..32. Also the
first request for a new image (ViT encoding + maps, uncached). Wall time (median) and
process CPU time per update (the machine may be shared: CPU time is what the update itself
costs). The browser round trip adds the HTTP/websocket and rendering time (measured by the
end-to-end test, tests/microscope/test_e2e.py).

Flags: ``--repeats=N`` (default 5 per budget), ``--threads=N`` (default 1, as the app).
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch

from benchmarks._report import argv_command, markdown_table, write_report


def _flag(argv: list[str], name: str, default: str) -> str:
    for a in argv:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return default


def _measure(fn, repeats: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def main(argv: list[str]) -> None:
    from arr_coc.microscope import core
    from arr_coc.microscope.app import DEFAULT_ALLOCATORS

    repeats = int(_flag(argv, "repeats", "5"))
    torch.set_num_threads(int(_flag(argv, "threads", "1")))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    models = core.load_models()
    ex = models.task.example(3)
    img = ex.image.permute(1, 2, 0).numpy().astype(np.float32)
    budgets = (4, 8, 16, 32)
    names = [n for n in DEFAULT_ALLOCATORS if n in models.allocators]
    core.analyse(models, img, ex.question, sorted(models.allocators), 16)  # warm every allocator
    rows = []
    selections = [[n] for n in sorted(models.allocators)] + [names]
    for sel in selections:
        walls, cpus = [], []
        for b in budgets:
            w, c = _measure(lambda: core.analyse(models, img, ex.question, sel, b), repeats)
            walls.append(w)
            cpus.append(c)
        label = ", ".join(sel) if len(sel) == 1 else f"page default ({', '.join(sel)})"
        rows.append([label, 1e3 * statistics.median(walls), 1e3 * max(walls), 1e3 * statistics.median(cpus)])

    def fresh():
        models.cache.clear()
        models.map_cache.clear()
        core.analyse(models, img, ex.question, names, 16)

    w_new, c_new = _measure(fresh, repeats)
    body = (
        f"One {models.image_size} x {models.image_size} image, grid {models.grid}, question "
        f"\"{ex.question}\"; budgets {list(budgets)}, {repeats} repeats each; torch threads "
        f"{torch.get_num_threads()}; load average at start {load:.1f}. Base VLM: {models.checkpoint}; "
        f"trained allocators: {sorted(models.trained) or 'none'}.\n\n"
        "Budget change (image encoding and relevance maps cached):\n\n"
        + markdown_table(["allocators", "median wall (ms)", "worst budget wall (ms)", "median CPU (ms)"], rows)
        + f"\n\nNew image (ViT encoding + relevance maps + the default allocators): median wall "
        f"{1e3 * w_new:.0f} ms, CPU {1e3 * c_new:.0f} ms.\n"
    )
    write_report("microscope", "Microscope latency", argv_command("microscope"), body)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
