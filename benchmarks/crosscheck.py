"""Cross-check of the harness against OpenVINO's own ``benchmark_app`` on the same model and settings.

If the harness's p50 and ``benchmark_app``'s median disagree by much, the harness (Python overhead,
copies, thread setup) is measuring something other than the runtime; the report shows both figures.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence


class CrossCheckError(ValueError):
    """``benchmark_app`` is missing, failed, or printed no latency; the message names the model file."""


def find_benchmark_app() -> Path:
    """The ``benchmark_app`` beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("benchmark_app")
    if beside.is_file():
        return beside
    found = shutil.which("benchmark_app")
    if found is None:
        raise CrossCheckError("benchmark_app not found beside the interpreter nor on PATH (pip install openvino)")
    return Path(found)


def benchmark_app_command(
    model_path: str | Path,
    shape: Sequence[int],
    threads: int,
    precision: str = "fp32",
    niter: int = 20,
) -> list[str]:
    """The ``benchmark_app`` command for one latency measurement.

    ``benchmark_app`` refuses ``-nthreads`` together with a performance hint, so the latency setting is
    spelled out: ``-hint none -nstreams 1`` with synchronous requests (what the harness's loop does).

    Args:
        model_path: OpenVINO IR ``.xml`` (or ``.onnx``).
        shape: static input shape ``B x 1 x X x Y x Z``.
        threads: ``-nthreads``.
        precision: ``fp32`` or ``bf16`` (``-infer_precision``); INT8 IRs use ``f32`` for the rest.
        niter: timed iterations.
    """
    infer_precision = "bf16" if precision == "bf16" else "f32"
    return [
        str(find_benchmark_app()), "-m", str(model_path), "-d", "CPU", "-api", "sync", "-hint", "none", "-nstreams", "1",
        "-nthreads", str(int(threads)), "-niter", str(int(niter)), "-infer_precision", infer_precision,
        "-shape", "[" + ",".join(str(int(s)) for s in shape) + "]",
    ]


def parse_benchmark_app(stdout: str) -> dict[str, float]:
    """Median/average/min/max latency (ms) and throughput (FPS) from ``benchmark_app``'s report.

    Args:
        stdout: its standard output.
    """
    out: dict[str, float] = {}
    # it switches units: "605.09 us" for fast models, "12.3 ms" otherwise
    to_ms = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
    for key in ("Median", "Average", "Min", "Max"):
        m = re.search(rf"{key}:\s*([0-9.]+)\s*(ns|us|ms|s)\b", stdout)
        if m:
            out[f"{key.lower()}_ms"] = float(m.group(1)) * to_ms[m.group(2)]
    m = re.search(r"Throughput:\s*([0-9.]+)\s*FPS", stdout)
    if m:
        out["throughput_fps"] = float(m.group(1))
    if "median_ms" not in out:
        raise CrossCheckError("benchmark_app printed no median latency:\n" + "\n".join(stdout.splitlines()[-10:]))
    return out


def run_benchmark_app(
    model_path: str | Path,
    shape: Sequence[int],
    threads: int,
    precision: str = "fp32",
    niter: int = 20,
    timeout_s: float = 600.0,
) -> dict:
    """Run ``benchmark_app`` as a subprocess and return its figures and the command line.

    Args:
        model_path: OpenVINO IR ``.xml`` (or ``.onnx``).
        shape: static input shape ``B x 1 x X x Y x Z``.
        threads: ``-nthreads``.
        precision: ``fp32``, ``bf16`` or ``int8`` (the IR decides INT8).
        niter: timed iterations.
        timeout_s: kill it after this long.
    """
    if not Path(model_path).is_file():
        raise CrossCheckError(f"{model_path}: model file not found for benchmark_app")
    cmd = benchmark_app_command(model_path, shape, threads, precision, niter)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise CrossCheckError(f"benchmark_app on {model_path} timed out after {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-10:])
        raise CrossCheckError(f"benchmark_app on {model_path} failed (exit {proc.returncode}):\n{tail}")
    figures = parse_benchmark_app(proc.stdout)
    return {**figures, "command": " ".join(["benchmark_app"] + cmd[1:])}
