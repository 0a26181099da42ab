"""Segmentation accuracy per class: Dice, normalised surface Dice (NSD) and HD95, with voxel spacing.

The distances come from MONAI (``get_edge_surface_distance``, once for both the NSD and HD95, with the formulas
of ``compute_surface_dice`` and ``compute_hausdorff_distance``), with the voxel spacing passed through, so NSD
tolerances and HD95 are in millimetres. What MONAI leaves open is what a class that is missing from the
prediction or the reference scores; the conventions (those of BTCV and nnU-Net evaluation) are:

================================  ======  =====  ==============================================
reference / prediction            Dice    NSD    HD95
================================  ======  =====  ==============================================
both present                      value   value  value (mm)
both empty                        NaN     NaN    NaN   (excluded from every mean)
present in only one of them       0.0     0.0    the volume's diagonal in mm (the worst distance
                                                 the volume allows; finite so the mean counts it)
================================  ======  =====  ==============================================
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.metrics.utils import get_edge_surface_distance

METRIC_NAMES = ("dice", "nsd", "hd95")


class MetricInputError(ValueError):
    """Masks, spacing or label mappings that cannot be scored; the message names the problem."""


def case_metrics(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    spacing_mm: Sequence[float],
    labels: Mapping[int, str],
    nsd_tolerance_mm: float = 2.0,
) -> list[dict[str, Any]]:
    """Dice, NSD and HD95 of every foreground class of one case.

    Args:
        pred: predicted integer label map ``X x Y x Z`` (numpy or torch).
        label: reference integer label map ``X x Y x Z``, same shape and grid as ``pred``.
        spacing_mm: voxel size ``[sx, sy, sz]`` in mm, in the arrays' axis order.
        labels: ``{class_id: name}`` including ``0: "background"``; every id except 0 is scored.
        nsd_tolerance_mm: boundary tolerance of the NSD in mm.

    Returns:
        One row per foreground class in ascending id order:
        ``{"class_id", "class_name", "dice", "nsd", "hd95"}`` (HD95 in mm). Missing classes follow the
        conventions in the module docstring (NaN when absent from both maps).
    """
    pred_np = _as_label_map(pred, "pred")
    label_np = _as_label_map(label, "label")
    if pred_np.shape != label_np.shape:
        raise MetricInputError(f"pred shape {pred_np.shape} differs from label shape {label_np.shape}")
    spacing = _check_spacing(spacing_mm, pred_np.ndim)
    names = _check_labels(labels)
    class_ids = sorted(names)
    for name, arr in (("pred", pred_np), ("label", label_np)):
        unknown = sorted(set(np.unique(arr).tolist()) - set(class_ids) - {0})
        if unknown:
            raise MetricInputError(f"{name} holds class ids {unknown} that are not in labels {dict(labels)}")
    rows = []
    for cid in class_ids:
        if cid == 0:
            continue
        scores = mask_metrics(pred_np == cid, label_np == cid, spacing, nsd_tolerance_mm)
        rows.append({"class_id": cid, "class_name": names[cid], **scores})
    return rows


def mask_metrics(
    pred_mask: np.ndarray | torch.Tensor,
    gt_mask: np.ndarray | torch.Tensor,
    spacing_mm: Sequence[float],
    nsd_tolerance_mm: float = 2.0,
    hd95: bool = True,
) -> dict[str, float]:
    """Dice, NSD and (optionally) HD95 of one binary mask against its reference.

    Args:
        pred_mask: predicted binary mask ``X x Y x Z`` (bool or 0/1).
        gt_mask: reference binary mask, same shape.
        spacing_mm: voxel size in mm per axis.
        nsd_tolerance_mm: boundary tolerance of the NSD in mm.
        hd95: compute HD95 too (the costliest of the three); ``False`` leaves it out of the result.

    Returns:
        ``{"dice", "nsd", "hd95"}`` (``"hd95"`` only when requested), following the empty-mask conventions
        of the module docstring.
    """
    p = _as_binary(pred_mask, "pred_mask")
    g = _as_binary(gt_mask, "gt_mask")
    if p.shape != g.shape:
        raise MetricInputError(f"pred_mask shape {p.shape} differs from gt_mask shape {g.shape}")
    spacing = _check_spacing(spacing_mm, p.ndim)
    if not (math.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise MetricInputError(f"nsd_tolerance_mm must be a finite number >= 0, got {nsd_tolerance_mm}")
    p_any, g_any = bool(p.any()), bool(g.any())
    out: dict[str, float]
    if not p_any and not g_any:
        out = {"dice": math.nan, "nsd": math.nan, "hd95": math.nan}
    elif p_any != g_any:
        diagonal = float(np.linalg.norm(np.asarray(p.shape) * np.asarray(spacing)))
        out = {"dice": 0.0, "nsd": 0.0, "hd95": diagonal}
    else:
        # Surface distances only involve voxels of the two masks: crop to their joint bounding box plus
        # one background voxel (so boundary voxels stay boundary voxels). Exact, and far cheaper for
        # small organs in a large CT.
        p, g = _crop_to_union(p, g)
        yp = torch.from_numpy(p)[None, None].float()
        yg = torch.from_numpy(g)[None, None].float()
        with warnings.catch_warnings():
            # MONAI 1.5+ warns about its own internal use of a deprecated argument on every call.
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            dice = compute_dice(yp, yg, include_background=True, ignore_empty=False, num_classes=1)
            # NSD and HD95 from one pass over the two surfaces: MONAI's compute_surface_dice and
            # compute_hausdorff_distance each find the same edges and the same symmetric distances (half the
            # time of scoring went to doing it twice); the formulas below are theirs (tests compare them).
            _, (to_gt, to_pred), _ = get_edge_surface_distance(yp[0, 0], yg[0, 0], spacing=spacing, symmetric=True)
            tol = float(nsd_tolerance_mm)
            nsd = (torch.sum(to_gt <= tol) + torch.sum(to_pred <= tol)) / (len(to_gt) + len(to_pred))
            out = {"dice": float(dice.item()), "nsd": float(nsd.item()), "hd95": math.nan}
            if hd95:
                out["hd95"] = float(torch.max(torch.quantile(to_gt, 0.95), torch.quantile(to_pred, 0.95)).item())
    if not hd95:
        out.pop("hd95")
    return out


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-class means over cases and the mean over foreground classes.

    NaN entries (a class absent from both maps of a case) are left out of the per-class means; the
    overall mean is the mean of the per-class means over the classes that have one, so every organ weighs
    the same whatever its size or frequency.

    Args:
        rows: rows of :func:`case_metrics` from one or more cases, concatenated; a ``"case"`` key, when
            present, identifies the case (otherwise each case is taken to contribute one row per class).

    Returns:
        ``{"per_class": {name: {"dice", "nsd", "hd95"}}, "mean": {"dice", "nsd", "hd95"}, "cases": n}``,
        classes in ascending id order.
    """
    if not rows:
        raise MetricInputError("summarize() needs at least one row")
    by_class: dict[tuple[int, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for i, row in enumerate(rows):
        missing = [k for k in ("class_id", "class_name", *METRIC_NAMES) if k not in row]
        if missing:
            raise MetricInputError(f"row {i} lacks keys {missing}: {dict(row)}")
        for metric in METRIC_NAMES:
            by_class[(int(row["class_id"]), str(row["class_name"]))][metric].append(float(row[metric]))
    per_class = {
        name: {metric: _nanmean(values[metric]) for metric in METRIC_NAMES}
        for (_, name), values in sorted(by_class.items())
    }
    mean = {metric: _nanmean([scores[metric] for scores in per_class.values()]) for metric in METRIC_NAMES}
    if all("case" in row for row in rows):
        cases = len({row["case"] for row in rows})
    else:
        cases = max(len(values["dice"]) for values in by_class.values())
    return {"per_class": per_class, "mean": mean, "cases": cases}


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else math.nan


def _as_label_map(arr: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    out = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    if out.ndim != 3:
        raise MetricInputError(f"{name} must be a 3D label map X x Y x Z, got shape {out.shape}")
    if out.dtype.kind == "f":
        if not np.all(np.equal(np.mod(out, 1), 0)):
            raise MetricInputError(f"{name} holds non-integer values; pass a label map, not logits")
        out = out.astype(np.int64)
    elif out.dtype.kind not in "iub":
        raise MetricInputError(f"{name} has dtype {out.dtype}; expected an integer label map")
    return out


def _as_binary(arr: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    out = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    if out.ndim != 3:
        raise MetricInputError(f"{name} must be a 3D mask X x Y x Z, got shape {out.shape}")
    if out.dtype != bool:
        values = np.unique(out)
        if not np.isin(values, (0, 1)).all():
            raise MetricInputError(f"{name} must be binary (0/1), found values {values[:5].tolist()}")
        out = out.astype(bool)
    return out


def _check_spacing(spacing_mm: Sequence[float], ndim: int) -> list[float]:
    spacing = [float(s) for s in np.ravel(np.asarray(spacing_mm, dtype=float))]
    if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise MetricInputError(f"spacing_mm must be {ndim} positive numbers, got {spacing_mm!r}")
    return spacing


def _check_labels(labels: Mapping[int, str]) -> dict[int, str]:
    # Keys may arrive as strings from JSON ("1": "liver").
    try:
        names = {int(k): str(v) for k, v in labels.items()}
    except (TypeError, ValueError, AttributeError) as exc:
        raise MetricInputError(f"labels must map integer class ids to names, got {labels!r}") from exc
    if any(i < 0 for i in names) or not any(i > 0 for i in names):
        raise MetricInputError(f"labels must map ids >= 0 to names and hold a foreground class, got {labels!r}")
    return names


def _crop_to_union(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    coords = np.argwhere(p | g)
    lo = coords.min(axis=0)
    hi = coords.max(axis=0) + 1
    slices = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    pad = [(1, 1)] * p.ndim
    return np.pad(p[slices], pad), np.pad(g[slices], pad)
