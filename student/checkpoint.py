"""Student checkpoints (``student.pt``), the contract of docs/interfaces.md."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from data.atomic import save_torch_atomic
from student.registry import build_student


class StudentCheckpointError(ValueError):
    """A file that is not a usable student checkpoint; the message names the file and the problem."""


REQUIRED_META = ("arch", "roi_size", "preprocess", "labels")


def save_student(path: str | Path, model: nn.Module, meta: Mapping[str, Any]) -> Path:
    """Write ``{"model": state_dict, **meta}`` atomically.

    Args:
        path: destination (``student.pt``).
        model: the student network.
        meta: at least ``arch`` (``{"name", "num_classes", "in_channels"}``, optionally ``"options"``: the
            architecture options it was built with, ``student.arch_options``), ``roi_size``, ``preprocess``
            and ``labels``; optionally ``step``, ``optimizer``, ``scheduler``, ``best_dice``, ``lambda_kd``,
            ``config``.
    """
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise StudentCheckpointError(f"{path}: student meta lacks {missing}")
    arch = meta["arch"]
    if not isinstance(arch, Mapping) or not {"name", "num_classes"} <= set(arch):
        raise StudentCheckpointError(f"{path}: meta['arch'] must hold name and num_classes, got {arch!r}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"model": state, **{k: v for k, v in meta.items() if k != "model"}}
    payload["arch"] = {"in_channels": 1, **dict(arch)}
    return save_torch_atomic(payload, path)


def load_student(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a student from its checkpoint.

    Args:
        path: a file written by ``save_student``.
        device: where to put the model.

    Returns:
        ``(model in eval mode, meta)``; ``meta`` is the checkpoint without the ``model`` state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise StudentCheckpointError(f"{path}: student checkpoint not found")
    try:
        # weights_only: a checkpoint is data; refuse pickled code.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StudentCheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise StudentCheckpointError(f"{path}: not a student checkpoint (needs 'model' and 'arch'; found {keys})")
    missing = [k for k in REQUIRED_META if k not in ckpt]
    if missing:
        raise StudentCheckpointError(f"{path}: student checkpoint lacks {missing}")
    arch = ckpt["arch"]
    try:
        model = build_student(arch["name"], arch["num_classes"], arch.get("in_channels", 1), arch.get("options"))
    except (KeyError, TypeError, ValueError) as exc:
        raise StudentCheckpointError(f"{path}: bad 'arch' entry {arch!r}") from exc
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise StudentCheckpointError(f"{path}: weights do not fit {arch['name']!r}: {str(exc)[:300]}") from exc
    meta = {k: v for k, v in ckpt.items() if k != "model"}
    return model.to(device).eval(), meta
