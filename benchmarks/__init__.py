"""Benchmarks run by ``make bench``: each ``bench_*.py`` module has ``main(argv) -> None``
and writes its table to ``experiments/results/`` (with the command that made it)."""
