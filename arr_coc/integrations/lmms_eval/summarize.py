"""One table from many lmms-eval runs: each allocator and budget against the full model.

```bash
python -m arr_coc.integrations.lmms_eval.summarize results/llava15_7b > results/llava15_7b.md
```

Reads every ``*_results.json`` under the folder (lmms-eval writes one per run under
``--output_path``), takes the allocator and budget from the run's ``model_args``, and
writes a Markdown table: one row per (allocator, budget), one column per task (its
headline metric, :data:`HEADLINE`), and ``relative``: the mean over the tasks of
score / the ``allocator=full`` run's score, in percent - the "relative to the full model"
average that pruning papers report (over their own benchmark sets).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["HEADLINE", "collect", "relative", "to_markdown"]

#: task -> the metric of the papers' tables (POPE F1, MME perception score, accuracy)
HEADLINE = {
    "pope": "pope_f1_score,none",
    "gqa": "exact_match,none",
    "textvqa_val": "exact_match,none",
    "mme": "mme_perception_score,none",
}


def _model_args(text: str | dict) -> dict[str, str]:
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    out = {}
    for part in str(text).split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _headline(task: str, metrics: dict[str, Any]) -> float | None:
    key = HEADLINE.get(task)
    if key is None:  # a task not in the table: its first numeric metric
        key = next((k for k, v in metrics.items() if k != "alias" and "stderr" not in k and isinstance(v, (int, float))), None)
    value = metrics.get(key) if key else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def collect(folder: str | Path) -> dict[tuple[str, str], dict[str, float]]:
    """``{(allocator, budget): {task: headline score}}`` over every results file under ``folder``.

    A later file (by name, which starts with the run's date) overrides an earlier one.
    Raises ``ValueError`` when the folder holds no results file.
    """
    files = sorted(Path(folder).rglob("*_results.json"), key=lambda p: p.name)
    if not files:
        raise ValueError(f"folder: no lmms-eval *_results.json under {folder}")
    table: dict[tuple[str, str], dict[str, float]] = {}
    for path in files:
        data = json.loads(path.read_text())
        args = _model_args(data.get("config", {}).get("model_args", ""))
        if args.get("unwrapped", "").lower() == "true":
            key = ("unwrapped", "all")
        else:
            allocator = args.get("allocator_checkpoint") and f"checkpoint:{args['allocator_checkpoint']}"
            key = (allocator or args.get("allocator", "full"), args.get("budget", "all"))
        if key[0] == "full":
            key = ("full", "all")
        row = table.setdefault(key, {})
        for task, metrics in data.get("results", {}).items():
            score = _headline(task, metrics)
            if score is not None:
                row[task] = score
    return table


def relative(row: dict[str, float], full: dict[str, float]) -> float | None:
    """Mean over the tasks both runs have of ``100 * row / full`` (None when none in common)."""
    ratios = [100.0 * row[t] / full[t] for t in row if t in full and full[t] != 0]
    return sum(ratios) / len(ratios) if ratios else None


def to_markdown(table: dict[tuple[str, str], dict[str, float]]) -> str:
    """The table as Markdown, the full run first, then by budget (largest first) and allocator."""
    tasks = sorted({t for row in table.values() for t in row}, key=lambda t: (t not in HEADLINE, list(HEADLINE).index(t) if t in HEADLINE else 0, t))
    full = table.get(("full", "all"))

    def order(key: tuple[str, str]) -> tuple:
        alloc, budget = key
        try:
            b = -float(budget)
        except ValueError:
            b = -math.inf
        return (alloc != "full", b, alloc)

    lines = ["| allocator | budget | " + " | ".join(tasks) + " | relative to full (%) |",
             "|---|---|" + "---|" * len(tasks) + "---|"]
    for key in sorted(table, key=order):
        row = table[key]
        cells = [f"{row[t]:.4g}" if t in row else "-" for t in tasks]
        rel = relative(row, full) if full else None
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {'-' if rel is None else f'{rel:.1f}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="an --output_path (or a folder above several)")
    args = parser.parse_args(argv)
    print(to_markdown(collect(args.folder)), end="")


if __name__ == "__main__":
    main()
