"""Reading a CT NIfTI for segmentation (with the checks an edge device needs) and writing the mask."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from deploy.files import atomic_path, write_json
from deploy.errors import InputVolumeError


NIFTI_TYPES = (nib.Nifti1Image, nib.Nifti2Image)
# Well-conditioned enough to invert: the smallest singular value of the affine's 3x3 part over the largest.
MIN_AFFINE_CONDITION = 1e-6


def spatial_dims(shape: Sequence[int], source: str = "input") -> tuple[int, int, int]:
    """The 3D shape of a volume: ``X x Y x Z``, or ``X x Y x Z x 1`` (one volume of a NIfTI series).

    The one rule for training (``data.checks``) and deploy: MONAI's loader makes the same two channel-first,
    and nothing else (a 5th axis, several volumes, a 2D slice) is a single CT volume.

    Raises:
        InputVolumeError: empty (an axis of size 0), or not one 3D volume.
    """
    shape = tuple(int(v) for v in shape)
    if 0 in shape:
        raise InputVolumeError(f"{source}: empty volume (shape {shape})")
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    if len(shape) == 4 and shape[3] == 1:
        return shape[:3]  # type: ignore[return-value]
    extra = "" if len(shape) < 4 else " (several volumes or a 5th axis: only one 3D CT volume is read)"
    raise InputVolumeError(f"{source}: image is {len(shape)}D with shape {shape}; expected a 3D volume "
                           f"(X x Y x Z, or X x Y x Z x 1){extra}")


def check_geometry(shape: Sequence[int], dtype: Any, affine: np.ndarray, source: str = "input") -> tuple[int, int, int]:
    """Header-level checks shared by training and deploy: one 3D volume, numeric voxels, a usable affine.

    Args:
        shape: the array's (or header's) shape.
        dtype: the voxel type (on disk for a file).
        affine: the 4x4 voxel-to-world affine.
        source: names the file in error messages.

    Returns:
        the spatial shape ``(X, Y, Z)``.

    Raises:
        InputVolumeError: naming ``source`` and the problem.
    """
    spatial = spatial_dims(shape, source)
    dtype = np.dtype(dtype)
    if dtype.fields is not None or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise InputVolumeError(f"{source}: voxel type {dtype} is not a real number type (complex, RGB or boolean "
                               f"voxels are not CT intensities)")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise InputVolumeError(f"{source}: affine is not a finite 4x4 matrix (NaN or infinite spacing, direction or "
                               f"origin in the header)")
    singular = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if not singular[-1] > MIN_AFFINE_CONDITION * singular[0]:
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        raise InputVolumeError(f"{source}: affine is not invertible (voxel spacing {np.round(spacing, 4).tolist()} mm, "
                               f"singular values {np.round(singular, 6).tolist()}): zero spacing or two axes along "
                               f"the same direction")
    return spatial


def check_voxels(image: np.ndarray, source: str = "input") -> None:
    """Refuse NaN or infinite intensities (after conversion to float32, as both training and deploy read)."""
    finite = np.isfinite(image)
    if not finite.all():
        raise InputVolumeError(f"{source}: {int(finite.size - np.count_nonzero(finite))} non-finite intensity values "
                               f"(NaN or inf)")


def check_volume(image: np.ndarray, affine: np.ndarray, source: str = "input") -> np.ndarray:
    """Refuse what cannot be segmented; return a 3D float32 view of ``image``.

    Accepts ``X x Y x Z`` or ``X x Y x Z x 1`` of any integer or float type (:func:`check_geometry`).

    Args:
        image: the voxel array.
        affine: its 4x4 affine.
        source: names the file in error messages.
    """
    image = np.asarray(image)
    shape = check_geometry(image.shape, image.dtype, affine, source)
    image = image.reshape(shape).astype(np.float32, copy=False)
    check_voxels(image, source)
    return image


def check_header(img: Any, source: str) -> tuple[int, int, int]:
    """The header checks of a loaded (lazy) nibabel image: a NIfTI, then :func:`check_geometry`.

    Returns:
        the spatial shape ``(X, Y, Z)``.
    """
    if not isinstance(img, NIFTI_TYPES):
        raise InputVolumeError(f"{source}: not a NIfTI image ({type(img).__name__}); NIfTI-1/2 (.nii, .nii.gz) is read")
    return check_geometry(img.shape, img.get_data_dtype(), img.affine, source)


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    """Load a 3D NIfTI (nibabel applies the header's slope/intercept).

    Returns:
        ``(float32 X x Y x Z, 4x4 affine, the nibabel image)``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputVolumeError(f"{path}: no such file")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several unrelated types for files it cannot read
        raise InputVolumeError(f"{path}: not a readable NIfTI ({type(exc).__name__}: {exc})") from exc
    check_header(img, str(path))
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # truncated or corrupt voxel data behind a valid header
        raise InputVolumeError(f"{path}: not a readable NIfTI ({type(exc).__name__}: {exc})") from exc
    return check_volume(data, img.affine, str(path)), np.asarray(img.affine, dtype=np.float64), img


def write_json_report(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a JSON report (``deploy.infer --report``) atomically."""
    return write_json(path, payload)


def label_dtype(num_classes: int) -> type:
    """uint8 for up to 256 classes, int16 beyond."""
    return np.uint8 if num_classes <= 256 else np.int16


def write_mask(path: str | Path, labels: np.ndarray, reference: nib.Nifti1Image, num_classes: int) -> Path:
    """Write a label NIfTI with the reference image's exact affine, shape and header geometry, atomically.

    Args:
        path: ``.nii`` or ``.nii.gz``.
        labels: ``X x Y x Z`` class indices in the reference's voxel order.
        reference: the input image.
        num_classes: K (chooses uint8 or int16).
    """
    path = Path(path)
    ref_shape = tuple(reference.shape[:3])
    if tuple(labels.shape) != ref_shape:
        raise InputVolumeError(f"{path}: mask shape {labels.shape} differs from the input's {ref_shape}")
    mask = labels.astype(label_dtype(num_classes))
    header = reference.header.copy()
    header.set_data_dtype(mask.dtype)
    header.set_slope_inter(1.0, 0.0)
    header.set_data_shape(mask.shape)
    out = type(reference)(mask, reference.affine, header)
    out.set_qform(reference.get_qform(), code=int(reference.header["qform_code"]))
    out.set_sform(reference.get_sform(), code=int(reference.header["sform_code"]))
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(out, str(tmp))
    return path
