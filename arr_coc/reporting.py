"""Writing results: timing, the environment line, Markdown tables, and a report file that
names the command and the commit that produced it (used by benchmarks/ and experiments/)."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent.parent / "experiments" / "results"

__all__ = ["RESULTS", "argv_command", "commit", "environment", "markdown_table", "median_time", "write_report"]


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL, cwd=Path(__file__).parent
        ).strip()
    except Exception:  # pragma: no cover - outside a git checkout
        return "unknown"


def environment() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, python {platform.python_version()}"
    )


def write_report(name: str, title: str, command: str, body: str, *, results_dir: Path | None = None) -> Path:
    """Write ``{results_dir}/{name}.md`` (default ``experiments/results``) with the command,
    commit and environment."""
    results_dir = Path(results_dir) if results_dir is not None else RESULTS
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.md"
    text = (
        f"# {title}\n\n"
        f"Command: `{command}`  \n"
        f"Commit: `{commit()}`  \n"
        f"Machine: {environment()}  \n"
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
        f"{body.rstrip()}\n"
    )
    path.write_text(text)
    print(text)
    return path


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def argv_command(module: str) -> str:
    """The command line that ran benchmark ``module`` (``python -m benchmarks <args>``)."""
    args = sys.argv[1:] or [module]
    return "python -m benchmarks " + " ".join(args)
