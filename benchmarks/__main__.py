"""``python -m benchmarks [name ...]``: run every ``benchmarks/bench_*.py`` (or the named ones)."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import benchmarks


def main(argv: list[str]) -> None:
    names = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))
    wanted = [a for a in argv if not a.startswith("-")]
    if wanted:
        unknown = [w for w in wanted if w not in names and f"bench_{w}" not in names]
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {unknown}; known: {names}")
        names = [n for n in names if n in wanted or n.removeprefix("bench_") in wanted]
    for name in names:
        print(f"== {name}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main([a for a in argv if a.startswith("-")])


if __name__ == "__main__":
    main(sys.argv[1:])
