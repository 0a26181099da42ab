"""Dice and NSD of a row's predicted masks against the held-out labels, scored in the harness's own process.

Rows only write their masks: importing the metrics (torch, MONAI) in a row's process would add their
footprint to a deployed row's peak memory and tens of seconds to every row on a small CPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


class AccuracyError(ValueError):
    """A predicted mask that cannot be scored (missing, or a shape other than its label's)."""


def score_masks(pred_paths: Sequence[str | Path], cases: Sequence[Sequence[str]], labels: Mapping[int, str],
                nsd_tolerance_mm: float = 2.0, surface: bool = True) -> dict:
    """Mean foreground Dice and NSD over labelled cases (``evaluation.metrics.summarize``), Dice per case.

    Args:
        pred_paths: one predicted mask (NIfTI) per case, in the order of ``cases``.
        cases: ``(image, label)`` NIfTI paths.
        labels: ``{class id: name}`` including background.
        nsd_tolerance_mm: NSD boundary tolerance (mm).
        surface: also the surface metrics (NSD); ``False``: Dice only, ``nsd`` None (the ct workload: distance
            transforms over a 512 x 512 x 200 mask of a model that marks foreground far from any organ take
            minutes).

    Returns:
        ``{"dice", "nsd": means over every case's foreground classes, "dice_per_case": [...]}``.
    """
    import nibabel as nib

    from evaluation.metrics import case_metrics, summarize

    if len(pred_paths) != len(cases):
        raise AccuracyError(f"{len(pred_paths)} predicted masks for {len(cases)} cases")
    names = {int(k): str(v) for k, v in labels.items()}
    rows, per_case = [], []
    for pred_path, (image_path, label_path) in zip(pred_paths, cases):
        if not Path(pred_path).is_file():
            raise AccuracyError(f"{pred_path}: predicted mask of {image_path} not found")
        # both in canonical (RAS) orientation: the eager path writes its mask there
        pred_img = nib.as_closest_canonical(nib.load(str(pred_path)))
        label_img = nib.as_closest_canonical(nib.load(str(label_path)))
        pred = np.asarray(pred_img.dataobj).astype(np.int64)
        label = np.asarray(label_img.dataobj).astype(np.int64)
        if pred.shape != label.shape:
            raise AccuracyError(f"{pred_path}: predicted mask shape {pred.shape} differs from label {label_path} {label.shape}")
        spacing = [float(s) for s in label_img.header.get_zooms()[:3]]
        pred, label = crop_to_foreground(pred, label)
        case_rows = case_metrics(pred, label, spacing, names, nsd_tolerance_mm) if surface else _dice_rows(pred, label, names)
        per_case.append(float(summarize(case_rows)["mean"]["dice"]))
        rows += [{**r, "case": str(image_path)} for r in case_rows]
    mean = summarize(rows)["mean"]
    return {"dice": float(mean["dice"]), "nsd": float(mean["nsd"]) if surface else None, "dice_per_case": per_case}


def _dice_rows(pred: np.ndarray, label: np.ndarray, names: Mapping[int, str]) -> list[dict]:
    """``case_metrics`` rows with Dice only (NSD, HD95 NaN), by its conventions: NaN where a class is in
    neither map, 0 where it is in one only."""
    rows = []
    for class_id in sorted(k for k in names if k != 0):
        p, t = pred == class_id, label == class_id
        total = int(p.sum()) + int(t.sum())
        dice = float("nan") if total == 0 else 2.0 * int(np.logical_and(p, t).sum()) / total
        rows.append({"class_id": class_id, "class_name": names[class_id], "dice": dice,
                     "nsd": float("nan"), "hd95": float("nan")})
    return rows


def crop_to_foreground(pred: np.ndarray, label: np.ndarray, margin: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Both maps cropped to the box of foreground in either, grown by ``margin`` background voxels.

    The metrics are the same on the crop: Dice counts only foreground, and every surface voxel of either
    map lies inside the box with background around it, so edges and their Euclidean distances do not
    change. On a 512 x 512 x 200 CT it turns minutes of distance transforms into seconds.
    """
    from deploy.body_crop import mask_box

    box = mask_box((pred != 0) | (label != 0), margin)
    return (pred, label) if box is None else (pred[box], label[box])

