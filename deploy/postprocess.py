"""Keep each organ's largest connected component, for the classes validation says it helps (numpy only).

An organ is one piece, but a small student's argmax is not: at 400 steps SwinUNETR-tiny painted the pancreas in
6-18 separate pieces per validation phantom (most of them over the duodenum, which has the pancreas's HU) and
left islands of liver and spleen elsewhere; the teacher's pancreas was one piece in every case. As nnU-Net
does, the classes to clean are chosen on the validation split (``choose_largest_component``: a class is
cleaned only if its mean validation Dice rises), recorded in the student's checkpoint and the deploy bundle,
and applied the same way in evaluation, the benchmark and deploy (``keep_largest_component``).

It works on the model grid, on logits, so that the deployed path (logits resampled linearly back to the
input's voxels, then the argmax) and evaluation (argmax on the model grid) remove the same pieces: in the
voxels of every piece of class k but the largest, k's logit is pushed below the voxel's lowest, and the voxel
takes its next most likely class (background, in the measured cases).

Connectivity is 26 (face, edge or corner neighbours), so a piece joined diagonally stays. Deploy runs
without scipy (``tests/test_deploy.py``): components are found by min-label propagation over 3 x 3 x 3
neighbourhoods with pointer jumping, restricted to the class's bounding box.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

POSTPROCESS_KEY = "largest_component"


class PostprocessError(ValueError):
    """A postprocessing spec or input that cannot be applied; the message names it."""


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a 3D boolean mask.

    Returns:
        ``(labels, count)``: ``labels`` int64 of the mask's shape, 0 outside the mask and 1..count inside,
        numbered in order of each component's first voxel (C order).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise PostprocessError(f"connected_components needs a 3D mask, got shape {mask.shape}")
    out = np.zeros(mask.shape, dtype=np.int64)
    if not mask.any():
        return out, 0
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))
    sub = mask[box]
    # int32 labels where they fit: half the memory traffic of int64 in the propagation below.
    dtype = np.int32 if sub.size < np.iinfo(np.int32).max else np.int64
    big = dtype(sub.size)
    ids = np.arange(sub.size, dtype=dtype).reshape(sub.shape)
    lab = np.where(sub, ids, big)
    flat_mask = sub.ravel()
    while True:
        # Minimum over each voxel's 3 x 3 x 3 neighbourhood (separable), then back inside the mask.
        m = lab
        for axis in range(3):
            m = _min_with_neighbours(m, axis)
        new = np.where(sub, np.minimum(lab, m), big)
        # Pointer jumping: a voxel takes the label of the voxel its label names (same component, smaller or
        # equal label), which shortens propagation from the component's diameter to about its logarithm.
        for _ in range(2):
            flat = new.ravel()
            jumped = flat[np.minimum(flat, big - 1)]
            new = np.where(flat_mask, np.minimum(flat, jumped), big).reshape(sub.shape)
        if np.array_equal(new, lab):
            break
        lab = new
    roots, inverse = np.unique(lab[sub], return_inverse=True)
    sub_out = np.zeros(sub.shape, dtype=np.int64)
    sub_out[sub] = inverse + 1
    out[box] = sub_out
    return out, int(roots.size)


def _min_with_neighbours(a: np.ndarray, axis: int) -> np.ndarray:
    out = a.copy()
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[axis], hi[axis] = slice(0, -1), slice(1, None)
    if a.shape[axis] > 1:
        np.minimum(out[tuple(lo)], a[tuple(hi)], out=out[tuple(lo)])
        np.minimum(out[tuple(hi)], a[tuple(lo)], out=out[tuple(hi)])
    return out


def keep_largest_component(logits: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """``K x X x Y x Z`` logits in which every piece of each class in ``classes`` but its largest loses its
    class: there the class's logit is set below the voxel's lowest, so the argmax moves to the next class.
    The pieces are those of the raw argmax for every class; a voxel moved into another class by this does not
    join that class's pieces, so the result does not depend on the order of ``classes``.

    Returns a new array when anything changes (the input is never modified), else the input itself.
    """
    logits = np.asarray(logits)
    if logits.ndim != 4:
        raise PostprocessError(f"keep_largest_component needs K x X x Y x Z logits, got shape {logits.shape}")
    classes = check_classes(classes, logits.shape[0])
    if not classes:
        return logits
    labels = np.argmax(logits, axis=0)
    out = logits
    for k in classes:
        components, count = connected_components(labels == k)
        if count < 2:
            continue
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        sizes[0] = 0
        drop = (components > 0) & (components != int(np.argmax(sizes)))
        if out is logits:
            out = logits.copy()
        out[k][drop] = out[:, drop].min(axis=0) - 1.0
    return out


def check_classes(classes: Sequence[int], num_classes: int, source: str = "postprocess") -> list[int]:
    """The class ids as sorted ints; each must be a foreground class (1..K-1)."""
    try:
        ids = sorted({int(c) for c in classes})
    except (TypeError, ValueError) as exc:
        raise PostprocessError(f"{source}: {POSTPROCESS_KEY} must be a list of class ids, got {classes!r}") from exc
    bad = [c for c in ids if not 1 <= c < int(num_classes)]
    if bad:
        raise PostprocessError(f"{source}: {POSTPROCESS_KEY} class ids {bad} are not foreground classes of a "
                               f"{num_classes}-class model (1..{int(num_classes) - 1})")
    return ids


def spec_classes(spec: Mapping | None, num_classes: int, source: str = "postprocess") -> list[int]:
    """The classes a checkpoint's or bundle's ``postprocess`` entry cleans (none when absent)."""
    if not spec:
        return []
    if not isinstance(spec, Mapping) or POSTPROCESS_KEY not in spec:
        raise PostprocessError(f"{source}: postprocess must be a mapping with {POSTPROCESS_KEY!r}, got {spec!r}")
    return check_classes(spec[POSTPROCESS_KEY], num_classes, source)


def class_dice(pred: np.ndarray, ref: np.ndarray, k: int) -> float:
    """Dice of class k; NaN when it is in neither map (the case does not count for that class)."""
    p, r = pred == k, ref == k
    total = int(p.sum()) + int(r.sum())
    return float("nan") if total == 0 else 2.0 * int(np.logical_and(p, r).sum()) / total


def choose_largest_component(logits: Sequence[np.ndarray], refs: Sequence[np.ndarray], num_classes: int,
                             min_gain: float = 0.0) -> dict:
    """The classes whose mean Dice over the given (validation) cases rises when only their largest piece is kept.

    Args:
        logits: ``K x X x Y x Z`` per case.
        refs: ``X x Y x Z`` reference labels per case.
        num_classes: K.
        min_gain: a class is cleaned only if its mean Dice rises by more than this.

    Returns:
        ``{"largest_component": [class ids], "validation": {class id: {"raw": dice, "cleaned": dice}},
        "cases": n}``, the form stored under ``postprocess`` in ``student.pt`` and the bundle's ``model.json``.
    """
    if len(logits) != len(refs) or not logits:
        raise PostprocessError(f"need one reference per case and at least one case, got {len(logits)} logits "
                               f"and {len(refs)} references")
    classes = list(range(1, int(num_classes)))
    raw: dict[int, list[float]] = {k: [] for k in classes}
    cleaned: dict[int, list[float]] = {k: [] for k in classes}
    for lg, ref in zip(logits, refs):
        ref = np.asarray(ref)
        if ref.shape != tuple(np.asarray(lg).shape[1:]):
            raise PostprocessError(f"reference shape {ref.shape} differs from the logits' {np.asarray(lg).shape[1:]}")
        pred = np.argmax(lg, axis=0)
        for k in classes:
            # Each class on its own: the Dice of k when k alone is cleaned.
            raw[k].append(class_dice(pred, ref, k))
            cleaned[k].append(class_dice(np.argmax(keep_largest_component(lg, [k]), axis=0), ref, k))
    chosen, report = [], {}
    for k in classes:
        a, b = _nanmean(raw[k]), _nanmean(cleaned[k])
        report[str(k)] = {"raw": a, "cleaned": b}
        if np.isfinite(a) and np.isfinite(b) and b > a + float(min_gain):
            chosen.append(k)
    return {POSTPROCESS_KEY: chosen, "validation": report, "cases": len(logits)}


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")
