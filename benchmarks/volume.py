"""The whole-volume workload: NIfTI in → preprocess → sliding window → postprocess → NIfTI mask out.

ONNX Runtime and OpenVINO rows go through ``deploy.Segmenter`` exactly as a user deploys them. PyTorch
eager rows (teacher, students before export) go through the same ``Segmenter`` steps (orientation,
resampling, body crop, intensity, Gaussian sliding window, logits back to the input grid) around the
eager model (``Segmenter.with_predictor``), so their Dice differs from the exported rows' only by the
model's arithmetic. (Until 2026-11-24 they skipped the body crop: the demo's barely trained tiny student
scored 0.039 eager against 0.091 exported on the same cases.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from configs.schema import EvaluationConfig
from deploy.sliding_window import window_count

# MONAI's window placement, as deploy runs it (tests/test_benchmarks.py checks it against MONAI's own calls)
sliding_window_count = window_count

SegmentFile = Callable[[str | Path, str | Path], None]


class VolumeWorkloadError(ValueError):
    """A volume workload that cannot be set up; the message names the bundle or model."""


def volume_segmenter(entry: dict, runtime: str, precision: str, threads: int, bundle: str | None) -> SegmentFile:
    """A ``segment(in_path, out_path)`` callable for one row.

    Args:
        entry: model entry dict (``torch`` source, ``preprocess``, ``roi_size``, ``overlap``).
        runtime: ``pytorch``, ``onnxruntime`` or ``openvino``.
        precision: ``fp32``, ``bf16`` or ``int8``.
        threads: intra-op threads.
        bundle: deploy bundle folder (onnxruntime/openvino rows).
    """
    if runtime in ("onnxruntime", "openvino"):
        if not bundle:
            raise VolumeWorkloadError(f"{entry.get('name')}: the volume workload on {runtime} needs a deploy bundle")
        from deploy import Segmenter

        segmenter = Segmenter(bundle, runtime=runtime, precision=precision, threads=threads)

        def segment(in_path: str | Path, out_path: str | Path) -> None:
            segmenter.segment_file(in_path, out_path)

        return segment
    if runtime == "pytorch":
        return _torch_segmenter(entry, precision, threads)
    raise VolumeWorkloadError(f"unknown runtime {runtime!r}")


def resampled_shape(shape: Sequence[int], spacing_mm: Sequence[float], target_mm: Sequence[float]) -> list[int]:
    """Grid size after resampling ``shape`` at ``spacing_mm`` to ``target_mm`` (rounded, >= 1)."""
    return [max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing_mm, target_mm)]


def _torch_segmenter(entry: dict, precision: str, threads: int) -> SegmentFile:
    from benchmarks.runtimes import load_predictor, load_torch_model
    from deploy import Segmenter

    meta = {} if entry.get("preprocess") and entry.get("labels") else load_torch_model(entry["torch"])[1]
    spec = entry.get("preprocess") or meta.get("preprocess")
    if not spec:
        raise VolumeWorkloadError(f"{entry.get('name')}: no preprocessing spec for the volume workload")
    manifest = {"preprocess": spec, "roi_size": [int(s) for s in entry["roi_size"]],
                "num_classes": int(entry["num_classes"]), "labels": entry.get("labels") or meta.get("labels") or {},
                "overlap": float(entry.get("overlap", EvaluationConfig.overlap)), "crop_foreground": entry.get("crop_foreground"),
                "postprocess": entry.get("postprocess")}
    predictor = load_predictor(entry, "pytorch", precision, threads, [1, 1, *manifest["roi_size"]])
    return Segmenter.with_predictor(manifest, predictor, source=str(entry.get("name"))).segment_file
