"""Stage bookkeeping: run a pipeline stage only when its inputs changed.

Each stage folder holds ``stage.json``::

    {"stage": "teacher", "inputs_hash": "...", "inputs": {...}, "status": "running" | "done",
     "artifacts": {"teacher": "/abs/path/teacher.pt", ...}, "artifact_hashes": {...}, "wall_seconds": 12.3}

A stage is skipped when ``status`` is ``done``, ``inputs_hash`` matches and every artifact is still on
disk. When the inputs changed the stale folder is removed before the stage runs again; when a run was
killed (``status: running`` with the same inputs) the folder is kept so that the training engine resumes
from its ``last.pt``.

Under ``torchrun`` rank 0 decides whether a stage is up to date and alone writes manifests. A stage runs
on rank 0 only (the others wait for its record), except training stages (``all_ranks=True``), whose body
every rank runs so that DDP has all its processes.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from configs import config_hash
from data.atomic import write_json_atomic
from training.distributed import barrier, broadcast_object, is_distributed, is_main_process


@dataclass
class StageRecord:
    """The outcome of one stage (run now or skipped because up to date)."""

    name: str
    directory: Path
    inputs_hash: str
    artifacts: dict[str, str]
    artifact_hashes: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0
    skipped: bool = False
    info: dict = field(default_factory=dict)


def artifact_hash(path: str | Path) -> str:
    """Short sha256 of a file, or of a folder's files (names and bytes), identifying an artifact's content."""
    import hashlib

    from distill.cache import file_sha256

    p = Path(path)
    if p.is_file():
        return file_sha256(p)[:16]
    digest = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        digest.update(str(f.relative_to(p)).encode())
        digest.update(file_sha256(f).encode())
    return digest.hexdigest()[:16]


def run_stage(
    name: str,
    directory: str | Path,
    inputs: Mapping[str, Any],
    body: Callable[[Path], tuple[dict[str, str], dict]],
    log: Callable[[str], None] = print,
    all_ranks: bool = False,
) -> StageRecord:
    """Run ``body(directory)`` unless ``directory/stage.json`` records the same inputs as done.

    Args:
        name: stage name (for messages).
        directory: the stage's folder.
        inputs: everything the stage's output depends on (config sections, upstream artifact hashes);
            hashed with ``configs.config_hash``.
        body: does the work; returns ``(artifacts {name: path}, info {json-able})``.
        log: where progress messages go.
        all_ranks: under torchrun, run ``body`` on every rank (training stages); else on rank 0 only.
    """
    directory = Path(directory)
    manifest_path = directory / "stage.json"
    inputs_hash = config_hash(dict(inputs))
    main = is_main_process()
    done = _up_to_date(_read(manifest_path), inputs_hash) if main else None
    done = broadcast_object(done)
    if done is not None:
        if main:
            log(f"[{name}] up to date ({directory}); skipped")
        return StageRecord(name, directory, inputs_hash, done.get("artifacts", {}), done.get("artifact_hashes", {}),
                           float(done.get("wall_seconds", 0.0)), True, done.get("info", {}))
    record = {"stage": name, "inputs_hash": inputs_hash, "inputs": dict(inputs), "status": "running"}
    if main:
        previous = _read(manifest_path)
        if previous is not None and previous.get("inputs_hash") != inputs_hash and directory.exists():
            log(f"[{name}] inputs changed; removing stale {directory}")
            shutil.rmtree(directory)
        write_json_atomic(manifest_path, record)
    barrier()  # nobody reads the folder before a stale one is gone
    result: StageRecord | None = None
    if main or all_ranks:
        start = time.perf_counter()
        artifacts, info = body(directory)
        wall = time.perf_counter() - start
        artifacts = {k: str(v) for k, v in artifacts.items()}
        if main:
            hashes = {k: artifact_hash(v) for k, v in artifacts.items()}
            record.update(status="done", artifacts=artifacts, artifact_hashes=hashes, wall_seconds=round(wall, 2), info=info)
            write_json_atomic(manifest_path, record)
            result = StageRecord(name, directory, inputs_hash, artifacts, hashes, wall, False, info)
    return broadcast_object(result) if is_distributed() else result


def stage_artifact(directory: str | Path, name: str) -> Path | None:
    """Path of artifact ``name`` recorded by a finished stage in ``directory`` (its ``stage.json``), when it
    is still on disk; None otherwise."""
    record = _read(Path(directory) / "stage.json")
    path = (record or {}).get("artifacts", {}).get(name) if (record or {}).get("status") == "done" else None
    return Path(path) if path and Path(path).exists() else None


def stage_up_to_date(directory: str | Path, inputs: Mapping[str, Any]) -> bool:
    """Whether ``run_stage`` would skip this stage (done, for these inputs, every artifact on disk)."""
    return _up_to_date(_read(Path(directory) / "stage.json"), config_hash(dict(inputs))) is not None


def _up_to_date(previous: dict | None, inputs_hash: str) -> dict | None:
    """The previous record when it is done, for the same inputs, with every artifact still on disk."""
    if previous is None or previous.get("inputs_hash") != inputs_hash or previous.get("status") != "done":
        return None
    if not all(Path(p).exists() for p in previous.get("artifacts", {}).values()):
        return None
    return previous


def _read(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn manifest counts as absent: the stage reruns
