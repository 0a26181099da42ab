"""The intensity transform of the preprocessing spec (docs/interfaces.md), in numpy."""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from deploy.errors import BundleError


def check_intensity(spec: Mapping[str, Any], where: str = "preprocess") -> dict[str, Any]:
    """Validate ``spec["intensity"]``; return it with floats.

    Args:
        spec: the preprocessing spec.
        where: names the source (file) in error messages.
    """
    intensity = spec.get("intensity") if isinstance(spec, Mapping) else None
    if not isinstance(intensity, Mapping) or intensity.get("mode") not in ("scale", "zscore"):
        raise BundleError(f"{where}: intensity must be a mapping with mode 'scale' or 'zscore', got {intensity!r}")
    try:
        hu_min, hu_max = float(intensity["hu_min"]), float(intensity["hu_max"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{where}: intensity needs numeric hu_min and hu_max, got {dict(intensity)}") from exc
    if not hu_min < hu_max:
        raise BundleError(f"{where}: intensity hu_min ({hu_min}) must be below hu_max ({hu_max})")
    out = {"mode": intensity["mode"], "hu_min": hu_min, "hu_max": hu_max, "mean": None, "std": None}
    if intensity["mode"] == "zscore":
        try:
            out["mean"], out["std"] = float(intensity["mean"]), float(intensity["std"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where}: intensity mode 'zscore' needs numeric mean and std, got {dict(intensity)}") from exc
        if not (math.isfinite(out["std"]) and out["std"] > 0):
            raise BundleError(f"{where}: intensity std must be positive, got {out['std']}")
    return out


def apply_intensity(image: np.ndarray, intensity: Mapping[str, Any]) -> np.ndarray:
    """Clip HU to ``[hu_min, hu_max]``, then map to ``[0, 1]`` (``scale``) or standardise (``zscore``).

    Args:
        image: float array in Hounsfield units (any shape).
        intensity: a checked ``intensity`` section (:func:`check_intensity`).

    Returns:
        float32 array of the same shape.
    """
    lo, hi = intensity["hu_min"], intensity["hu_max"]
    clipped = np.clip(image.astype(np.float32, copy=False), lo, hi)
    if intensity["mode"] == "scale":
        return ((clipped - lo) / (hi - lo)).astype(np.float32, copy=False)
    return ((clipped - intensity["mean"]) / intensity["std"]).astype(np.float32, copy=False)
