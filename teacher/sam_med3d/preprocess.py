"""SAM-Med3D's input preprocessing, as its training and inference code applies it (TorchIO there):

1. canonical orientation (RAS), resampled to 1.5 mm isotropic (image trilinear, label nearest);
2. crop or pad to a 128³ window (centred on the volume, or on a prompt's target when one is known);
3. z-score with statistics over the voxels > 0 only, applied to every voxel: ``(x - mean) / std``.
   For CT in Hounsfield units "> 0" keeps soft tissue and bone and leaves out air and fat; no HU window
   is applied first.

``sam_med3d_preprocess_spec()`` states these rules; ``zscore_foreground`` below is step 3's arithmetic
(numpy, no torch), used on raw volumes by ``SamMed3DClickSegmenter(zscore=True)``. In the pipeline, where
one preprocessing spec serves teacher, students and ``deploy``, step 1 is the spec's job (``data.transforms``
/ ``deploy``) and step 3 is ``preprocess.intensity: zscore`` (``data.stats``): the same statistics over
voxels > 0, pooled over the training cases, since a spec applies one fixed ``(x - mean) / std``
(``configs/sam_med3d.yaml``). The per-volume spec here (``mean``/``std`` null) is a description, not a spec
``data.transforms`` applies.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

SAM_MED3D_SPACING_MM = (1.5, 1.5, 1.5)
SAM_MED3D_ROI = (128, 128, 128)


class PreprocessError(ValueError):
    """An input that SAM-Med3D preprocessing cannot handle; the message says why."""


def sam_med3d_preprocess_spec() -> dict:
    """The preprocess spec (docs/interfaces.md) of SAM-Med3D: 1.5 mm, RAS, per-volume foreground z-score."""
    return {
        "spacing_mm": list(SAM_MED3D_SPACING_MM),
        "orientation": "RAS",
        "intensity": {
            "mode": "zscore",
            "hu_min": None,
            "hu_max": None,
            "mean": None,
            "std": None,
            "stats": "per_volume_foreground",
            "foreground_threshold": 0.0,
        },
    }


def zscore_foreground(volume: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Z-score a volume with the mean and std of its voxels above ``threshold`` (float32 result).

    Args:
        volume: intensities, any shape.
        threshold: voxels strictly above it give the statistics (0 in SAM-Med3D).

    Raises:
        PreprocessError: no voxel above the threshold.
    """
    volume = np.asarray(volume, dtype=np.float32)
    fg = volume[volume > threshold]
    if fg.size == 0:
        raise PreprocessError(f"cannot z-score: no voxel above {threshold} in a volume of shape {volume.shape}")
    std = float(fg.std())
    # A constant foreground has no scale; centring alone keeps it finite.
    return (volume - float(fg.mean())) / (std if std > 0 else 1.0)


def crop_or_pad(
    volume: np.ndarray,
    roi: Sequence[int] = SAM_MED3D_ROI,
    center: Optional[Sequence[float]] = None,
    pad_value: float = 0.0,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Cut a ``roi`` window from the last three axes of ``volume``, padding where it leaves the volume.

    Args:
        volume: ``(..., X, Y, Z)``.
        roi: window size.
        center: voxel the window is centred on; None = the volume centre. The window is shifted to stay
            inside the volume where the volume is large enough.
        pad_value: value outside the volume (TorchIO's CropOrPad pads with 0).

    Returns:
        the window ``(..., *roi)`` and its origin (corner voxel, may be negative where padded), which
        ``paste_window`` uses to put a prediction back.
    """
    shape = volume.shape[-3:]
    if center is None:
        center = [s / 2.0 for s in shape]
    origin = []
    for size, r, c in zip(shape, roi, center):
        start = int(round(float(c) - r / 2.0))
        if size >= r:
            start = min(max(start, 0), size - r)
        else:
            start = -((r - size) // 2)
        origin.append(start)
    out = np.full(volume.shape[:-3] + tuple(roi), pad_value, dtype=volume.dtype)
    in_volume, in_window = _overlap(shape, roi, origin)
    out[(..., *in_window)] = volume[(..., *in_volume)]
    return out, tuple(origin)


def paste_window(
    window: np.ndarray, origin: Sequence[int], shape: Sequence[int], fill: float = 0
) -> np.ndarray:
    """Inverse of ``crop_or_pad``: place ``window`` (``(..., *roi)``) at ``origin`` in a ``shape`` array."""
    roi = window.shape[-3:]
    out = np.full(window.shape[:-3] + tuple(shape), fill, dtype=window.dtype)
    in_volume, in_window = _overlap(shape, roi, origin)
    out[(..., *in_volume)] = window[(..., *in_window)]
    return out


def _overlap(shape: Sequence[int], roi: Sequence[int], origin: Sequence[int]) -> tuple[list[slice], list[slice]]:
    """Where a window of size ``roi`` placed at ``origin`` overlaps a volume of ``shape``: the slices of that
    overlap in volume coordinates and in window coordinates."""
    in_volume, in_window = [], []
    for size, r, o in zip(shape, roi, origin):
        lo, hi = max(o, 0), min(o + r, size)
        in_volume.append(slice(lo, hi))
        in_window.append(slice(lo - o, hi - o))
    return in_volume, in_window
