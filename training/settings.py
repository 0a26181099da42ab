"""Training settings: :class:`TrainSettings`, what :func:`training.loop.fit` needs from a config section
(``teacher:`` or ``distill:``), each value checked when the settings are built; a bad one raises
:class:`TrainSettingsError` naming its key.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from training.schedule import SCHEDULES

AMP_MODES = (True, False, "bf16", "fp16")


class TrainSettingsError(ValueError):
    """A training setting with an unusable value; the message names the key."""


@dataclass
class TrainSettings:
    """What :func:`training.loop.fit` needs from a config section (``teacher:`` or ``distill:``).

    Args:
        steps: optimizer steps of the whole run.
        lr: peak learning rate (after warm-up).
        weight_decay: AdamW decoupled decay (not applied to norms, biases, embeddings).
        warmup_steps: linear warm-up length.
        schedule: ``constant``, ``poly`` or ``cosine`` after warm-up.
        poly_power: exponent of the poly decay.
        grad_clip: max global gradient norm; 0 or None disables clipping.
        val_every: validate (and checkpoint) every this many steps; 0 = only at the end.
        amp: mixed precision: True (CUDA only: bf16 where supported, else fp16), ``"bf16"`` (CUDA, and CPU
            too: worth it only where the CPU has native bf16, e.g. AVX512-BF16/AMX), ``"fp16"`` (CUDA), False.
        log_every: steps between training-metric records in the tracker.
        seed: base seed; rank ``r`` seeds its data with ``seed + r``.
        progress: show a tqdm bar on rank 0.
        slab_conv: on a CPU, run the batch-1 3D convolutions that ATen would compute on its slow im2col path
            on oneDNN as depth slabs (same function and gradients; training/slab_conv.py).
        channels_last: on a CPU, train 3D models in ``torch.channels_last_3d`` (weights and the batch's 5-D
            tensors); oneDNN's convolutions run faster on it. The checkpoints' state dicts load into any layout.
        ema_decay: 0 = off; else validation, ``best.pt`` (hence ``teacher.pt`` / ``student.pt``) use an
            exponential moving average of the trainable weights with this decay (training/ema.py);
            ``last.pt`` keeps the raw weights and the average, for resuming.
    """

    steps: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
    poly_power: float = 0.9
    grad_clip: float | None = 1.0
    val_every: int = 0
    amp: bool | str = True
    log_every: int = 10
    seed: int = 0
    progress: bool = True
    ema_decay: float = 0.0
    slab_conv: bool = True
    channels_last: bool = False

    def __post_init__(self) -> None:
        self.steps = _as_int("steps", self.steps, minimum=1)
        self.lr = _as_float("lr", self.lr)
        if self.lr <= 0:
            raise TrainSettingsError(f"lr must be > 0, got {self.lr}")
        self.weight_decay = _as_float("weight_decay", self.weight_decay)
        if self.weight_decay < 0:
            raise TrainSettingsError(f"weight_decay must be >= 0, got {self.weight_decay}")
        self.warmup_steps = _as_int("warmup_steps", self.warmup_steps, minimum=0)
        if self.schedule not in SCHEDULES:
            raise TrainSettingsError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        self.poly_power = _as_float("poly_power", self.poly_power)
        if self.grad_clip is not None:
            self.grad_clip = _as_float("grad_clip", self.grad_clip)
            if self.grad_clip < 0:
                raise TrainSettingsError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        self.val_every = _as_int("val_every", self.val_every, minimum=0)
        if not any(self.amp is mode or (isinstance(mode, str) and self.amp == mode) for mode in AMP_MODES):
            raise TrainSettingsError(f"amp must be one of true, false, 'bf16', 'fp16'; got {self.amp!r}")
        self.log_every = _as_int("log_every", self.log_every, minimum=1)
        self.seed = _as_int("seed", self.seed, minimum=0)
        self.progress = bool(self.progress)
        for name in ("slab_conv", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise TrainSettingsError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self.ema_decay = _as_float("ema_decay", self.ema_decay)
        if not 0.0 <= self.ema_decay < 1.0:
            raise TrainSettingsError(f"ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any], **overrides: Any) -> "TrainSettings":
        """Pick the known keys from a config section (other keys, e.g. ``roi_size``, are ignored).

        Args:
            section: e.g. ``cfg["teacher"]``.
            **overrides: values that win over the section, e.g. ``seed=cfg["run"]["seed"]``.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TrainSettingsError(f"unknown training settings {unknown}; known: {sorted(names)}")
        values = {k: v for k, v in section.items() if k in names}
        values.update(overrides)
        for required in ("steps", "lr"):
            if required not in values:
                raise TrainSettingsError(f"config section has no {required!r} (keys: {sorted(section)})")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool):
        raise TrainSettingsError(f"{name} must be an integer, got {value!r}")
    try:
        out = int(value)
    except (TypeError, ValueError) as exc:
        raise TrainSettingsError(f"{name} must be an integer, got {value!r}") from exc
    if out != float(value) or out < minimum:
        raise TrainSettingsError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return out


def _as_float(name: str, value: Any) -> float:
    # PyYAML reads "1e-3" (no dot) as a string; accept it rather than fail on a YAML 1.1 quirk.
    if isinstance(value, bool):
        raise TrainSettingsError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise TrainSettingsError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(out):
        raise TrainSettingsError(f"{name} must be finite, got {value!r}")
    return out
