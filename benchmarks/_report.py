"""Report helpers for the benchmarks (they live in ``arr_coc.reporting``)."""

from arr_coc.reporting import RESULTS, argv_command, commit, environment, markdown_table, median_time, write_report

__all__ = ["RESULTS", "argv_command", "commit", "environment", "markdown_table", "median_time", "write_report"]
