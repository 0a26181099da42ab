"""What the edge device is (CPU model, instruction sets) and where it keeps what it learnt about itself:
OpenVINO's compiled models and the measured runtime choice (``deploy.autoselect``).

The cache folder is ``$SAM3D_DEPLOY_CACHE``, else ``$XDG_CACHE_HOME/sam3d-distill``, else
``~/.cache/sam3d-distill``. Nothing in it is needed for correctness: a folder that cannot be written only
costs the time the cache would have saved (a warning says so), and deleting it is always safe.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

# Instruction sets that decide which kernels the runtimes pick (fp32 FMA width, VNNI int8, native bf16, AMX).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16")
# oneDNN's names of its instruction-set levels below native bf16 (AVX512_CORE_BF16). ``ONEDNN_MAX_CPU_ISA`` set to
# one of them caps oneDNN (PyTorch's and OpenVINO's) at that level: an AVX-512 machine then computes as an
# AVX2-only one does (``make demo ISA=avx2``, which also caps ATen and MKL), and this module reports it so.
_BELOW_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")
_BELOW_AVX512 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")
# OpenVINO writes one blob per compiled model and configuration (11 MB for the tiny student); the oldest go
# beyond this many.
MAX_COMPILED_BLOBS = 16


def cache_dir() -> Path:
    """The cache folder (see the module docstring); not created here."""
    explicit = os.environ.get("SAM3D_DEPLOY_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sam3d-distill"


def usable_cache_dir(sub: str) -> Path | None:
    """``cache_dir() / sub``, created; ``None`` (with a warning) where it cannot be written."""
    path = cache_dir() / sub
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        warnings.warn(f"{path}: cache not writable ({exc}); running without it", RuntimeWarning, stacklevel=3)
        return None
    return path


def prune_blobs(folder: Path, keep: int = MAX_COMPILED_BLOBS) -> None:
    """Delete the oldest OpenVINO ``*.blob`` files beyond ``keep``."""
    try:
        blobs = sorted(folder.glob("*.blob"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in blobs[keep:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def isa_cap() -> str | None:
    """The instruction-set cap ``ONEDNN_MAX_CPU_ISA`` puts on oneDNN (e.g. ``"AVX2"``), or None."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return value if value and value not in ("ALL", "DEFAULT") else None


def _capped(flags: frozenset[str] | set[str], cap: str | None) -> set[str]:
    """The flags the kernels may use under ``cap``: no AVX-512 or AMX below AVX512_CORE, no bf16 below
    AVX512_CORE_BF16, no AVX-VNNI at AVX2 or below."""
    out = set(flags)
    if cap is None:
        return out
    if cap in _BELOW_BF16:
        out -= {"avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"}
    if cap in _BELOW_AVX512:
        out = {f for f in out if not f.startswith("avx512")}
    if cap in ("SSE41", "AVX", "AVX2"):
        out.discard("avx_vnni")
    if cap in ("SSE41", "AVX"):
        out -= {"avx2", "fma"}
    return out


def cpu_info() -> dict[str, Any]:
    """``{"model", "flags", "cpu_flags", "isa_cap", "logical_cpus", "usable_cpus"}`` of this machine.

    ``cpu_flags`` are the ISA_FLAGS ``/proc/cpuinfo`` lists; ``flags`` those the kernels may use, which are fewer
    where ``ONEDNN_MAX_CPU_ISA`` caps them (``isa_cap``)."""
    model, flags = _proc_cpuinfo()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cap = isa_cap()
    usable_flags = _capped(flags, cap)
    return {"model": model, "flags": [f for f in ISA_FLAGS if f in usable_flags],
            "cpu_flags": [f for f in ISA_FLAGS if f in flags], "isa_cap": cap, "logical_cpus": os.cpu_count(),
            "usable_cpus": usable}


@lru_cache(maxsize=1)
def _proc_cpuinfo() -> tuple[str, frozenset[str]]:
    """The CPU model and the flags ``/proc/cpuinfo`` lists (read once per process)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, frozenset(flags)


def has_native_bf16_flags() -> bool:
    """Whether the CPU lists a native bf16 instruction set (AVX512-BF16 or AMX-BF16) in ``/proc/cpuinfo`` that no
    ``ONEDNN_MAX_CPU_ISA`` cap takes away."""
    flags = cpu_info()["flags"]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine_key(*parts: Any) -> str:
    """A short stable key for this CPU (model and instruction sets) plus ``parts`` (e.g. library versions)."""
    info = cpu_info()
    text = json.dumps([info["model"], info["flags"], *[str(p) for p in parts]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
