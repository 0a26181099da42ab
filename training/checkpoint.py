"""Training checkpoints: one ``torch.save`` dict, written atomically, that both resumes a run exactly and
serves as the stage artifact (``teacher.pt``, ``student.pt``; see docs/interfaces.md).

Layout::

    {"model": state_dict of the unwrapped model, "optimizer", "scheduler", "scaler" (or None),
     "step": optimizer steps taken, "best_dice": best validation Dice so far (-inf before any),
     "rng": [per-rank random state], "train_state": {"best_step", "history", "wall_s", "train_s",
     "settings"}, "ema": {"decay", "updates", "shadow"} (last.pt of a run with ema_decay > 0), **extra}

``extra`` is the stage's metadata (``config``, ``labels``, ``preprocess``, ``arch`` ...), stored at the top
level so a loader reads ``ckpt["labels"]`` directly. Everything is plain data or tensors, so
:func:`load_checkpoint` uses ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from data.atomic import save_torch_atomic
from training.distributed import unwrap_model
from training.rng import capture_rng_state

RESERVED_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "best_dice", "rng", "train_state", "ema")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model/run; the message names the file."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint written by a different run (other architecture, labels, settings ...)."""


def _plain(value: Any) -> Any:
    """Tuples → lists, NumPy scalars → Python numbers, Paths → str, so extra meta loads weights-only."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    step: int,
    best_metric: float,
    extra: Mapping[str, Any] | None = None,
    *,
    scaler: Any | None = None,
    rng_states: list[dict] | None = None,
    train_state: Mapping[str, Any] | None = None,
    ema: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file, then rename).

    Args:
        path: destination, e.g. ``out_dir / "last.pt"``.
        model: the model; DDP/compile wrappers are removed before taking its state dict.
        optimizer: its state is stored (None stores None).
        scheduler: LR scheduler whose state is stored (None stores None).
        step: optimizer steps taken so far.
        best_metric: best validation Dice so far (stored as ``best_dice``).
        extra: stage metadata stored at the top level; must not use the keys in ``RESERVED_KEYS``.
        scaler: AMP ``GradScaler`` (fp16 only).
        rng_states: per-rank random states; default: this process's only.
        train_state: loop bookkeeping (history, best step, timing, settings).
        ema: the weight average's state (training/ema.py) in ``last.pt`` of a run that keeps one.
    """
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(RESERVED_KEYS))
    if clash:
        raise CheckpointError(f"{path}: extra metadata may not use reserved keys {clash}")
    ckpt: dict[str, Any] = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "step": int(step),
        "best_dice": float(best_metric),
        "rng": rng_states if rng_states is not None else [capture_rng_state()],
        "train_state": _plain(dict(train_state or {})),
    }
    if ema is not None:
        ckpt["ema"] = dict(ema)
    ckpt.update(_plain(extra))
    return save_torch_atomic(ckpt, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors only, no arbitrary pickles).

    Args:
        path: the ``.pt`` file.
        map_location: where tensors are placed (``"cpu"`` is right for resuming on any device).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "step" not in ckpt:
        raise CheckpointError(f"{path}: not a training checkpoint (expected a dict with 'model' and 'step')")
    return ckpt


def restore_training_state(
    ckpt: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    source: str | Path = "checkpoint",
) -> None:
    """Load weights, optimizer, scheduler and scaler states from ``ckpt`` into live objects.

    Build the scheduler before calling this: constructing a ``LambdaLR`` resets the optimizer's rates.

    Args:
        ckpt: a loaded checkpoint.
        model: the model (wrappers allowed); must match the saved state dict key for key, shape for shape.
        optimizer: receives the saved optimizer state, if both exist.
        scheduler: receives the saved scheduler state, if both exist.
        scaler: receives the saved GradScaler state, if both exist.
        source: the file name, for error messages.
    """
    target = unwrap_model(model)
    problems = state_dict_mismatch(target.state_dict(), ckpt["model"])
    if problems:
        raise IncompatibleCheckpointError(f"{source}: model does not match the checkpoint: {'; '.join(problems)}")
    target.load_state_dict(ckpt["model"])
    if optimizer is not None and ckpt.get("optimizer") is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as exc:
            raise IncompatibleCheckpointError(f"{source}: optimizer state does not fit ({exc})") from exc
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and scaler.is_enabled() and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])


def state_dict_mismatch(current: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor], limit: int = 5) -> list[str]:
    """Human-readable differences between two state dicts (missing/unexpected keys, shape changes)."""
    problems: list[str] = []
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    if missing:
        problems.append(f"missing in checkpoint {_head(missing, limit)}")
    if unexpected:
        problems.append(f"not in model {_head(unexpected, limit)}")
    shapes = [
        f"{k}: model {tuple(v.shape)} vs checkpoint {tuple(saved[k].shape)}"
        for k, v in current.items()
        if k in saved and tuple(v.shape) != tuple(saved[k].shape)
    ]
    if shapes:
        problems.append(f"shape mismatch {_head(shapes, limit)}")
    return problems


def _head(items: list[str], limit: int) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _canonical(value: Any) -> str:
    return json.dumps(_plain(value), sort_keys=True, default=str)


def check_compatible(
    ckpt: Mapping[str, Any],
    extra: Mapping[str, Any] | None,
    settings: Mapping[str, Any] | None = None,
    free_extra_keys: Iterable[str] = ("config",),
    free_settings: Iterable[str] = ("steps", "val_every", "log_every", "amp", "progress", "slab_conv", "channels_last"),
    source: str | Path = "checkpoint",
) -> None:
    """Refuse to resume from a checkpoint that another run wrote.

    Every key of ``extra`` except ``free_extra_keys`` (the full config, which legitimately differs in e.g.
    ``steps``) must equal the saved value; every training setting except ``free_settings`` must too.

    Args:
        ckpt: the loaded checkpoint.
        extra: the metadata this run would save.
        settings: this run's training settings as a dict.
        free_extra_keys: extra keys allowed to differ.
        free_settings: settings allowed to differ (raising ``steps`` extends a finished run).
        source: the file name, for the message.
    """
    diffs: list[str] = []
    free_extra = set(free_extra_keys)
    for key, value in (extra or {}).items():
        if key in free_extra:
            continue
        if key not in ckpt:
            diffs.append(f"{key!r} absent from checkpoint")
        elif _canonical(ckpt[key]) != _canonical(value):
            diffs.append(f"{key!r}: checkpoint {_short(ckpt[key])} vs now {_short(value)}")
    saved_settings = (ckpt.get("train_state") or {}).get("settings") or {}
    free = set(free_settings)
    for key, value in (settings or {}).items():
        if key in free or key not in saved_settings:
            continue
        if _canonical(saved_settings[key]) != _canonical(value):
            diffs.append(f"setting {key!r}: checkpoint {saved_settings[key]!r} vs now {value!r}")
    if diffs:
        raise IncompatibleCheckpointError(
            f"{source} was written by a different run ({'; '.join(diffs)}); "
            "use another output folder or delete the checkpoint to start over"
        )


def _short(value: Any, limit: int = 80) -> str:
    text = _canonical(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def best_dice(ckpt: Mapping[str, Any]) -> float | None:
    """The best validation Dice stored in a checkpoint, None before any validation."""
    value = float(ckpt.get("best_dice", -math.inf))
    return None if math.isinf(value) else value
