"""Benchmarks: CPU latency, memory and Dice of every model × runtime × precision × thread count.

``run_benchmarks`` is the pipeline stage; ``python -m benchmarks.latency`` is the command line.
Speed targets live in ``benchmarks/targets.md``, never as assertions in tests.
"""
from benchmarks.latency import ModelEntry, entry_from_bundle, entries_from_run_dir, plan_rows, run_benchmarks
from benchmarks.peak import GemmPeak, cpu_supports_bf16, measure_gemm_peak
from benchmarks.report import CSV_COLUMNS, pareto_front

__all__ = [
    "CSV_COLUMNS",
    "GemmPeak",
    "ModelEntry",
    "cpu_supports_bf16",
    "entries_from_run_dir",
    "entry_from_bundle",
    "measure_gemm_peak",
    "pareto_front",
    "plan_rows",
    "run_benchmarks",
]
