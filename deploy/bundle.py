"""The deploy bundle: a folder with ``model.json`` and model files whose sha256 sums it records.

The format is fixed in docs/interfaces.md; ``export.build_bundle`` writes it, :func:`load_bundle` reads it
and refuses a bundle whose files are missing or differ by a single byte from what export wrote.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deploy.errors import BundleError
from deploy.files import file_sha256

FORMAT_VERSION = 1
MANIFEST = "model.json"
REQUIRED_KEYS = ("format_version", "labels", "num_classes", "preprocess", "roi_size", "overlap", "input_name",
                 "output_name", "files", "models")


def load_bundle(bundle_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read and check a bundle's ``model.json``.

    Args:
        bundle_dir: the bundle folder.
        verify: check every listed file's sha256 (a few ms per MB); refuse the bundle on any mismatch.

    Returns:
        the manifest with ``labels`` keys as ``int`` and ``"dir"`` set to the bundle's absolute path.
    """
    bundle_dir = Path(bundle_dir)
    manifest_path = bundle_dir / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{bundle_dir}: not a deploy bundle ({MANIFEST} not found)")
    try:
        meta = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{manifest_path}: top level must be an object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise BundleError(f"{manifest_path}: lacks keys {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{manifest_path}: format_version {meta['format_version']!r}, this runtime reads {FORMAT_VERSION}")
    files = meta["files"]
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{manifest_path}: 'files' must map relative paths to sha256 sums")
    for rel, expected in files.items():
        path = bundle_dir / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BundleError(f"{manifest_path}: file entry {rel!r} leaves the bundle")
        if not path.is_file():
            raise BundleError(f"{path}: listed in {MANIFEST} but missing (incomplete bundle)")
        if verify and file_sha256(path) != expected:
            raise BundleError(f"{path}: sha256 differs from {MANIFEST} (file changed or corrupted)")
    for key, rel in _model_files(meta):
        if rel not in files:
            raise BundleError(f"{manifest_path}: model {key!r} file {rel!r} has no checksum entry")
    try:
        meta["labels"] = {int(k): str(v) for k, v in meta["labels"].items()}
        meta["roi_size"] = [int(s) for s in meta["roi_size"]]
        meta["num_classes"] = int(meta["num_classes"])
    except (AttributeError, TypeError, ValueError) as exc:
        raise BundleError(f"{manifest_path}: labels/roi_size/num_classes malformed ({exc})") from exc
    if len(meta["roi_size"]) != 3 or min(meta["roi_size"]) < 1:
        raise BundleError(f"{manifest_path}: roi_size must be 3 positive integers, got {meta['roi_size']}")
    meta["dir"] = str(bundle_dir.resolve())
    return meta


def _model_files(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """``(runtime/precision, relpath)`` of every model the manifest offers (the weights ``.bin`` included)."""
    out = []
    for runtime, by_precision in (meta.get("models") or {}).items():
        for precision, rel in (by_precision or {}).items():
            out.append((f"{runtime}/{precision}", rel))
            if rel.endswith(".xml"):
                out.append((f"{runtime}/{precision} weights", rel[: -len(".xml")] + ".bin"))
    return out
