"""Timing and memory measurement: warm-up, repeated runs, percentiles, and peak RSS of a fresh process.

What is measured, honestly:
- latency: wall-clock ``time.perf_counter`` around each call after ``warmup`` untimed calls; p50/p95 are
  linear-interpolated percentiles of the timed calls.
- peak memory: the RSS high-water mark (``VmHWM``) of a child process that did nothing but load one model on one runtime and
  run one workload. It includes the interpreter and the runtime libraries (that is what a deployed
  process costs); ``base_rss_mb`` (RSS after imports, before the model is loaded) is recorded beside it
  so the model's own share can be read off.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Environment variables that fix a child's thread pools before any runtime is imported.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


class MeasureError(ValueError):
    """A measurement that could not be made; the message names the row and the cause."""


@dataclass(frozen=True)
class Timing:
    """Latency statistics of repeated calls, in milliseconds.

    Attributes:
        p50_ms, p95_ms, mean_ms, min_ms: statistics of the timed calls.
        runs: number of timed calls (warm-up excluded).
        samples_ms: every timed call, in order.
    """

    p50_ms: float
    p95_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    samples_ms: tuple[float, ...]

    def as_dict(self) -> dict:
        return asdict(self)


def timing_from_samples(samples_ms: list[float] | tuple[float, ...]) -> Timing:
    """Summarise latency samples (ms) as p50/p95/mean/min.

    Args:
        samples_ms: one wall time per call; at least one.
    """
    if len(samples_ms) == 0:
        raise MeasureError("no timed runs to summarise")
    arr = np.asarray(samples_ms, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise MeasureError(f"latency samples must be finite and >= 0, got {samples_ms}")
    return Timing(
        p50_ms=float(np.percentile(arr, 50)),
        p95_ms=float(np.percentile(arr, 95)),
        mean_ms=float(arr.mean()),
        min_ms=float(arr.min()),
        runs=int(arr.size),
        samples_ms=tuple(float(x) for x in arr),
    )


def time_runs(fn: Callable[[], Any], warmup: int = 2, repeats: int = 10) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    Args:
        fn: the workload, no arguments; its result is discarded.
        warmup: untimed calls first (lazy initialisation, kernel selection, caches).
        repeats: timed calls (>= 1).
    """
    if warmup < 0 or repeats < 1:
        raise MeasureError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return timing_from_samples(samples)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process's own address space.
    Not ``ru_maxrss``: Linux carries it over fork and exec, so a child started by a large parent reports
    the parent's peak (measured here: a 12 MB child of a 500 MB parent read 511 MB).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024.0 if sys.platform != "darwin" else kib / 1024.0 / 1024.0


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 1024.0 / 1024.0


def run_module_in_subprocess(module: str, spec: dict, threads: int, timeout_s: float = 1800.0) -> dict:
    """Run ``python -m module SPEC.json OUT.json`` in a fresh process and return the JSON it wrote.

    The child gets thread-pool variables set to ``threads`` before anything is imported, so its runtimes
    start with the intended pool; its own peak RSS is therefore that of one row only.

    Args:
        module: importable module with a ``__main__`` taking (spec path, output path).
        spec: JSON-serialisable description of the measurement.
        threads: value for OMP_NUM_THREADS and friends in the child.
        timeout_s: kill the child after this long.
    """
    env = dict(os.environ)
    for var in THREAD_ENV_VARS:
        env[var] = str(threads)
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory(prefix="bench_row_") as tmp:
        spec_path = Path(tmp) / "spec.json"
        out_path = Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec, default=str))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", module, str(spec_path), str(out_path)],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired as exc:
            raise MeasureError(f"{module} on {_describe(spec)} timed out after {timeout_s:.0f} s") from exc
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
            raise MeasureError(
                f"{module} on {_describe(spec)} failed (exit {proc.returncode}):\n" + "\n".join(tail)
            )
        return json.loads(out_path.read_text())


def _describe(spec: dict) -> str:
    keys = ("model", "runtime", "precision", "threads", "workload")
    return "/".join(str(spec.get(k, "?")) for k in keys)
