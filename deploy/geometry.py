"""Reorientation and resampling in numpy, with the arithmetic of MONAI ``Orientation`` + ``Spacing``.

MONAI's ``Spacing`` (defaults: ``diagonal=False``, ``scale_extent=False``, ``align_corners=False``,
``padding_mode="border"``) keeps the first voxel's centre, sizes the output as
``round((n - 1) * in_spacing / out_spacing + 1)`` per axis, and samples output voxel ``j`` at input
voxel coordinate ``j * out_spacing / in_spacing`` with trilinear interpolation, clamping at the border.
After reorientation the voxel-to-voxel map is a pure per-axis scaling, so the trilinear resampling is
three separable 1D linear interpolations, done here without scipy or torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from nibabel import orientations


@dataclass(frozen=True)
class Geometry:
    """How a volume was brought to the model grid, so that predictions can be taken back.

    Attributes:
        source_shape: the input's spatial shape (its own axis order).
        oriented_shape: shape after reorientation.
        resampled_shape: shape on the model grid (target spacing).
        to_target: nibabel orientation transform from the input's axes to the target axcodes.
        spacing_in: voxel spacing of the oriented input (mm).
        spacing_out: target spacing (mm).
    """

    source_shape: tuple[int, int, int]
    oriented_shape: tuple[int, int, int]
    resampled_shape: tuple[int, int, int]
    to_target: np.ndarray
    spacing_in: tuple[float, float, float]
    spacing_out: tuple[float, float, float]


def affine_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing of a 4x4 affine: the norms of its first three columns (as MONAI ``affine_to_spacing``)."""
    return np.sqrt(np.sum(np.asarray(affine, dtype=np.float64)[:3, :3] ** 2, axis=0))


def resampled_shape(shape: Sequence[int], spacing_in: Sequence[float], spacing_out: Sequence[float]) -> tuple[int, ...]:
    """Output shape of MONAI ``Spacing``: ``round((n - 1) * in / out + 1)`` per axis (at least 1)."""
    ratio = np.asarray(spacing_in, dtype=np.float64) / np.asarray(spacing_out, dtype=np.float64)
    extent = (np.asarray(shape, dtype=np.float64) - 1.0) * ratio
    return tuple(max(int(v), 1) for v in np.round(extent + 1.0))


def linear_resample_axis(array: np.ndarray, axis: int, out_size: int, step: float) -> np.ndarray:
    """Sample ``array`` along ``axis`` at coordinates ``j * step`` (``j < out_size``), linear, border-clamped.

    Args:
        array: any-dimensional float array.
        axis: axis to resample.
        out_size: number of output samples.
        step: input-voxel distance between output samples (``out_spacing / in_spacing``).
    """
    n = array.shape[axis]
    coords = np.clip(np.arange(out_size, dtype=np.float64) * step, 0.0, n - 1)
    lo = np.floor(coords).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    w = (coords - lo).astype(array.dtype)
    shape = [1] * array.ndim
    shape[axis] = out_size
    w = w.reshape(shape)
    a_lo = np.take(array, lo, axis=axis)
    a_hi = np.take(array, hi, axis=axis)
    return a_lo + (a_hi - a_lo) * w


def linear_resample(array: np.ndarray, out_shape: Sequence[int], steps: Sequence[float]) -> np.ndarray:
    """Trilinear resampling of the last three axes (leading axes, e.g. channels, are carried along).

    Args:
        array: ``... x X x Y x Z`` float array.
        out_shape: ``[X', Y', Z']``.
        steps: per-axis input-voxel step between output samples.
    """
    out = array
    offset = array.ndim - 3
    for axis in range(3):
        if out.shape[offset + axis] == out_shape[axis] and steps[axis] == 1.0:
            continue
        out = linear_resample_axis(out, offset + axis, int(out_shape[axis]), float(steps[axis]))
    return out


def to_model_grid(image: np.ndarray, affine: np.ndarray, spacing_mm: Sequence[float], axcodes: str = "RAS") -> tuple[np.ndarray, Geometry]:
    """Reorient a volume to ``axcodes`` and resample it trilinearly to ``spacing_mm``.

    Args:
        image: ``X x Y x Z`` array in the file's own voxel order.
        affine: its 4x4 voxel-to-world affine.
        spacing_mm: target spacing in the target axis order.
        axcodes: target orientation (``"RAS"``).

    Returns:
        ``(float32 X' x Y' x Z' array, Geometry)``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    source_ornt = orientations.io_orientation(affine)
    to_target = orientations.ornt_transform(source_ornt, orientations.axcodes2ornt(tuple(axcodes)))
    oriented = orientations.apply_orientation(np.asarray(image, dtype=np.float32), to_target)
    oriented_affine = affine @ orientations.inv_ornt_aff(to_target, image.shape)
    spacing_in = affine_spacing(oriented_affine)
    spacing_out = np.asarray(spacing_mm, dtype=np.float64)
    out_shape = resampled_shape(oriented.shape, spacing_in, spacing_out)
    resampled = linear_resample(oriented, out_shape, spacing_out / spacing_in)
    geometry = Geometry(
        source_shape=tuple(int(s) for s in image.shape),
        oriented_shape=tuple(int(s) for s in oriented.shape),
        resampled_shape=tuple(int(s) for s in out_shape),
        to_target=to_target,
        spacing_in=tuple(float(s) for s in spacing_in),
        spacing_out=tuple(float(s) for s in spacing_out),
    )
    return np.ascontiguousarray(resampled, dtype=np.float32), geometry


def logits_to_source(logits: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map ``K x X' x Y' x Z'`` model-grid logits back to the input's voxels and take the argmax.

    Logits are resampled linearly (smoother boundaries than resampling labels), then the orientation is
    undone, so the label map lines up voxel for voxel with the input file.

    Returns:
        ``X x Y x Z`` class indices (int64) in the input's own voxel order.
    """
    steps = np.asarray(geometry.spacing_in) / np.asarray(geometry.spacing_out)
    on_oriented = linear_resample(logits, geometry.oriented_shape, steps)
    labels = np.argmax(on_oriented, axis=0)
    inverse = _inverse_ornt(geometry.to_target)
    return np.ascontiguousarray(orientations.apply_orientation(labels, inverse))


def labels_to_source(labels: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map an ``X' x Y' x Z'`` model-grid label map back to the input's voxels by nearest neighbour.

    This is MONAI's inverse of ``Spacing`` with ``nearest`` interpolation (border clamped; ties, e.g. a
    voxel exactly between two model-grid voxels, go to the upper one as MONAI's float32 grid does), then
    the orientation undone: the same mask ``Invertd(nearest_interp=True)`` gives.

    Returns:
        ``X x Y x Z`` class indices in the input's own voxel order.
    """
    out = labels
    steps = np.asarray(geometry.spacing_in) / np.asarray(geometry.spacing_out)
    for axis in range(3):
        n = out.shape[axis]
        coords = np.arange(geometry.oriented_shape[axis], dtype=np.float64) * steps[axis]
        out = np.take(out, np.clip(np.floor(coords + 0.5), 0, n - 1).astype(np.int64), axis=axis)
    return np.ascontiguousarray(orientations.apply_orientation(out, _inverse_ornt(geometry.to_target)))


def _inverse_ornt(transform: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes ``transform`` (nibabel ornt semantics)."""
    inverse = np.zeros_like(transform)
    for in_axis, (out_axis, flip) in enumerate(transform):
        inverse[int(out_axis)] = [in_axis, flip]
    return inverse
