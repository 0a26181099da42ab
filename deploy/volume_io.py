"""Reading a CT NIfTI for segmentation (with the checks an edge device needs) and writing the mask."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from data.atomic import atomic_path
from deploy.errors import InputVolumeError


def check_volume(image: np.ndarray, affine: np.ndarray, source: str = "input") -> np.ndarray:
    """Refuse what cannot be segmented; return a 3D float32 view of ``image``.

    Accepts ``X x Y x Z`` or ``X x Y x Z x 1`` of any integer or float type.

    Args:
        image: the voxel array.
        affine: its 4x4 affine.
        source: names the file in error messages.
    """
    image = np.asarray(image)
    if image.size == 0:
        raise InputVolumeError(f"{source}: empty volume (shape {image.shape})")
    if image.ndim == 4 and image.shape[3] == 1:
        image = image[..., 0]
    if image.ndim != 3:
        raise InputVolumeError(f"{source}: expected a 3D volume, got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise InputVolumeError(f"{source}: voxel type {image.dtype} is not a number type")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise InputVolumeError(f"{source}: {int((~np.isfinite(image)).sum())} voxels are NaN or infinite")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputVolumeError(f"{source}: affine is not an invertible finite 4x4 matrix")
    return image


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
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises several unrelated types for files it cannot read
        raise InputVolumeError(f"{path}: not a readable NIfTI ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputVolumeError(f"{path}: not a NIfTI image ({type(img).__name__})")
    return check_volume(data, img.affine, str(path)), np.asarray(img.affine, dtype=np.float64), img


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
