"""Artifact files: atomic writes (a temporary file beside the target, then a rename) and checksums.

A reader (or a resumed run) never sees a half-written checkpoint, cache entry, mask or report: either the
old file or the complete new one is there.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# One copy of each: the edge runtime owns them (deploy/ imports nothing of the project outside itself).
from deploy.files import atomic_path, file_sha256

__all__ = ["atomic_path", "file_sha256", "save_torch_atomic", "write_bytes_atomic", "write_json_atomic",
           "write_text_atomic"]


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def save_torch_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temporary file (torch imported lazily: deploy/ never needs it)."""
    import torch

    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(obj, tmp)
    return Path(path)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
