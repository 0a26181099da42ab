"""Crop to the patient's body before the sliding window, as the training preprocessing does.

``data.transforms.load_transforms`` applies MONAI ``CropForegroundd(select_fn=x > threshold_hu,
margin=m, allow_smaller=True)`` after resampling: the bounding box of voxels above the threshold, grown by
``m`` voxels and clipped to the volume. Windows are then placed on that box, and everything outside it is
background. The bundle records the threshold and margin (``crop_foreground``).
"""
from __future__ import annotations

import numpy as np


def body_box(hu: np.ndarray, threshold_hu: float, margin: int) -> tuple[slice, slice, slice]:
    """Bounding box (slices) of voxels above ``threshold_hu``, grown by ``margin`` and clipped.

    Args:
        hu: ``X x Y x Z`` resampled volume in HU.
        threshold_hu: body/air threshold.
        margin: voxels kept around the body.

    Returns:
        three slices; the whole volume when no voxel exceeds the threshold.
    """
    box = mask_box(hu > threshold_hu, margin)
    return box if box is not None else tuple(slice(0, s) for s in hu.shape)


def mask_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Bounding box (slices) of the true voxels of ``mask``, grown by ``margin`` and clipped; ``None`` when
    there is none. The one box of the project: the body crop, the foreground box of the way back to the
    input grid (``deploy.geometry``) and the scoring crop (``benchmarks.accuracy``)."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        present = np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))[0]
        box.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + margin + 1, mask.shape[axis])))
    return tuple(box)


def paste_logits(box_logits: np.ndarray, box: tuple[slice, slice, slice], shape: tuple[int, int, int]) -> np.ndarray:
    """Place ``K x box`` logits into a ``K x shape`` volume that is confidently background elsewhere."""
    full = np.full((box_logits.shape[0], *shape), -1e4, dtype=np.float32)
    full[0] = 0.0
    full[(slice(None), *box)] = box_logits
    return full
