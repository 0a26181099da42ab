"""``--runtime auto --precision auto``: the device picks the fastest model its bundle offers that is
accurate enough, by measuring itself once.

1. Candidates: every ``runtime/precision`` the bundle offers whose library is installed here (bf16 only
   where the CPU computes it natively).
2. Accuracy: a candidate qualifies when the bundle's recorded check (``checks`` in ``model.json``, written
   by ``export.checks``) puts its Dice within ``checks.max_dice_drop`` of the PyTorch FP32 student's on the
   same validation crops. A candidate the check did not score (bf16 exported on a CPU without it) does
   not qualify; FP32 models of a bundle without checks (older exports) do, INT8 only where the export's
   own accuracy control passed (``int8.<runtime>.within_bound``).
3. Speed: each qualifying candidate runs one window ``repeats`` times after a warm-up; the lowest median
   wins.
4. The choice and its figures are cached per machine (CPU model, instruction sets, runtime versions),
   bundle (its ``model.json`` checksum) and thread count in ``deploy.machine.cache_dir()/runtime_choice.json``;
   the next process reads it instead of measuring.

No step needs an engineer to know whether the CPU has VNNI or AMX.
"""
from __future__ import annotations

import importlib.util
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from deploy.errors import RuntimeChoiceError
from deploy.files import file_sha256, write_json
from deploy.machine import cpu_info, machine_key, usable_cache_dir

CHOICE_FILE = "runtime_choice.json"
RUNTIME_MODULES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}


@dataclass
class Choice:
    """The runtime and precision chosen, and why.

    Attributes:
        runtime, precision: the winner.
        window_ms: median ms of one window per qualifying candidate (``"runtime/precision"``).
        dice: the bundle's recorded Dice per candidate (``None``: not scored); reference_dice: PyTorch FP32's.
        rejected: candidate → why it did not qualify.
        cpu: model and instruction sets; threads; cached: read from the cache instead of measured.
    """

    runtime: str
    precision: str
    window_ms: dict[str, float]
    dice: dict[str, float | None]
    reference_dice: float | None
    rejected: dict[str, str]
    cpu: dict[str, Any]
    threads: int | None
    cached: bool = False
    cache_file: str | None = field(default=None)

    def summary(self) -> str:
        """One line: the winner, each candidate's window time, what was rejected."""
        key = f"{self.runtime}/{self.precision}"
        timed = ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(self.window_ms.items(), key=lambda kv: kv[1]))
        rejected = "; ".join(f"{k}: {v}" for k, v in self.rejected.items())
        source = "cached" if self.cached else "measured"
        return (f"auto: {key} ({source} on {self.cpu['model']} [{' '.join(self.cpu['flags'])}], "
                f"{self.threads or 'default'} threads; window {timed})" + (f"; not chosen: {rejected}" if rejected else ""))


def _installed(runtime: str) -> bool:
    return importlib.util.find_spec(RUNTIME_MODULES[runtime]) is not None


def _native_bf16() -> bool:
    from deploy.runtime import cpu_supports_bf16

    return cpu_supports_bf16()


def qualifying(bundle: Mapping[str, Any], runtime: str = "auto", precision: str = "auto") -> tuple[list[str], dict[str, str], dict[str, float | None], float | None]:
    """Candidates that pass steps 1-2, ``(keys, rejected {key: why}, dice {key: Dice or None}, reference Dice)``.

    Args:
        bundle: a loaded manifest (``deploy.bundle.load_bundle``).
        runtime, precision: ``"auto"`` or a fixed value that narrows the candidates.
    """
    checks = bundle.get("checks") or {}
    recorded = checks.get("dice") or {}
    reference = recorded.get(checks.get("reference", "pytorch/fp32"))
    max_drop = float(checks.get("max_dice_drop", 0.0))
    keys, rejected, dice = [], {}, {}
    for rt, offered in sorted((bundle.get("models") or {}).items()):
        for prec in sorted(offered or {}):
            if runtime not in ("auto", rt) or precision not in ("auto", prec):
                continue
            key = f"{rt}/{prec}"
            dice[key] = recorded.get(key)
            if rt not in RUNTIME_MODULES or not _installed(rt):
                rejected[key] = f"{rt} is not installed"
            elif prec == "bf16" and (rt != "openvino" or not _native_bf16()):
                rejected[key] = "the CPU has no native bf16"
            elif recorded and reference is not None:
                if key not in recorded:
                    rejected[key] = f"no accuracy check in the bundle ({checks.get('not_measured', {}).get(key, 'not scored')})"
                elif reference - recorded[key] > max_drop + 1e-9:
                    rejected[key] = f"Dice {recorded[key]:.3f} is {reference - recorded[key]:.3f} below FP32's {reference:.3f} (bound {max_drop:g})"
                else:
                    keys.append(key)
            elif prec == "fp32":
                keys.append(key)
            elif prec == "int8" and ((bundle.get("int8") or {}).get(rt) or {}).get("within_bound"):
                keys.append(key)
            else:
                rejected[key] = "no accuracy check in the bundle (exported before checks were recorded)"
    return keys, rejected, dice, reference


def _bundle_id(bundle: Mapping[str, Any]) -> str:
    return file_sha256(Path(bundle["dir"]) / "model.json")[:16]


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in RUNTIME_MODULES.values():
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def time_window(bundle: Mapping[str, Any], runtime: str, precision: str, threads: int | None, repeats: int = 5,
                compile_cache: bool = True) -> float:
    """Median ms of one window of the bundle's model on this machine (after one untimed call)."""
    from deploy.runtime import ModelSession

    session = ModelSession(bundle, runtime, precision, threads, 1, compile_cache=compile_cache)
    channels = int((bundle.get("input_shape") or [None, 1])[1])
    x = np.random.default_rng(0).random((1, channels, *bundle["roi_size"]), dtype=np.float32)
    session(x)
    samples = []
    for _ in range(max(1, int(repeats))):
        start = time.perf_counter()
        session(x)
        samples.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(samples))


def choose(bundle: Mapping[str, Any], threads: int | None = None, runtime: str = "auto", precision: str = "auto",
           repeats: int = 5, use_cache: bool = True) -> Choice:
    """Steps 1-4 of the module docstring.

    Args:
        bundle: a loaded manifest (``deploy.bundle.load_bundle``).
        threads: inference threads the choice is for (``None``: the runtimes' default).
        runtime, precision: ``"auto"``, or fixed to narrow the choice to that runtime or precision.
        repeats: timed calls per candidate.
        use_cache: read and write the per-machine cache.

    Raises:
        RuntimeChoiceError: no candidate qualifies (the message lists why each was rejected).
    """
    keys, rejected, dice, reference = qualifying(bundle, runtime, precision)
    if not keys:
        reasons = "; ".join(f"{k}: {v}" for k, v in rejected.items()) or "the bundle offers no model"
        raise RuntimeChoiceError(f"{bundle.get('dir')}: no runtime/precision qualifies for --runtime {runtime} "
                                 f"--precision {precision} ({reasons})")
    cpu = cpu_info()
    if len(keys) == 1:  # nothing to choose between: no measurement, nothing cached
        rt, prec = keys[0].split("/")
        return Choice(rt, prec, {}, dice, reference, rejected, cpu, threads)
    folder = usable_cache_dir("") if use_cache else None
    cache_key = "|".join([machine_key(_versions()), _bundle_id(bundle), str(threads), runtime, precision, ",".join(keys)])
    cache_file = folder / CHOICE_FILE if folder is not None else None
    stored: dict[str, Any] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            stored = json.loads(cache_file.read_text())
        except (OSError, json.JSONDecodeError):
            stored = {}  # a damaged cache is measured again and rewritten
        hit = stored.get(cache_key)
        if isinstance(hit, dict) and f"{hit.get('runtime')}/{hit.get('precision')}" in keys:
            known = {f.name for f in fields(Choice)}
            return Choice(**{**{k: v for k, v in hit.items() if k in known}, "cached": True, "cache_file": str(cache_file)})
    window_ms: dict[str, float] = {}
    for key in keys:
        rt, prec = key.split("/")
        window_ms[key] = time_window(bundle, rt, prec, threads, repeats, compile_cache=use_cache)
    best = min(window_ms, key=window_ms.get)
    rt, prec = best.split("/")
    choice = Choice(rt, prec, window_ms, dice, reference, rejected, cpu, threads, False,
                    str(cache_file) if cache_file else None)
    if cache_file is not None:
        record = asdict(choice)
        record.pop("cached"), record.pop("cache_file")
        record["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        stored[cache_key] = record
        try:
            write_json(cache_file, stored)
        except OSError:
            pass  # the choice stands; the next process measures again
    return choice
