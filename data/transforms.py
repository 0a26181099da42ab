"""MONAI transform chains: deterministic loading/preprocessing (cached) and random training crops.

``load_transforms`` implements the preprocessing spec of docs/interfaces.md: channel-first, RAS, resampled
to ``spacing_mm`` (image trilinear, label nearest), intensity clipped and scaled or z-scored. It then
crops to the body (voxels above air) so that training crops do not land in the air around the patient.
The crop happens on raw HU, before the intensity transform: after a narrow window, fat and air can both
be clipped to the same value.

``random_crop_transforms`` samples ``num_samples`` ROI crops per case. Extra image-like keys (e.g.
``"teacher"``: cached teacher logits ``K x X x Y x Z`` aligned with the output of ``load_transforms``) get
exactly the same crops, flips and rotations as the image and label.

Padding. A body-cropped volume is often smaller than the ROI (a 4 mm phantom is ~52 x 39 voxels in-plane
against a 64 x 64 student ROI), so crops are padded. The image is padded with ``IMAGE_PAD_VALUE`` (0.0),
exactly what every sliding window pads with at inference (``evaluation.sliding_window`` through MONAI's
``cval``, ``deploy.sliding_window``, the native teacher cache): under the HU window 0 is the window floor,
the value air and fat already take around the body, so the models see in training what they see in use.
The label is padded with 0 (background). A teacher target has no honest value there: a zero logit is a
*uniform* distribution over the K classes, not "background", and any invented logit would set the KD term's
scale on voxels the teacher never saw. So ``inside_key`` adds a ``1 x roi`` mask (1 inside the volume, 0 on
padding) that travels with the crop, and the KD loss (``distill.loss.KDLoss``) averages over inside voxels
only; on padding only the label speaks (DiceCE says background). The same mask serves online KD, where the
teacher runs on the padded crop.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import (
    MapTransform,
    ClassesToIndicesd,
    Compose,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from data.checks import DataError

# Voxels above this HU belong to the patient (air is about -1000 HU, lung about -850, fat about -100).
BODY_THRESHOLD_HU = -500.0
BODY_CROP_MARGIN = 4  # voxels kept around the body by load_transforms' crop (keys the teacher cache)
def body_crop_spec() -> dict[str, float | int]:
    """The body crop ``load_transforms`` applies by default, read now (not at import): it keys the teacher
    cache, and deploy bundles carry it so the runtime crops as training did."""
    return {"threshold_hu": float(BODY_THRESHOLD_HU), "margin": int(BODY_CROP_MARGIN)}


# What a padded image voxel holds, in training crops and in every sliding window at inference (see above).
IMAGE_PAD_VALUE = 0.0


def _above_air(x):
    return x > BODY_THRESHOLD_HU


def intensity_transforms(spec: dict, key: str = "image") -> list:
    """The intensity part of a preprocessing spec as MONAI transforms.

    Args:
        spec: preprocessing spec (``spec["intensity"]`` with mode ``"scale"`` or ``"zscore"``).
        key: image key.
    """
    try:
        intensity = spec["intensity"]
        mode, lo, hi = intensity["mode"], float(intensity["hu_min"]), float(intensity["hu_max"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"preprocess spec: invalid 'intensity' section {spec.get('intensity')!r}") from exc
    if mode == "scale":
        return [ScaleIntensityRanged(keys=key, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)]
    if mode == "zscore":
        mean, std = intensity.get("mean"), intensity.get("std")
        if mean is None or std is None or not float(std) > 0:
            raise DataError(f"preprocess spec: zscore needs mean and std > 0, got mean={mean!r} std={std!r}")
        # Identity range mapping with clip = clipping to the window.
        return [ScaleIntensityRanged(keys=key, a_min=lo, a_max=hi, b_min=lo, b_max=hi, clip=True),
                NormalizeIntensityd(keys=key, subtrahend=float(mean), divisor=float(std))]
    raise DataError(f"preprocess spec: intensity mode must be 'scale' or 'zscore', got {mode!r}")


def load_transforms(spec: dict, keys: Sequence[str] = ("image", "label"), crop_margin: int = BODY_CROP_MARGIN) -> Compose:
    """Deterministic loading and preprocessing; this is what dataset caches hold.

    Args:
        spec: preprocessing spec (``spacing_mm``, ``orientation``, ``intensity``).
        keys: file keys to load; the first is the image, a second (if any) is the label.
        crop_margin: voxels kept around the body when cropping.

    Returns:
        A Compose mapping ``{"image": path, "label": path}`` to ``image: 1 x X x Y x Z`` float32 (intensity
        per spec) and ``label: 1 x X x Y x Z`` (class ids), both RAS at ``spacing_mm`` and cropped to the body.
    """
    keys = list(keys)
    if not keys:
        raise DataError("load_transforms: keys must name at least the image key")
    spacing = spec.get("spacing_mm")
    if spacing is None or len(spacing) != 3 or min(float(v) for v in spacing) <= 0:
        raise DataError(f"preprocess spec: spacing_mm must be three positive numbers, got {spacing!r}")
    if spec.get("orientation", "RAS") != "RAS":
        raise DataError(f"preprocess spec: orientation must be 'RAS', got {spec.get('orientation')!r}")
    image_key = keys[0]
    modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)
    return Compose([
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=None),
        Spacingd(keys=keys, pixdim=[float(v) for v in spacing], mode=modes, dtype=np.float32),
        CropForegroundd(keys=keys, source_key=image_key, select_fn=_above_air, margin=crop_margin,
                        allow_smaller=True),
        *intensity_transforms(spec, image_key),
        EnsureTyped(keys=keys, dtype=np.float32),
    ])


# Spatial augmentation of training crops, as in MONAI's SwinUNETR BTCV recipe (flips and 90-degree rotations at
# p = 0.1). CT volumes are reoriented to RAS, so anatomy has one orientation: at p = 0.5 per axis a crop is
# mirrored left-right half the time and the left/right kidneys are told apart only by context (measured on the
# demo teacher: README, "Augmentation").
DEFAULT_FLIP_PROB = 0.1
DEFAULT_ROTATE_PROB = 0.1
# Optional augmentation keys of a teacher:/distill: config section, passed on to random_crop_transforms.
AUGMENT_KEYS = ("affine_prob", "affine_rotate_deg", "affine_scale", "intensity_prob", "intensity_shift", "intensity_scale")


class AddInsideMaskd(MapTransform):
    """Add ``key``: a ``1 x X x Y x Z`` float mask of ones on the grid of ``like_key``, before any padding.

    Padded afterwards with 0 like every other key, it marks which crop voxels lie inside the volume.
    """

    def __init__(self, key: str = "inside", like_key: str = "image") -> None:
        super().__init__(keys=[like_key])
        self.key, self.like_key = key, like_key

    def __call__(self, data):
        d = dict(data)
        shape = tuple(int(s) for s in d[self.like_key].shape[1:])
        d[self.key] = torch.ones((1, *shape), dtype=torch.float32)
        return d


def check_augmentation(roi_size: Sequence[int], flip_prob: float, rotate_prob: float, affine_prob: float = 0.0,
                       affine_rotate_deg: float = 0.0, affine_scale: float = 0.0, intensity_prob: float = 0.0,
                       intensity_shift: float = 0.0, intensity_scale: float = 0.0) -> None:
    """Refuse probabilities outside [0, 1], negative ranges, and a rotated crop whose X and Y differ."""
    def number(value) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float))

    for name, value in (("flip_prob", flip_prob), ("rotate_prob", rotate_prob), ("affine_prob", affine_prob),
                        ("intensity_prob", intensity_prob)):
        if not number(value) or not 0.0 <= value <= 1.0:
            raise DataError(f"{name} must be a probability in [0, 1], got {value!r}")
    for name, value, top in (("affine_rotate_deg", affine_rotate_deg, 180.0), ("affine_scale", affine_scale, 0.9),
                             ("intensity_shift", intensity_shift, 10.0), ("intensity_scale", intensity_scale, 0.9)):
        if not number(value) or not 0.0 <= value <= top:
            raise DataError(f"{name} must be a number in [0, {top}], got {value!r}")
    if rotate_prob > 0 and roi_size[0] != roi_size[1]:
        raise DataError(f"roi_size {list(roi_size)}: X and Y must be equal when crops are rotated in the XY plane "
                        f"(rotate_prob {rotate_prob}; set it to 0 for a non-square crop)")


def random_crop_transforms(roi_size: Sequence[int], num_classes: int, keys: Sequence[str] = ("image", "label"),
                           extra_keys: Sequence[str] = (), num_samples: int = 2,
                           class_balanced: bool = True, flip_prob: float = DEFAULT_FLIP_PROB,
                           rotate_prob: float = DEFAULT_ROTATE_PROB, affine_prob: float = 0.0,
                           affine_rotate_deg: float = 15.0, affine_scale: float = 0.1, intensity_prob: float = 0.0,
                           intensity_shift: float = 0.1, intensity_scale: float = 0.1,
                           inside_key: str | None = None) -> Compose:
    """Random ROI crops with flips, axial rotations and optional affine and intensity jitter.

    Geometric transforms are identical for all keys; intensity jitter touches the image only.

    Args:
        roi_size: crop size [X, Y, Z].
        num_classes: K including background (for class-balanced sampling).
        keys: image and label keys; the label key is the second.
        extra_keys: further image-like keys (``C x X x Y x Z``, aligned with the image) cropped and flipped
            exactly like the image, e.g. cached teacher logits.
        num_samples: crops per case (the transform returns a list of that many dicts).
        class_balanced: sample crop centres equally over classes (small organs such as the pancreas get
            seen); False samples foreground and background centres 1:1.
        flip_prob: probability of a flip, drawn per axis.
        rotate_prob: probability of an axial 90-degree rotation (by 90, 180 or 270 degrees).
        affine_prob: probability of a small affine of the crop (nnU-Net style): an axial rotation uniform in
            ``±affine_rotate_deg`` degrees and a per-axis scale in ``1 ± affine_scale``; image and extra keys
            bilinear, label nearest, edges replicated (``border``) so no artificial air enters the crop.
        intensity_prob: probability of each of an intensity shift (``± intensity_shift``, in units of the
            preprocessed image: 0.1 is 42 HU under the demo window) and scale (``1 ± intensity_scale``).
        inside_key: when given, the crops also carry ``inside_key``: ``1 x roi``, 1 where the voxel lies inside
            the volume, 0 on padding (and where an affine pulls in voxels from outside); see the module docstring.

    Returns:
        A Compose producing a list of ``num_samples`` dicts with tensors of spatial size ``roi_size``.
    """
    keys = list(keys)
    if len(keys) < 2:
        raise DataError(f"random_crop_transforms: keys must be (image, label), got {keys}")
    roi = [int(v) for v in roi_size]
    if len(roi) != 3 or min(roi) < 1:
        raise DataError(f"roi_size must be three positive integers, got {roi_size!r}")
    check_augmentation(roi, flip_prob, rotate_prob, affine_prob, affine_rotate_deg, affine_scale, intensity_prob,
                       intensity_shift, intensity_scale)
    image_key, label_key = keys[0], keys[1]
    all_keys = keys + list(extra_keys) + ([inside_key] if inside_key else [])
    if class_balanced:
        # Indices per class are computed once (cached with the deterministic part), not per sample.
        sampling = [
            ClassesToIndicesd(keys=label_key, num_classes=num_classes, max_samples_per_class=100_000),
            RandCropByLabelClassesd(keys=all_keys, label_key=label_key, spatial_size=roi, num_classes=num_classes,
                                    num_samples=num_samples, indices_key=f"{label_key}_cls_indices", warn=False),
            DeleteItemsd(keys=f"{label_key}_cls_indices"),
        ]
    else:
        sampling = [RandCropByPosNegLabeld(keys=all_keys, label_key=label_key, spatial_size=roi, pos=1, neg=1,
                                           num_samples=num_samples, image_key=image_key)]
    return Compose([
        *([AddInsideMaskd(inside_key, image_key)] if inside_key else []),
        SpatialPadd(keys=all_keys, spatial_size=roi, value=IMAGE_PAD_VALUE),
        *sampling,
        RandFlipd(keys=all_keys, prob=flip_prob, spatial_axis=0),
        RandFlipd(keys=all_keys, prob=flip_prob, spatial_axis=1),
        RandFlipd(keys=all_keys, prob=flip_prob, spatial_axis=2),
        RandRotate90d(keys=all_keys, prob=rotate_prob, max_k=3, spatial_axes=(0, 1)),
        *([RandAffined(keys=all_keys, prob=affine_prob, spatial_size=roi,
                       rotate_range=(0.0, 0.0, float(np.deg2rad(affine_rotate_deg))),
                       scale_range=(affine_scale,) * 3,
                       mode=["nearest" if k in (label_key, inside_key) else "bilinear" for k in all_keys],
                       padding_mode=["zeros" if k == inside_key else "border" for k in all_keys])]
          if affine_prob > 0 else []),
        *([RandShiftIntensityd(keys=image_key, offsets=intensity_shift, prob=intensity_prob),
           RandScaleIntensityd(keys=image_key, factors=intensity_scale, prob=intensity_prob)]
          if intensity_prob > 0 else []),
        EnsureTyped(keys=all_keys, dtype=np.float32),
    ])


def train_transforms(spec: dict, roi_size: Sequence[int], num_classes: int, extra_keys: Sequence[str] = (),
                     num_samples: int = 2, class_balanced: bool = True) -> Compose:
    """Loading (deterministic, cacheable) followed by random crops; extra keys are not loaded from files.

    Args:
        spec: preprocessing spec.
        roi_size: crop size [X, Y, Z].
        num_classes: K including background.
        extra_keys: keys already holding arrays aligned with ``load_transforms`` output (e.g. ``"teacher"``).
        num_samples: crops per case.
        class_balanced: see ``random_crop_transforms``.
    """
    return Compose([
        *load_transforms(spec).transforms,
        *random_crop_transforms(roi_size, num_classes, extra_keys=extra_keys, num_samples=num_samples,
                                class_balanced=class_balanced).transforms,
    ])


def val_transforms(spec: dict, keys: Sequence[str] = ("image", "label")) -> Compose:
    """Validation/inference preprocessing: ``load_transforms`` (whole volumes, no random crops).

    Args:
        spec: preprocessing spec.
        keys: ``("image", "label")``, or ``("image",)`` for unlabelled cases.
    """
    return load_transforms(spec, keys)


def make_dataset(items: Sequence[dict], transforms, cache: str | None = "memory",
                 cache_dir: str | Path | None = None, num_workers: int = 0):
    """Wrap data dicts in a MONAI dataset, caching the deterministic prefix of ``transforms``.

    Args:
        items: data dicts, e.g. ``CTDataset.items(split["train"])``.
        transforms: a Compose (e.g. ``train_transforms(...)``).
        cache: ``"memory"`` (CacheDataset), ``"persistent"`` (PersistentDataset on disk in ``cache_dir``)
            or None (no caching).
        cache_dir: folder for the persistent cache.
        num_workers: threads used to fill the memory cache.
    """
    if cache == "memory":
        return CacheDataset(data=list(items), transform=transforms, cache_rate=1.0, num_workers=num_workers,
                            progress=False)
    if cache == "persistent":
        if cache_dir is None:
            raise DataError("make_dataset: cache='persistent' needs cache_dir")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(data=list(items), transform=transforms, cache_dir=cache_dir)
    if cache is None:
        return Dataset(data=list(items), transform=transforms)
    raise DataError(f"make_dataset: cache must be 'memory', 'persistent' or None, got {cache!r}")
