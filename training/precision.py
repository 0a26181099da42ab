"""Mixed precision: the autocast dtype a run trains in on its device (the ``amp`` setting, resolved by
:func:`autocast_dtype`), and whether this CPU computes bf16 natively (:func:`cpu_has_native_bf16`).
"""
from __future__ import annotations

import sys

import torch


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as oneDNN sees it; CPU flags as fallback."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN, or the private check gone
        pass
    from deploy.machine import has_native_bf16_flags

    return has_native_bf16_flags()


def autocast_dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    """The dtype ``amp`` (a ``TrainSettings.amp`` value) trains in on ``device``; None: float32, no autocast."""
    # On a CPU autocast is opt-in ("bf16"). On an AVX512-BF16 CPU (2 threads) it made a SwinUNETR-tiny student
    # step only 1.09x faster (0.875 -> 0.800 s at 64x64x32, benchmarks.train_step, docs/measurements.md) but a
    # demo-teacher training step 1.44x faster (0.53 vs 0.37 s).
    if amp is False:
        return None
    if device.type == "cpu":
        if amp != "bf16":
            return None
        if not cpu_has_native_bf16():
            print("warning: amp 'bf16' ignored on this CPU: it has no native bf16 (AVX512-BF16/AMX), and emulated "
                  "bf16 is slower than float32; training in float32", file=sys.stderr)
            return None
        return torch.bfloat16
    if device.type != "cuda":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16
