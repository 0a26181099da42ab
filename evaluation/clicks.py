"""Simulated clicks for interactive segmentation, and the click-by-click evaluation protocol.

The protocol is the field's usual one (RITM, SAM-Med3D, 3DSAM-adapter's interactive mode), made
deterministic:

* the first click is positive, at the voxel of the target farthest from its boundary (the maximum of the
  Euclidean distance transform, in mm, of the target's largest 26-connected component);
* each next click goes to the largest 26-connected error component, false negatives and false positives
  competing by size (voxel count; a tie goes to the false negatives): a positive click where the model
  under-segments, a negative click where it over-segments, at that component's distance-transform maximum.

The distance transform treats everything outside the volume as background, so a component that touches
the volume's edge is not clicked on the edge. Ties between voxels go to the first in C order.

Scores are reported at each requested click count, never as the best over clicks.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

from evaluation.metrics import mask_metrics

SegmentFn = Callable[[Any, np.ndarray, np.ndarray], Any]
Click = tuple[tuple[int, int, int], bool]

# 26-connectivity: voxels touching by a face, an edge or a corner belong to the same component.
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


class ClickError(ValueError):
    """Masks, spacing or click counts that the click simulation cannot use."""


def next_click(
    pred_mask: np.ndarray | torch.Tensor,
    gt_mask: np.ndarray | torch.Tensor,
    spacing_mm: Sequence[float],
) -> Click | None:
    """Where a simulated user clicks next, given the current prediction.

    Args:
        pred_mask: current binary prediction ``X x Y x Z`` (all zeros before the first click).
        gt_mask: binary target ``X x Y x Z``; must not be empty.
        spacing_mm: voxel size in mm per axis, used by the distance transform.

    Returns:
        ``((x, y, z), is_positive)`` or ``None`` when the prediction equals the target.
    """
    pred = _as_mask(pred_mask, "pred_mask")
    gt = _as_mask(gt_mask, "gt_mask")
    if pred.shape != gt.shape:
        raise ClickError(f"pred_mask shape {pred.shape} differs from gt_mask shape {gt.shape}")
    spacing = _check_spacing(spacing_mm)
    if not gt.any():
        raise ClickError("gt_mask is empty: there is no target to click on")
    false_neg, fn_size = _largest_component(gt & ~pred)
    false_pos, fp_size = _largest_component(pred & ~gt)
    if fn_size == 0 and fp_size == 0:
        return None
    positive = fn_size >= fp_size
    component = false_neg if positive else false_pos
    return _deepest_voxel(component, spacing), positive


def click_protocol(
    segment_fn: SegmentFn,
    image: Any,
    gt_mask: np.ndarray | torch.Tensor,
    spacing_mm: Sequence[float],
    n_clicks: Sequence[int] = (1, 3, 5, 10),
    nsd_tolerance_mm: float = 2.0,
) -> dict[str, Any]:
    """Run simulated clicks on one target and score the segmentation after each requested click count.

    Clicks accumulate: after click ``n`` the model sees all ``n`` clicks so far. If the prediction
    becomes perfect, no further click is placed and later counts keep that (perfect) score.

    Args:
        segment_fn: ``segment_fn(image, coords, labels) -> mask`` with ``coords`` an ``N x 3`` int array of
            voxel coordinates (x, y, z), ``labels`` an ``N`` int array (1 positive, 0 negative), and the
            returned mask binary ``X x Y x Z`` (numpy or torch).
        image: passed to ``segment_fn`` unchanged (e.g. a ``1 x X x Y x Z`` tensor).
        gt_mask: binary target ``X x Y x Z``.
        spacing_mm: voxel size in mm per axis.
        n_clicks: click counts at which Dice and NSD are reported; all >= 1.
        nsd_tolerance_mm: NSD tolerance in mm.

    Returns:
        ``{"dice": {n: float}, "nsd": {n: float}, "dice_curve": [Dice after click 1, 2, ..., max],
        "dice_auc": float, "clicks": [((x, y, z), is_positive), ...]}``; ``dice_auc`` is the
        normalised area under the Dice-vs-clicks curve, see :func:`dice_auc`.
    """
    gt = _as_mask(gt_mask, "gt_mask")
    spacing = _check_spacing(spacing_mm)
    counts = sorted({int(n) for n in n_clicks})
    if not counts or counts[0] < 1 or any(int(n) != n for n in n_clicks):
        raise ClickError(f"n_clicks must be positive integers, got {n_clicks!r}")
    if not gt.any():
        raise ClickError("gt_mask is empty: there is no target to click on")

    pred = np.zeros_like(gt)
    clicks: list[Click] = []
    curve: list[float] = []
    dice: dict[int, float] = {}
    nsd: dict[int, float] = {}
    for n in range(1, counts[-1] + 1):
        click = next_click(pred, gt, spacing)
        if click is not None:
            clicks.append(click)
            coords = np.array([c for c, _ in clicks], dtype=np.int64)
            labels = np.array([int(p) for _, p in clicks], dtype=np.int64)
            pred = _as_mask(segment_fn(image, coords, labels), "segment_fn output")
            if pred.shape != gt.shape:
                raise ClickError(f"segment_fn returned shape {pred.shape}, expected the target's {gt.shape}")
        curve.append(_dice(pred, gt))
        if n in counts:
            dice[n] = curve[-1]
            # NSD costs a distance transform: computed only at the reported counts.
            nsd[n] = mask_metrics(pred, gt, spacing, nsd_tolerance_mm, hd95=False)["nsd"]
    return {"dice": dice, "nsd": nsd, "dice_curve": curve, "dice_auc": dice_auc(curve), "clicks": clicks}


def dice_auc(curve: Sequence[float]) -> float:
    """Normalised area under a Dice-vs-clicks curve: trapezoid over clicks ``1..N`` divided by ``N - 1``.

    A curve at Dice 1 from the first click scores 1; a single point scores its own value.

    Args:
        curve: Dice after click 1, 2, ..., N.
    """
    values = [float(v) for v in curve]
    if not values:
        raise ClickError("dice_auc needs at least one value")
    if len(values) == 1:
        return values[0]
    area = sum((a + b) / 2.0 for a, b in zip(values[:-1], values[1:]))
    return area / (len(values) - 1)


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    total = int(pred.sum()) + int(gt.sum())
    return 2.0 * int((pred & gt).sum()) / total if total else math.nan


def _largest_component(mask: np.ndarray) -> tuple[np.ndarray, int]:
    if not mask.any():
        return mask, 0
    components, count = ndimage.label(mask, structure=_CONNECTIVITY_26)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    largest = int(np.argmax(sizes))
    return components == largest, int(sizes[largest])


def _deepest_voxel(component: np.ndarray, spacing: Sequence[float]) -> tuple[int, int, int]:
    # Pad with background so the volume's edge counts as a boundary (a user does not click on it).
    padded = np.pad(component, 1)
    depth = ndimage.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]
    flat = int(np.argmax(depth))
    return tuple(int(i) for i in np.unravel_index(flat, component.shape))  # type: ignore[return-value]


def _as_mask(mask: Any, name: str) -> np.ndarray:
    arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if arr.ndim != 3:
        raise ClickError(f"{name} must be a 3D mask X x Y x Z, got shape {arr.shape}")
    if arr.dtype != bool:
        values = np.unique(arr)
        if not np.isin(values, (0, 1)).all():
            raise ClickError(f"{name} must be binary (0/1), found values {values[:5].tolist()}")
        arr = arr.astype(bool)
    return arr


def _check_spacing(spacing_mm: Sequence[float]) -> list[float]:
    spacing = [float(s) for s in np.ravel(np.asarray(spacing_mm, dtype=float))]
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ClickError(f"spacing_mm must be 3 positive numbers, got {spacing_mm!r}")
    return spacing
