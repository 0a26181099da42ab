"""The models a benchmark measures: entries from a deploy bundle, a pipeline run folder (its teacher, its bundles
and its test split) or an untrained student exported on the spot (``--quick``)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from configs.schema import EvaluationConfig

class BenchmarkConfigError(ValueError):
    """Benchmark inputs that cannot be used (no models, bad thread list, missing run dir artifacts)."""


@dataclass
class ModelEntry:
    """One model to benchmark, with every form it exists in.

    Attributes:
        name: row label (``teacher``, ``swinunetr_tiny``, ...).
        roi_size: patch ``[X, Y, Z]``.
        num_classes: K.
        torch: eager source (``{"kind": "student"|"teacher", "path"}`` or ``{"kind": "arch", "name",
            "num_classes"}``), or None.
        onnx: ONNX file; onnx_int8: an INT8 (QDQ) ONNX file if export wrote one.
        openvino: ``{"fp32": xml, "int8": xml}``.
        bundle: deploy bundle folder (the volume workload on onnxruntime/openvino needs it).
        preprocess: preprocessing spec; labels: ``{id: name}``; overlap: sliding-window overlap.
        crop_foreground: the body crop the volume workload applies (``model.json``'s, or the training
            preprocessing's for the teacher); None: none.
        postprocess: the bundle's postprocessing (largest connected piece of some classes, deploy/postprocess.py),
            applied by the volume workload's eager rows as deploy applies it; None: none.
        gflops: forward GFLOPs of one patch (counted when None and a torch source exists).
        param_mb: parameter bytes of the eager model in MB (its size column).
    """

    name: str
    roi_size: list[int]
    num_classes: int
    torch: dict | None = None
    onnx: str | None = None
    onnx_int8: str | None = None
    openvino: dict = field(default_factory=dict)
    bundle: str | None = None
    preprocess: dict | None = None
    labels: dict | None = None
    overlap: float = 0.25
    crop_foreground: dict | None = None
    postprocess: dict | None = None
    gflops: float | None = None
    param_mb: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def entry_from_bundle(bundle_dir: str | Path, name: str | None = None, torch_source: dict | None = None) -> ModelEntry:
    """A model entry from a deploy bundle's ``model.json`` (docs/interfaces.md).

    Args:
        bundle_dir: bundle folder.
        name: row label; defaults to the student's arch name recorded in the bundle, else the folder name.
        torch_source: eager source for the PyTorch rows; defaults to the arch recorded in the bundle (random
            weights: its latency rows are valid, its Dice is not measured).
    """
    bundle_dir = Path(bundle_dir)
    meta_path = bundle_dir / "model.json"
    if not meta_path.is_file():
        raise BenchmarkConfigError(f"{bundle_dir}: not a deploy bundle (no model.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise BenchmarkConfigError(f"{meta_path}: not valid JSON ({exc})") from exc
    for key in ("roi_size", "num_classes", "files"):
        if key not in meta:
            raise BenchmarkConfigError(f"{meta_path}: lacks {key!r}")
    files = {Path(p).as_posix() for p in meta["files"]}
    student = meta.get("student") or {}
    arch = student.get("arch") if isinstance(student.get("arch"), dict) else student
    arch_name = arch.get("name") if isinstance(arch, dict) else None
    if torch_source is None:
        ckpt = student.get("checkpoint")
        if ckpt and Path(ckpt).is_file():
            torch_source = {"kind": "student", "path": str(ckpt)}
        elif arch_name:
            torch_source = {"kind": "arch", "name": arch_name, "num_classes": int(meta["num_classes"])}

    def pick(*candidates: str) -> str | None:
        return next((str(bundle_dir / c) for c in candidates if c in files), None)

    return ModelEntry(
        name=name or arch_name or bundle_dir.name,
        roi_size=[int(s) for s in meta["roi_size"]],
        num_classes=int(meta["num_classes"]),
        torch=torch_source,
        onnx=pick("model.onnx"),
        onnx_int8=pick("model_int8.onnx", "onnx/model_int8.onnx"),
        openvino={k: v for k, v in {"fp32": pick("openvino/model_fp32.xml"), "int8": pick("openvino/model_int8.xml")}.items() if v},
        bundle=str(bundle_dir),
        preprocess=meta.get("preprocess"),
        labels={int(k): v for k, v in (meta.get("labels") or {}).items()},
        overlap=float(meta.get("overlap", EvaluationConfig.overlap)),  # bundles written before it was recorded
        crop_foreground=meta.get("crop_foreground"),
        postprocess=meta.get("postprocess"),
    )


def entries_from_run_dir(run_dir: str | Path) -> tuple[list[ModelEntry], list[tuple[str, str]]]:
    """Models and held-out labelled cases of a pipeline run folder.

    The pipeline's layout (pipeline/pipeline.py): ``teacher/teacher.pt`` (teacher, eager rows),
    ``bundle/<student>/bundle/model.json`` (deploy bundles; their eager rows use the ``student.pt`` the
    bundle records) and ``data/data.json`` (the test split every row is scored on; the validation split
    of a run without one, which the report's notes then call optimistic). Other layouts are
    searched (``**/teacher.pt``, ``**/model.json``); folders whose name starts with a dot (a bundle still
    being written, a replaced one) are skipped.

    Args:
        run_dir: the run folder written by ``distill/run.py``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BenchmarkConfigError(f"{run_dir}: run folder not found")

    def visible(paths) -> list[Path]:
        return sorted(p for p in paths if not any(part.startswith(".") for part in p.relative_to(run_dir).parts))

    entries: list[ModelEntry] = []
    teachers = [run_dir / "teacher" / "teacher.pt"] if (run_dir / "teacher" / "teacher.pt").is_file() else visible(run_dir.glob("**/teacher.pt"))
    for teacher_pt in teachers:
        entry = _teacher_entry(teacher_pt)
        if len(teachers) > 1:
            entry.name = f"teacher:{teacher_pt.parent.relative_to(run_dir).as_posix()}"
        entries.append(entry)
    for meta_path in visible(run_dir.glob("**/model.json")):
        folder = meta_path.parent
        entry = entry_from_bundle(folder)
        # bundle/<student>/bundle: the student's folder names the row (two bundles may share an arch)
        entry.name = folder.parent.name if folder.name == "bundle" and folder.parent != run_dir else folder.name
        if any(e.name == entry.name for e in entries):
            entry.name = folder.relative_to(run_dir).as_posix().replace("/", ":")
        entries.append(entry)
    if not entries:
        raise BenchmarkConfigError(f"{run_dir}: no teacher.pt and no deploy bundle (model.json) found")
    return entries, run_dir_cases(run_dir)[1]


def run_dir_cases(run_dir: str | Path) -> tuple[str | None, list[tuple[str, str]]]:
    """``(split, [(image, label)])``: the run's test cases, else its validation cases, else ``(None, [])``."""
    data_json = Path(run_dir) / "data" / "data.json"
    if not data_json.is_file():
        return None, []
    try:
        payload = json.loads(data_json.read_text())
        for split in ("test", "val"):
            cases = [(c["image"], c["label"]) for c in payload.get(split, []) if c.get("label")]
            if cases:
                return split, cases
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
        raise BenchmarkConfigError(f"{data_json}: not a data stage artifact with 'test'/'val' lists of "
                                   f"{{image, label}} cases ({exc})") from exc
    return None, []


def _teacher_entry(path: Path) -> ModelEntry:
    import torch

    from data.transforms import body_crop_spec

    meta = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("roi_size", "num_classes"):
        if key not in meta:
            raise BenchmarkConfigError(f"{path}: teacher checkpoint lacks {key!r}")
    return ModelEntry(
        name="teacher",
        roi_size=[int(s) for s in meta["roi_size"]],
        num_classes=int(meta["num_classes"]),
        torch={"kind": "teacher", "path": str(path)},
        preprocess=meta.get("preprocess"),
        labels={int(k): v for k, v in (meta.get("labels") or {}).items()},
        crop_foreground=body_crop_spec(),  # what the teacher's training preprocessing did
    )


def quick_entry(work_dir: str | Path, num_classes: int = 8, roi_size: Sequence[int] = (64, 64, 32),
                calibration: str | Path | None = None) -> ModelEntry:
    """An untrained SwinUNETR-tiny exported with ``export.build_bundle`` into ``work_dir`` (no run needed).

    With ``calibration`` (a dataset folder) the bundle also gets an OpenVINO INT8 model, accepted whatever
    its Dice drop (``max_dice_drop=1``): an untrained network has no accuracy to keep, and NNCF's
    accuracy-controlled fallback on SwinUNETR takes over 16 minutes on 2 cores. Its latency is valid.

    Args:
        work_dir: where the checkpoint and the bundle go.
        num_classes: K of the untrained network (the phantoms have 8 classes with background).
        roi_size: its patch size (multiples of 32).
        calibration: dataset folder (``dataset.json``) for INT8 calibration; ``None``: FP32 only.
    """
    try:
        from export import build_bundle
    except ImportError as exc:
        raise BenchmarkConfigError(f"--quick without a run dir needs export/ (export.build_bundle): {exc}") from exc
    import torch

    from student import build_student, save_student

    work_dir = Path(work_dir)
    torch.manual_seed(0)
    model = build_student("swinunetr_tiny", num_classes)
    labels = {0: "background", **{i: f"class_{i}" for i in range(1, num_classes)}}
    preprocess = {"spacing_mm": [4.0, 4.0, 4.0], "orientation": "RAS",
                  "intensity": {"mode": "scale", "hu_min": -175.0, "hu_max": 250.0, "mean": None, "std": None}}
    ckpt = save_student(work_dir / "student.pt", model, {
        "arch": {"name": "swinunetr_tiny", "num_classes": num_classes, "in_channels": 1},
        "roi_size": list(roi_size), "preprocess": preprocess, "labels": labels, "step": 0,
    })
    # ONNX Runtime's static INT8 of SwinUNETR took 44 s here and ran 2.2x slower than FP32 (never offered)
    bundle = build_bundle(ckpt, work_dir / "bundle", calibration=calibration, int8=calibration is not None,
                          max_dice_drop=1.0, calibration_crops=4, validation_crops=2, threads=2, onnxruntime_int8=False)
    return entry_from_bundle(bundle, name="swinunetr_tiny (untrained)", torch_source={"kind": "student", "path": str(ckpt)})
