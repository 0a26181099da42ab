"""Preprocessed ROI crops for calibration, parity and INT8 validation, drawn from a dataset on disk.

Crops go through the training preprocessing (``data.transforms.load_transforms``), so the INT8
quantiser sees the intensity distribution the model will see in deployment.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from deploy.sliding_window import IMAGE_PAD_VALUE, symmetric_pads
from export.errors import ExportError


def foreground_crop(image: np.ndarray, label: np.ndarray | None, roi_size: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """One ``C x roi`` crop (zero-padded where the volume is smaller), centred on a random labelled voxel.

    A volume smaller than the ROI is padded on both sides, half before (``(roi - size) // 2``) and the rest after,
    as training (MONAI's symmetric ``SpatialPadd``), the teacher cache and deploy's sliding window pad it: the
    students learn where the body sits in the padded window. Padded at the end only, the demo's KD student scored
    0.23 foreground Dice on a validation crop against 0.80 on the same crop padded as in training, so NNCF's INT8
    accuracy check compared two models on inputs neither was meant for (FP32 0.179 on its 4 crops, a 0.014 "drop"
    over the 0.01 bound, and 3 minutes of ranking quantizers on an AVX2-only CPU; docs/measurements.md).

    Args:
        image: ``C x X x Y x Z``.
        label: ``X x Y x Z`` class ids or ``None`` (then the centre is random).
        roi_size: ``[X, Y, Z]``.
        rng: random generator (crops are reproducible from its seed).
    """
    roi = [int(r) for r in roi_size]
    spatial = image.shape[1:]
    pad = symmetric_pads(spatial, roi)
    image = np.pad(image, [(0, 0), *pad], constant_values=IMAGE_PAD_VALUE)
    if label is not None:
        label = np.pad(label, pad)
    fg = np.argwhere(label > 0) if label is not None else np.empty((0, 3))
    centre = fg[rng.integers(len(fg))] if len(fg) else np.array([rng.integers(s) for s in image.shape[1:]])
    start = [int(np.clip(c - r // 2, 0, s - r)) for c, r, s in zip(centre, roi, image.shape[1:])]
    window = tuple(slice(a, a + r) for a, r in zip(start, roi))
    return image[(slice(None), *window)].astype(np.float32), None if label is None else label[window].astype(np.int64)


def dataset_crops(dataset_dir: str | Path, preprocess: Mapping[str, Any], roi_size: Sequence[int], count: int,
                  seed: int = 0, max_cases: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` labelled crops ``(C x roi image, roi label)`` from an MSD / nnU-Net dataset folder.

    Args:
        dataset_dir: folder with ``dataset.json``.
        preprocess: the student's preprocessing spec.
        roi_size: the student's ROI.
        count: number of crops (spread round-robin over the cases).
        seed: crop placement seed.
        max_cases: cases loaded at most (each is resampled in full; keeps export affordable).
    """
    from data.dataset import load_dataset

    try:
        dataset = load_dataset(dataset_dir)
    except ValueError as exc:
        raise ExportError(f"calibration data {dataset_dir}: {exc}") from exc
    return case_crops(dataset.items(), preprocess, roi_size, count, seed=seed, max_cases=max_cases)


def case_crops(cases: Sequence[Mapping[str, Any]], preprocess: Mapping[str, Any], roi_size: Sequence[int], count: int,
               seed: int = 0, max_cases: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` labelled crops from given cases (``{"image": path, "label": path}``), e.g. one split's.

    The pipeline calibrates on training cases and checks INT8 on validation cases, so that the test cases the
    report scores are never seen by export. Arguments as :func:`dataset_crops`.
    """
    from data.transforms import load_transforms

    items = [c for c in cases if c.get("label")][: max(int(max_cases), 1)]
    if not items:
        raise ExportError("calibration cases: none of the given cases has a label")
    transform = load_transforms(dict(preprocess))
    rng = np.random.default_rng(seed)
    volumes = []
    for item in items:
        data = transform({"image": str(item["image"]), "label": str(item["label"])})
        volumes.append((np.asarray(data["image"], np.float32), np.asarray(data["label"], np.float32)[0].round().astype(np.int64)))
    return [foreground_crop(*volumes[i % len(volumes)], roi_size, rng) for i in range(int(count))]
