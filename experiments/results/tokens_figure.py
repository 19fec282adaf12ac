"""Redraw a job's tokens-per-type figure from its CSV (no model, no evaluation), with the frontier
the job draws now (experiments/main.py: tokens_frontier): the compared partners of the adaptive
rows, the oracle and the reference rows of the config.

    python experiments/results/tokens_figure.py experiments/results/main.csv [hydra overrides...]

The config (conf/main.yaml plus the overrides, e.g. +experiment=v2_price_inllm) gives the pairs
and the references; the caption keeps the command and commit that produced the CSV.
"""
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from hydra import compose, initialize_config_dir  # noqa: E402

import main as job  # noqa: E402


def redraw(csv_path: Path, overrides: list[str]) -> Path:
    lines = csv_path.read_text().splitlines()
    meta = dict(line[2:].split(": ", 1) for line in lines if line.startswith("# ") and ": " in line)
    rows = list(csv.DictReader([line for line in lines if not line.startswith("#")]))
    agg = job.aggregate(rows)
    types = [k[len("tokens_"):] for k in rows[0] if k.startswith("tokens_")]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("main", overrides=overrides)
    references = job.reference_rows(job.allocator_specs(cfg))
    out = csv_path.with_name(csv_path.stem + "_tokens.png")
    caption = f"{meta.get('command', '?')}  (commit {meta.get('commit', '?')}; figure: python experiments/results/tokens_figure.py {csv_path.name})"
    return job.plot_tokens_per_type(agg, types, out, caption=caption,
                                    fixed=job.tokens_frontier(agg, types, cfg.get("compare") or [], references))


if __name__ == "__main__":
    print(redraw(Path(sys.argv[1]), sys.argv[2:]))
