"""Gaussian-weighted sliding-window inference with a fixed-shape model, as MONAI's
``sliding_window_inference(mode="gaussian", sigma_scale=0.125, padding_mode="constant", cval=0)``.

Window placement (``_get_scan_interval`` + ``dense_patch_slices``): the interval is
``int(roi * (1 - overlap))`` (the ROI itself when it equals the image size); windows start at multiples of
it and the last one is shifted back to end at the image border. Volumes smaller than the ROI are padded
with zeros (half before, the rest after) and the padding is cropped off the output.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import numpy as np

WindowPredictor = Callable[[np.ndarray], np.ndarray]


def gaussian_importance_map(roi_size: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Separable Gaussian centred on the patch, ``sigma = sigma_scale * roi``, clamped below at its
    minimum (at least 1e-3), as MONAI ``compute_importance_map``.

    Returns:
        float32 ``X x Y x Z`` weights.
    """
    weights = np.ones((), dtype=np.float32)
    for size in roi_size:
        x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)[:size]
        sigma = np.float32(size * sigma_scale)
        g = np.exp(x**2 / (-2 * sigma**2)).astype(np.float32)
        weights = weights[..., None] * g
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


# What a padded voxel holds: training pads its crops with the same value (data.transforms.IMAGE_PAD_VALUE;
# deploy imports nothing of the training code, so the value is repeated here and a test keeps the two equal).
IMAGE_PAD_VALUE = 0.0


def symmetric_pads(spatial: Sequence[int], roi_size: Sequence[int]) -> list[tuple[int, int]]:
    """``(before, after)`` per axis that grows ``spatial`` to at least ``roi_size``, half before and the rest after:
    where training's symmetric ``SpatialPadd`` and the teacher cache put a volume smaller than the ROI."""
    return [(max(int(r) - s, 0) // 2, max(int(r) - s, 0) - max(int(r) - s, 0) // 2) for r, s in zip(roi_size, spatial)]


def window_starts(image_size: int, roi: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis (``image_size >= roi``)."""
    interval = roi if roi == image_size else max(int(roi * (1 - overlap)), 1)
    count = math.ceil(image_size / interval)
    last = next((d for d in range(count) if d * interval + roi >= image_size), None)
    n = last + 1 if last is not None else 1
    return [i * interval - max(i * interval + roi - image_size, 0) for i in range(n)]


def window_count(shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """How many windows :func:`sliding_window_logits` runs on an ``X x Y x Z`` volume (padded up to the ROI)."""
    count = 1
    for s, r in zip(shape, roi_size):
        count *= len(window_starts(max(int(s), int(r)), int(r), overlap))
    return count


def sliding_window_logits(
    image: np.ndarray,
    predictor: WindowPredictor,
    roi_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.25,
    batch_size: int = 1,
    sigma_scale: float = 0.125,
) -> np.ndarray:
    """Blend window logits over a volume.

    Args:
        image: ``C x X x Y x Z`` float32 (model input after preprocessing).
        predictor: maps ``B x C x roi`` float32 to ``B x K x roi`` logits.
        roi_size: the model's fixed window ``[X, Y, Z]``.
        num_classes: K.
        overlap: fraction of the ROI shared by neighbouring windows, in ``[0, 1)``.
        batch_size: windows per predictor call (1 for a static batch-1 model).
        sigma_scale: Gaussian width relative to the ROI.

    Returns:
        ``K x X x Y x Z`` float32 logits.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    roi = [int(r) for r in roi_size]
    spatial = image.shape[1:]
    pads = symmetric_pads(spatial, roi)
    if any(p for pair in pads for p in pair):
        image = np.pad(image, [(0, 0), *pads], mode="constant", constant_values=IMAGE_PAD_VALUE)
    padded = image.shape[1:]
    starts = itertools.product(*[window_starts(s, r, overlap) for s, r in zip(padded, roi)])
    weights = gaussian_importance_map(roi, sigma_scale)
    total = np.zeros((num_classes, *padded), dtype=np.float32)
    norm = np.zeros(padded, dtype=np.float32)
    pending: list[tuple[slice, slice, slice]] = []

    def flush() -> None:
        batch = np.stack([image[(slice(None), *w)] for w in pending]).astype(np.float32, copy=False)
        out = np.asarray(predictor(np.ascontiguousarray(batch)), dtype=np.float32)
        if out.shape != (len(pending), num_classes, *roi):
            raise ValueError(f"model returned {out.shape}, expected {(len(pending), num_classes, *roi)}")
        for w, logits in zip(pending, out):
            total[(slice(None), *w)] += logits * weights
            norm[w] += weights
        pending.clear()

    for start in starts:
        pending.append(tuple(slice(s, s + r) for s, r in zip(start, roi)))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    total /= norm
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, spatial))
    return np.ascontiguousarray(total[(slice(None), *crop)])
