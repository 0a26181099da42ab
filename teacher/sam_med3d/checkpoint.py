"""Load published SAM-Med3D weights with strict key matching.

The public checkpoints (``sam_med3d_turbo.pth``, ``sam_med3d.pth`` of the ``vit_b_ori`` model) are
training snapshots: a dict whose ``model_state_dict`` holds the weights (next to optimizer state, epoch,
...). A bare state dict is accepted too, and a ``module.`` prefix left by DataParallel/DDP is removed.
Anything else that does not match the model exactly is refused, naming the keys: a partial load would
silently leave random weights in a teacher that everything downstream trusts.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import torch
from torch import nn


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the model; the message names them."""


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatchError(
            f"{path}: not a SAM-Med3D checkpoint (expected a state dict, bare or under 'model_state_dict')"
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _short(keys: list[str], limit: int = 12) -> str:
    head = ", ".join(keys[:limit])
    return head + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _safe_globals() -> list:
    """Non-tensor objects found in SAM-Med3D training snapshots next to the weights (``args`` is an
    argparse Namespace; the metric lists may hold numpy scalars)."""
    core = np._core if hasattr(np, "_core") else np.core
    allowed: list = [argparse.Namespace, np.dtype, np.ndarray]
    for name in ("scalar", "_reconstruct"):
        fn = getattr(core.multiarray, name)
        # Snapshots written under numpy 1.x name these numpy.core.multiarray.*, numpy 2 numpy._core.*.
        allowed += [fn, (fn, f"numpy.core.multiarray.{name}")]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64")]
    return allowed


def load_sam_med3d_checkpoint(path: str | Path, model: nn.Module, trusted: bool = False) -> nn.Module:
    """Load SAM-Med3D weights into ``model`` (a ``SamMed3D``) with strict key and shape matching.

    Args:
        path: ``.pth`` file with the weights under ``model_state_dict`` or as a bare state dict.
        model: the freshly built model whose architecture must match the checkpoint.
        trusted: unpickle arbitrary objects (``weights_only=False``); only for a file you trust, when the
            safe loader refuses an object it does not know.

    Returns:
        ``model``, with the weights loaded.

    Raises:
        CheckpointMismatchError: missing, unexpected or misshapen keys (all named, with shapes for the
            misshapen ones), or a file that holds no state dict.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAM-Med3D checkpoint not found: {path}")
    try:
        if trusted:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(_safe_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unknown pickled object, or not a torch file at all
        hint = "" if trusted else " (if the file is trusted, pass trusted=True)"
        raise CheckpointMismatchError(f"{path}: cannot be read as a torch checkpoint{hint}: {exc}") from exc
    state = _extract_state_dict(obj, path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys [{_short(missing)}]")
    if unexpected:
        problems.append(f"unexpected keys [{_short(unexpected)}]")
    if misshapen:
        problems.append(f"misshapen keys [{_short(misshapen)}]")
    if problems:
        raise CheckpointMismatchError(f"{path}: does not match the SAM-Med3D model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model
