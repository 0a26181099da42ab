"""This machine's measured matrix-multiply peak: the ceiling that a model's GFLOP/s is read against.

A latency alone does not say whether a model is slow or the machine is; "x % of the GEMM peak measured
in the same run with the same thread count" does. The peak is the best GFLOP/s of ``torch.matmul`` on
large square matrices (2·n³ FLOPs each), FP32 and, where the CPU has native bf16, bf16.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

PRECISIONS = ("fp32", "bf16")


class PeakError(ValueError):
    """A peak measurement that cannot be made as asked (bad precision, size, or thread count)."""


@dataclass(frozen=True)
class GemmPeak:
    """One measured GEMM peak.

    Attributes:
        precision: ``"fp32"`` or ``"bf16"``.
        threads: intra-op threads used.
        size: matrix side n (n x n @ n x n).
        gflops: best GFLOP/s over the timed runs (the peak).
        median_gflops: median GFLOP/s (how steady the machine was).
        runs: number of timed multiplications.
        backend: what executed it (``"torch"``).
    """

    precision: str
    threads: int
    size: int
    gflops: float
    median_gflops: float
    runs: int
    backend: str = "torch"

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX).

    OpenVINO's ``OPTIMIZATION_CAPABILITIES`` is the authority (it is what decides whether its bf16
    inference is real); the check training uses (oneDNN, then ``/proc/cpuinfo`` flags) is the fallback
    when OpenVINO is absent.
    """
    try:
        from deploy.runtime import cpu_supports_bf16 as openvino_bf16

        return openvino_bf16()
    except Exception:  # noqa: BLE001 - no OpenVINO or no CPU plugin: fall back to the CPU flags
        pass
    from training.precision import cpu_has_native_bf16

    return cpu_has_native_bf16()


def measure_gemm_peak(
    precision: str = "fp32",
    threads: int = 1,
    size: int = 2048,
    min_runs: int = 3,
    min_time_s: float = 0.5,
    seed: int = 0,
) -> GemmPeak:
    """Measure the matrix-multiply peak with ``threads`` intra-op threads.

    Args:
        precision: ``"fp32"`` or ``"bf16"`` (raises if the CPU has no native bf16: an emulated bf16
            peak would be a meaningless ceiling).
        threads: torch intra-op threads for the measurement (restored afterwards).
        size: side n of the square matrices; large enough that the GEMM is compute-bound (>= 1024).
        min_runs: timed multiplications at least.
        min_time_s: keep timing until this much time was spent (steadier numbers on a busy machine).
        seed: seed of the random operands.
    """
    import torch

    if precision not in PRECISIONS:
        raise PeakError(f"precision {precision!r} not one of {PRECISIONS}")
    if threads < 1:
        raise PeakError(f"threads must be >= 1, got {threads}")
    if size < 64:
        raise PeakError(f"size {size} is too small to be compute-bound (use >= 1024)")
    if precision == "bf16" and not cpu_supports_bf16():
        raise PeakError("this CPU has no native bf16 (no BF16 in OpenVINO OPTIMIZATION_CAPABILITIES)")
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(size, size, generator=gen).to(dtype)
        b = torch.randn(size, size, generator=gen).to(dtype)
        out = torch.empty(size, size, dtype=dtype)
        torch.matmul(a, b, out=out)  # warm-up: first call allocates and picks the kernel
        flops = 2.0 * size**3
        rates: list[float] = []
        spent = 0.0
        while len(rates) < min_runs or spent < min_time_s:
            start = time.perf_counter()
            torch.matmul(a, b, out=out)
            elapsed = time.perf_counter() - start
            spent += elapsed
            rates.append(flops / elapsed / 1e9)
    finally:
        torch.set_num_threads(previous_threads)
    rates.sort()
    return GemmPeak(
        precision=precision,
        threads=threads,
        size=size,
        gflops=rates[-1],
        median_gflops=rates[len(rates) // 2],
        runs=len(rates),
    )


def measure_peaks(threads: list[int], size: int = 2048, min_time_s: float = 0.5) -> dict[tuple[str, int], GemmPeak]:
    """FP32 (and bf16 where native) peaks for every thread count, keyed by ``(precision, threads)``.

    Args:
        threads: thread counts to measure at.
        size: matrix side.
        min_time_s: time spent per measurement at least.
    """
    precisions = ["fp32"] + (["bf16"] if cpu_supports_bf16() else [])
    return {
        (p, t): measure_gemm_peak(p, threads=t, size=size, min_time_s=min_time_s)
        for t in threads
        for p in precisions
    }
