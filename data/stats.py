"""Intensity statistics of the training cases, and the preprocessing spec built from them.

Two normalisations from statistics (``preprocess.intensity``):

- ``percentile`` (nnU-Net's CT normalisation): statistics over foreground (label > 0) voxels only; the
  0.5 / 99.5 percentiles give the clipping window and the mean / std the z-score. Percentiles come from a
  bounded random sample of voxels per case (memory stays bounded on large datasets); mean and std are exact.
- ``zscore`` (SAM-Med3D's normalisation): mean / std over the image voxels above 0 HU (soft tissue and
  bone; air and fat left out), no label needed, no HU window (the spec's clip bounds are the training
  images' own minimum and maximum, so clipping changes no training voxel). SAM-Med3D takes these
  statistics per volume; here they are pooled over the training cases, because the preprocessing spec is
  shared by the teacher, the students and the torch-free deployment runtime, which apply one fixed
  ``(x - mean) / std``. Within one CT protocol the per-volume values differ little.

Results are cached as JSON keyed by the case list and the files' sizes and modification times.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from configs import config_hash
from configs.schema import PreprocessConfig
from data.atomic import write_json_atomic
from data.checks import DataError, load_header, read_array
from data.dataset import CTDataset

STATS_VERSION = 1
# SAM-Med3D z-scores with the statistics of the voxels strictly above this value (HU for CT).
ZSCORE_THRESHOLD_HU = 0.0


def ras_spacing(affine: np.ndarray, zooms: Sequence[float]) -> list[float]:
    """Voxel spacing in RAS axis order (x, y, z) for an image whose voxel axes may be permuted/flipped.

    Args:
        affine: 4x4 voxel-to-world matrix.
        zooms: voxel sizes in file axis order.
    """
    ornt = nib.orientations.io_orientation(affine)
    spacing = [0.0, 0.0, 0.0]
    for axis, (world_axis, _) in enumerate(ornt[:3]):
        spacing[int(world_axis)] = float(zooms[axis])
    return spacing


def _cache_key(dataset: CTDataset, case_ids: Sequence[str], samples_per_case: int) -> str:
    items = dataset.items(sorted(case_ids))
    files = []
    for item in items:
        for k in ("image", "label"):
            st = Path(item[k]).stat() if Path(item[k]).exists() else None
            files.append([item[k], st.st_size if st else None, st.st_mtime_ns if st else None])
    return config_hash({"version": STATS_VERSION, "cases": sorted(case_ids), "files": files,
                        "samples_per_case": samples_per_case})


def _cached_stats(cache_path: str | Path | None, key: str) -> dict | None:
    """Statistics cached at ``cache_path`` under the same ``key``, else None (absent, torn or stale file)."""
    if cache_path is None or not Path(cache_path).is_file():
        return None
    try:
        cached = json.loads(Path(cache_path).read_text())
    except json.JSONDecodeError:
        return None
    return cached if isinstance(cached, dict) and cached.get("key") == key else None


def compute_intensity_stats(dataset: CTDataset, case_ids: Sequence[str], cache_path: str | Path | None,
                            max_samples: int = 1_000_000, seed: int = 0) -> dict:
    """Foreground intensity statistics and median spacing over ``case_ids``.

    Args:
        dataset: the dataset.
        case_ids: training cases to use (never validation cases, or the window leaks).
        cache_path: JSON cache; reused when its key (case list, file sizes/times) matches. None disables it.
        max_samples: total foreground voxels sampled for the percentiles (split evenly over cases).
        seed: sampling seed.

    Returns:
        ``{"p0.5", "p99.5", "mean", "std", "min", "max", "median_spacing_mm": [x, y, z] (RAS order),
        "foreground_voxels", "sampled_voxels", "num_cases", "case_ids", "key"}``.

    Raises:
        DataError: no case ids, unreadable files, or no foreground voxel at all.
    """
    if not case_ids:
        raise DataError(f"{dataset.root}: intensity statistics need at least one case")
    per_case = max(1, int(math.ceil(max_samples / len(case_ids))))
    key = _cache_key(dataset, case_ids, per_case)
    cached = _cached_stats(cache_path, key)
    if cached is not None:
        return cached
    rng = np.random.default_rng(seed)
    samples = []
    total, total_sum, total_sq = 0, 0.0, 0.0
    lo, hi = math.inf, -math.inf
    spacings = []
    for item in dataset.items(sorted(case_ids)):
        image = load_header(item["image"])
        label = load_header(item["label"])
        spacings.append(ras_spacing(image.affine, image.header.get_zooms()[:3]))
        values = read_array(image, item["image"])[read_array(label, item["label"], dtype=np.float32) > 0]
        if values.size == 0:
            continue
        values = values.astype(np.float64)
        total += values.size
        total_sum += float(values.sum())
        total_sq += float(np.square(values).sum())
        lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
        if values.size > per_case:
            values = values[rng.choice(values.size, per_case, replace=False)]
        samples.append(values)
    if total == 0:
        raise DataError(f"{dataset.root}: no foreground voxels in cases {list(case_ids)[:5]}")
    sampled = np.concatenate(samples)
    mean, std = _mean_std(total, total_sum, total_sq)
    return _save_stats({
        "p0.5": float(np.percentile(sampled, 0.5)),
        "p99.5": float(np.percentile(sampled, 99.5)),
        "mean": mean,
        "std": std,
        "min": lo,
        "max": hi,
        "foreground_voxels": int(total),
        "sampled_voxels": int(sampled.size),
    }, spacings, case_ids, key, cache_path)


def _mean_std(count: int, total: float, total_sq: float) -> tuple[float, float]:
    """Mean and (population) standard deviation from a count, a sum and a sum of squares."""
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean * mean, 0.0))


def _save_stats(stats: dict, spacings: Sequence, case_ids: Sequence[str], key: str,
                cache_path: str | Path | None) -> dict:
    """Add what every statistics record holds (median RAS spacing, the cases, the cache key) and cache it."""
    stats = {**stats, "median_spacing_mm": [float(v) for v in np.median(np.asarray(spacings), axis=0)],
             "num_cases": len(case_ids), "case_ids": sorted(case_ids), "key": key}
    if cache_path is not None:
        write_json_atomic(cache_path, stats)
    return stats


def compute_zscore_stats(dataset: CTDataset, case_ids: Sequence[str], cache_path: str | Path | None,
                         threshold: float = ZSCORE_THRESHOLD_HU) -> dict:
    """Mean and std of the image voxels above ``threshold`` over ``case_ids`` (SAM-Med3D's z-score statistics).

    Args:
        dataset: the dataset.
        case_ids: training cases to use (never validation cases).
        cache_path: JSON cache; reused when its key (case list, file sizes/times, threshold) matches. None
            disables it.
        threshold: voxels strictly above it count (0 HU).

    Returns:
        ``{"mean", "std", "image_min", "image_max", "threshold", "median_spacing_mm": [x, y, z] (RAS order),
        "counted_voxels", "num_cases", "case_ids", "key"}``; ``image_min``/``image_max`` over all voxels.

    Raises:
        DataError: no case ids, unreadable files, or no voxel above the threshold.
    """
    if not case_ids:
        raise DataError(f"{dataset.root}: intensity statistics need at least one case")
    key = config_hash({"kind": "zscore", "threshold": float(threshold), "files": _cache_key(dataset, case_ids, 0)})
    cached = _cached_stats(cache_path, key)
    if cached is not None:
        return cached
    total, total_sum, total_sq = 0, 0.0, 0.0
    lo, hi = math.inf, -math.inf
    spacings = []
    for item in dataset.items(sorted(case_ids)):
        image = load_header(item["image"])
        spacings.append(ras_spacing(image.affine, image.header.get_zooms()[:3]))
        array = read_array(image, item["image"])
        lo, hi = min(lo, float(array.min())), max(hi, float(array.max()))
        values = array[array > threshold].astype(np.float64)
        total += values.size
        total_sum += float(values.sum())
        total_sq += float(np.square(values).sum())
    if total == 0:
        raise DataError(f"{dataset.root}: no voxel above {threshold} in cases {list(case_ids)[:5]}")
    mean, std = _mean_std(total, total_sum, total_sq)
    return _save_stats({
        "mean": mean,
        "std": std,
        "image_min": lo,
        "image_max": hi,
        "threshold": float(threshold),
        "counted_voxels": int(total),
    }, spacings, case_ids, key, cache_path)


def preprocess_spec(cfg_preprocess: dict, stats: dict | None = None) -> dict:
    """Build the preprocessing spec of docs/interfaces.md from a config's ``preprocess`` section.

    Args:
        cfg_preprocess: ``{"spacing_mm": [x, y, z] | "median" | null, "orientation": "RAS",
            "intensity": "window" | "percentile" | "zscore", "hu_window": [min, max]}``.
        stats: from ``compute_intensity_stats`` (``percentile``) or ``compute_zscore_stats`` (``zscore``);
            required for those two modes and for a median spacing.

    Returns:
        ``{"spacing_mm": [...], "orientation": "RAS", "intensity": {"mode", "hu_min", "hu_max", "mean", "std"}}``.

    Raises:
        DataError: invalid or missing keys, naming the key and value.
    """
    orientation = cfg_preprocess.get("orientation", PreprocessConfig.orientation)
    if orientation != "RAS":
        raise DataError(f"preprocess.orientation: only 'RAS' is supported, got {orientation!r}")
    spacing = cfg_preprocess.get("spacing_mm")
    if spacing in (None, "median"):
        if stats is None:
            raise DataError("preprocess.spacing_mm: 'median' needs intensity statistics (median_spacing_mm)")
        spacing = stats["median_spacing_mm"]
    try:
        spacing = [float(v) for v in spacing]
    except (TypeError, ValueError) as exc:
        raise DataError(f"preprocess.spacing_mm: expected three numbers, got {spacing!r}") from exc
    if len(spacing) != 3 or min(spacing) <= 0:
        raise DataError(f"preprocess.spacing_mm: expected three positive numbers, got {spacing!r}")
    mode = cfg_preprocess.get("intensity", PreprocessConfig.intensity)
    if mode == "window":
        window = cfg_preprocess.get("hu_window")
        try:
            hu_min, hu_max = (float(v) for v in window)
        except (TypeError, ValueError) as exc:
            raise DataError(f"preprocess.hu_window: expected [min, max], got {window!r}") from exc
        intensity = {"mode": "scale", "hu_min": hu_min, "hu_max": hu_max, "mean": None, "std": None}
    elif mode == "percentile":
        if stats is None:
            raise DataError("preprocess.intensity: 'percentile' needs intensity statistics of the training cases")
        intensity = {"mode": "zscore", "hu_min": float(stats["p0.5"]), "hu_max": float(stats["p99.5"]),
                     "mean": float(stats["mean"]), "std": float(stats["std"])}
        if not intensity["std"] > 0:
            raise DataError(f"intensity statistics: foreground std must be > 0, got {intensity['std']}")
    elif mode == "zscore":
        if stats is None or "image_min" not in stats:
            raise DataError("preprocess.intensity: 'zscore' needs the statistics of compute_zscore_stats")
        intensity = {"mode": "zscore", "hu_min": float(stats["image_min"]), "hu_max": float(stats["image_max"]),
                     "mean": float(stats["mean"]), "std": float(stats["std"])}
        if not intensity["std"] > 0:
            raise DataError(f"intensity statistics: std above {stats.get('threshold')} HU must be > 0, got {intensity['std']}")
    else:
        raise DataError(f"preprocess.intensity: expected 'window', 'percentile' or 'zscore', got {mode!r}")
    if not intensity["hu_min"] < intensity["hu_max"]:
        raise DataError(f"preprocess intensity window must have min < max, got "
                        f"[{intensity['hu_min']}, {intensity['hu_max']}]")
    return {"spacing_mm": spacing, "orientation": "RAS", "intensity": intensity}
