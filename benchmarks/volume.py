"""The whole-volume workload: NIfTI in → preprocess → sliding window → postprocess → NIfTI mask out.

ONNX Runtime and OpenVINO rows go through ``deploy.Segmenter`` exactly as a user deploys them. PyTorch
eager rows (teacher, students before export) have no deploy path (deploy/ is torch-free), so they run
the same steps in torch: canonical (RAS) orientation, trilinear resampling to the spec's spacing, the
spec's intensity mapping, MONAI ``sliding_window_inference`` (Gaussian blending, the bundle's overlap),
argmax, nearest resampling back to the input grid, atomic save. The arithmetic of resampling may differ
from deploy's in the last voxel; latency and Dice are comparable, not bit-identical.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from data.atomic import atomic_path

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


def sliding_window_count(shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """Number of ROI windows MONAI's sliding window visits on ``shape`` (after padding up to the ROI).

    Args:
        shape: volume grid ``[X, Y, Z]`` after resampling.
        roi_size: window ``[X, Y, Z]``.
        overlap: fraction of overlap between neighbouring windows.
    """
    count = 1
    for n, r in zip(shape, roi_size):
        n = max(int(n), int(r))
        interval = max(int(r * (1 - overlap)), 1)
        count *= int(np.ceil((n - r) / interval)) + 1 if n > r else 1
    return count


def _torch_segmenter(entry: dict, precision: str, threads: int) -> SegmentFile:
    import nibabel as nib
    import torch
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    from benchmarks.runtimes import load_torch_model

    torch.set_num_threads(threads)
    model, meta = load_torch_model(entry["torch"])
    spec = entry.get("preprocess") or meta.get("preprocess")
    if not spec:
        raise VolumeWorkloadError(f"{entry.get('name')}: no preprocessing spec for the volume workload")
    roi = [int(s) for s in entry["roi_size"]]
    overlap = float(entry.get("overlap", 0.25))
    target = [float(s) for s in spec["spacing_mm"]]
    intensity = spec["intensity"]

    def segment(in_path: str | Path, out_path: str | Path) -> None:
        img = nib.as_closest_canonical(nib.load(str(in_path)))
        data = np.asarray(img.dataobj, dtype=np.float32)
        if data.ndim != 3:
            raise VolumeWorkloadError(f"{in_path}: expected a 3D CT volume, got shape {data.shape}")
        spacing = [float(s) for s in img.header.get_zooms()[:3]]
        lo, hi = float(intensity["hu_min"]), float(intensity["hu_max"])
        data = np.clip(data, lo, hi)
        if intensity.get("mode", "scale") == "zscore":
            data = (data - float(intensity["mean"])) / float(intensity["std"])
        else:
            data = (data - lo) / (hi - lo)
        x = torch.from_numpy(data)[None, None]
        x = F.interpolate(x, size=resampled_shape(data.shape, spacing, target), mode="trilinear", align_corners=False)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = sliding_window_inference(x, roi, 1, model, overlap=overlap, mode="gaussian")
        mask = logits.float().argmax(1, keepdim=True).float()
        mask = F.interpolate(mask, size=list(data.shape), mode="nearest")[0, 0].to(torch.uint8).numpy()
        out = nib.Nifti1Image(mask, img.affine)
        out.set_data_dtype(np.uint8)
        with atomic_path(out_path, suffix=".nii.gz") as tmp:
            nib.save(out, str(tmp))

    return segment
