"""Benchmark cases and their runner, shared by `bignlp-fast bench` and `pytest benchmarks/`."""

from bignlp_fast.bench.cases import Case, all_cases, cases, tiny_cases
from bignlp_fast.bench.runner import Row, copy_gbps, format_table, run_case

__all__ = ["Case", "Row", "all_cases", "cases", "copy_gbps", "format_table", "run_case", "tiny_cases"]
