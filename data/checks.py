"""Input checks for CT cases: catch unreadable, misshapen, misaligned or mislabelled files before training.

Header-only checks (existence, readability of the header, dimensionality, shape and affine agreement)
run first for every case, so a dataset with one bad file fails in seconds rather than after the arrays
of all the cases before it have been decompressed. Array checks (label values, non-empty label, finite
intensities, a file that decompresses completely) follow, and with them the plausibility judgement: does the
image look like the CT the model is for (Hounsfield units, a body, enough voxels, orientation)?

The structural rules (what one readable 3D volume is) and the plausibility judgement are the edge runtime's,
imported from ``deploy.volume_io`` and ``deploy.plausibility``: one implementation, so a case the pipeline
trains on is a volume the deployed model segments, and the reverse. They live on the deploy side because deploy
must stay torch-free and must not import the training package; data importing deploy costs nothing (numpy and
nibabel only).
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

import nibabel as nib
import numpy as np

from deploy.errors import ImplausibleInputWarning, InputVolumeError
from deploy.plausibility import Assessment, assess_ct
from deploy.volume_io import check_header, check_voxels

if TYPE_CHECKING:
    from data.dataset import CTDataset


class DataError(ValueError):
    """A dataset file or description that cannot be used; the message names the file and the problem."""


class BadCaseWarning(UserWarning):
    """A case was dropped by ``check_dataset(..., skip_bad=True)``."""


# A case that is kept although it looks unusual (oblique, forced past a refusal): the deploy runtime's warning.
PlausibilityWarning = ImplausibleInputWarning
FORCE_HINT = ("if it is a real CT, check_dataset(..., force=True) keeps it with a warning; "
              "data.skip_bad_cases=true skips it")


def load_header(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI (or any nibabel-readable) image lazily: the header is parsed, the array is not read.

    Args:
        path: image file.

    Raises:
        DataError: the file is missing or its header cannot be parsed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing file")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises several types (ImageFileError, EOFError, OSError, zlib.error)
        raise DataError(f"{path}: unreadable or corrupt image header ({type(exc).__name__}: {exc})") from exc


def spatial_shape(img: nib.spatialimages.SpatialImage, path: str | Path) -> tuple[int, int, int]:
    """The 3D shape of an image, after the header checks the deploy runtime applies (``deploy.volume_io``).

    A NIfTI (1 or 2) of ``X x Y x Z`` or ``X x Y x Z x 1`` voxels of a real number type, no axis of size 0,
    and a finite, invertible affine.

    Raises:
        DataError: naming the file and the problem (2D, several volumes, a 5th axis, empty, complex or RGB
            voxels, NaN or zero spacing, a singular affine, not a NIfTI).
    """
    try:
        return check_header(img, str(path))
    except InputVolumeError as exc:
        raise DataError(str(exc)) from exc


def read_array(img: nib.spatialimages.SpatialImage, path: str | Path, dtype=np.float32) -> np.ndarray:
    """Read the full array as 3D ``dtype`` (dropping singleton trailing axes).

    Raises:
        DataError: the data cannot be decompressed / read completely.
    """
    try:
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as exc:
        raise DataError(f"{path}: unreadable or corrupt image data ({type(exc).__name__}: {exc})") from exc
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    return data


def _check_intensities(data: np.ndarray, path: str | Path) -> None:
    try:
        check_voxels(data, str(path))
    except InputVolumeError as exc:
        raise DataError(str(exc)) from exc


def check_plausible(data: np.ndarray, affine: np.ndarray, path: str | Path, force: bool = False,
                    spacing_mm=None, roi_size=None) -> Assessment:
    """The deploy runtime's judgement (``deploy.plausibility.assess_ct``) on a training or unlabelled image.

    Args:
        data: the image's voxels (HU), finite.
        affine: its affine.
        path: names the file.
        force: keep a refused image, with a ``PlausibilityWarning``.
        spacing_mm, roi_size: the model's spacing and window (RAS), if known: adds the field-of-view checks.

    Returns:
        the assessment; its warnings have been issued as ``PlausibilityWarning``.

    Raises:
        DataError: the image does not look like CT in HU with a body to segment (naming the file and why).
    """
    assessment = assess_ct(data, affine, str(path), spacing_mm=spacing_mm, roi_size=roi_size, force=force)
    if assessment.refused:
        raise DataError(assessment.refusal_message(FORCE_HINT))
    for message in assessment.warning_messages():
        warnings.warn(message, PlausibilityWarning, stacklevel=3)
    return assessment


def check_image(image_path: str | Path, read_arrays: bool = True, force: bool = False, spacing_mm=None,
                roi_size=None) -> dict:
    """Check one image without a label (e.g. an unlabelled ``imagesTs`` case).

    Args:
        image_path: image file.
        read_arrays: also read the voxels (finite intensities, complete file, plausible CT); False checks the
            header only.
        force, spacing_mm, roi_size: see :func:`check_plausible`.

    Returns:
        ``{"shape": (X, Y, Z), "spacing_mm": (sx, sy, sz) in file axis order}``, plus ``"plausibility"``
        (the verdict: ``accept``, ``warn``, ``forced``) when the arrays were read.

    Raises:
        DataError: naming the file and the problem.
    """
    img = load_header(image_path)
    shape = spatial_shape(img, image_path)
    report = {"shape": shape, "spacing_mm": tuple(float(v) for v in img.header.get_zooms()[:3])}
    if read_arrays:
        data = read_array(img, image_path)
        _check_intensities(data, image_path)
        report["plausibility"] = check_plausible(data, img.affine, image_path, force, spacing_mm, roi_size).verdict
    return report


def check_case(image_path: str | Path, label_path: str | Path, labels: Mapping[int, str] | Iterable[int],
               read_arrays: bool = True, affine_atol_mm: float = 1e-2, force: bool = False, spacing_mm=None,
               roi_size=None) -> dict:
    """Check that an image and its label are readable, 3D, aligned, and labelled with declared classes.

    Args:
        image_path: CT image file.
        label_path: label map file.
        labels: declared classes (a ``{id: name}`` mapping or the ids), including background 0.
        read_arrays: also read the voxels (label values, non-empty label, finite intensities, complete
            files, a plausible CT image); False runs the header-only checks.
        affine_atol_mm: largest allowed difference between the image's and the label's affine entries.
        force, spacing_mm, roi_size: see :func:`check_plausible`.

    Returns:
        ``{"shape": (X, Y, Z), "spacing_mm": (...), "classes_present": [ids], "plausibility": verdict}``
        (the last two only when read).

    Raises:
        DataError: naming the file and the problem.
    """
    declared = {int(k) for k in labels}
    image = load_header(image_path)
    label = load_header(label_path)
    image_shape = spatial_shape(image, image_path)
    label_shape = spatial_shape(label, label_path)
    if image_shape != label_shape:
        raise DataError(f"{label_path}: label shape {label_shape} does not match image shape {image_shape} "
                        f"of {image_path}")
    diff = float(np.max(np.abs(np.asarray(image.affine) - np.asarray(label.affine))))
    if diff > affine_atol_mm:
        raise DataError(f"{label_path}: label affine differs from the image affine of {image_path} by {diff:.4g} "
                        f"(> {affine_atol_mm} mm): spacing, orientation or origin do not match")
    report = {"shape": image_shape, "spacing_mm": tuple(float(v) for v in image.header.get_zooms()[:3])}
    if not read_arrays:
        return report
    label_data = read_array(label, label_path, dtype=np.float64)
    if not np.isfinite(label_data).all():
        raise DataError(f"{label_path}: label contains non-finite values")
    values = np.unique(label_data)
    if not np.array_equal(values, np.round(values)):
        raise DataError(f"{label_path}: label contains non-integer values, e.g. {values[values != np.round(values)][:3]}")
    present = sorted(int(v) for v in values)
    undeclared = sorted(set(present) - declared)
    if undeclared:
        raise DataError(f"{label_path}: label values {undeclared} are not declared classes {sorted(declared)}")
    if not any(v != 0 for v in present):
        raise DataError(f"{label_path}: label is empty (background only)")
    image_data = read_array(image, image_path)
    _check_intensities(image_data, image_path)
    report["plausibility"] = check_plausible(image_data, image.affine, image_path, force, spacing_mm, roi_size).verdict
    report["classes_present"] = present
    return report


def check_dataset(dataset: "CTDataset", skip_bad: bool = False, read_arrays: bool = True,
                  affine_atol_mm: float = 1e-2, force: bool = False, spacing_mm=None, roi_size=None) -> "CTDataset":
    """Check every case of a dataset: header-only checks for all cases first, then array checks.

    The array checks include the deploy runtime's plausibility judgement on every image, labelled or not
    (``deploy.plausibility``): not CT in HU, no body, fewer than 4 voxels along an axis are bad cases like
    any other; unusual but usable images (oblique) are kept with a ``PlausibilityWarning``.

    Args:
        dataset: from ``data.dataset.load_dataset``.
        skip_bad: warn (``BadCaseWarning``) and drop bad cases instead of raising.
        read_arrays: run the array checks as well as the header checks.
        affine_atol_mm: see ``check_case``.
        force: keep images the plausibility judgement refuses, with a ``PlausibilityWarning``.
        spacing_mm, roi_size: the model's spacing and window, if known: adds the field-of-view checks.

    Returns:
        The dataset, without the bad cases when ``skip_bad`` (a new object; the input is not modified).

    Raises:
        DataError: the first bad case (``skip_bad=False``), or no labelled case left.
    """
    bad: dict[str, str] = {}

    def run(case_id: str, fn, *args, **kwargs) -> None:
        if case_id in bad:
            return
        try:
            fn(*args, **kwargs)
        except DataError as exc:
            if not skip_bad:
                raise
            bad[case_id] = str(exc)
            warnings.warn(f"skipping case {case_id}: {exc}", BadCaseWarning, stacklevel=3)

    passes = (False, True) if read_arrays else (False,)
    for deep in passes:
        for case in dataset.training:
            run(case["case_id"], check_case, case["image"], case["label"], dataset.labels, read_arrays=deep,
                affine_atol_mm=affine_atol_mm, force=force, spacing_mm=spacing_mm, roi_size=roi_size)
        for case in dataset.test:
            run(case["case_id"], check_image, case["image"], read_arrays=deep, force=force, spacing_mm=spacing_mm,
                roi_size=roi_size)
    training = [c for c in dataset.training if c["case_id"] not in bad]
    test = [c for c in dataset.test if c["case_id"] not in bad]
    if not training:
        raise DataError(f"{dataset.root}: no usable labelled case left after checks "
                        f"({len(bad)} bad: {'; '.join(bad.values())[:500]})")
    return replace(dataset, training=training, test=test)
