"""Benchmarks: CPU latency, memory and Dice of every model × runtime × precision × thread count.

``run_benchmarks`` is the pipeline stage; ``python -m benchmarks.latency`` is the command line;
``python -m benchmarks.deploy_profile`` splits one deployed segmentation into its steps.
Speed targets live in ``benchmarks/targets.md``, never as assertions in tests.
"""
from __future__ import annotations

import importlib
from typing import Any

# Names resolved on first use: importing the package must not import ``benchmarks.latency`` itself, or
# ``python -m benchmarks.latency`` would run a module that is already in sys.modules (runpy warns).
_EXPORTS = {
    "ModelEntry": "benchmarks.models",
    "entry_from_bundle": "benchmarks.models",
    "entries_from_run_dir": "benchmarks.models",
    "plan_rows": "benchmarks.plan",
    "run_benchmarks": "benchmarks.latency",
    "GemmPeak": "benchmarks.peak",
    "cpu_supports_bf16": "benchmarks.peak",
    "measure_gemm_peak": "benchmarks.peak",
    "CSV_COLUMNS": "benchmarks.report",
    "pareto_front": "benchmarks.report",
    "StepProfile": "benchmarks.deploy_profile",
    "profile_segment_file": "benchmarks.deploy_profile",
    "sweep_settings": "benchmarks.deploy_profile",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'benchmarks' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
