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

from deploy.body_crop import mask_box
from deploy.volume_io import label_dtype


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


def _axis_weights(n: int, out_size: int, step: float, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower/upper input indices and upper weights of linear sampling at ``j * step`` (border-clamped)."""
    coords = np.clip(np.arange(out_size, dtype=np.float64) * step, 0.0, n - 1)
    lo = np.floor(coords).astype(np.int64)
    return lo, np.minimum(lo + 1, n - 1), (coords - lo).astype(dtype)


def _interpolate(array: np.ndarray, axis: int, lo: np.ndarray, hi: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``a[lo] + (a[hi] - a[lo]) * w`` along ``axis``, with one temporary instead of four, computed in ``w``'s
    type: an integer volume is gathered as it is and converted after (the same values as converting it whole,
    since float32 holds every CT integer exactly)."""
    shape = [1] * array.ndim
    shape[axis] = len(w)
    a_lo = np.take(array, lo, axis=axis).astype(w.dtype, copy=False)
    out = np.take(array, hi, axis=axis).astype(w.dtype, copy=False)
    out -= a_lo
    out *= w.reshape(shape)
    out += a_lo
    return out


def linear_resample_axis(array: np.ndarray, axis: int, out_size: int, step: float) -> np.ndarray:
    """Sample ``array`` along ``axis`` at coordinates ``j * step`` (``j < out_size``), linear, border-clamped.

    Args:
        array: any-dimensional float array.
        axis: axis to resample.
        out_size: number of output samples.
        step: input-voxel distance between output samples (``out_spacing / in_spacing``).
    """
    return _interpolate(array, axis, *_axis_weights(array.shape[axis], out_size, step, array.dtype))


def _axis_order(in_shape: Sequence[int], out_shape: Sequence[int]) -> list[int]:
    """Axes in the order that keeps intermediates smallest: the most shrinking first, the most growing last.

    Linear interpolation along different axes commutes, so the order changes only float rounding.
    """
    return sorted(range(3), key=lambda a: int(out_shape[a]) / int(in_shape[a]))


def linear_resample(array: np.ndarray, out_shape: Sequence[int], steps: Sequence[float]) -> np.ndarray:
    """Trilinear resampling of the last three axes (leading axes, e.g. channels, are carried along).

    Args:
        array: ``... x X x Y x Z`` float array.
        out_shape: ``[X', Y', Z']``.
        steps: per-axis input-voxel step between output samples.
    """
    out = array
    offset = array.ndim - 3
    for axis in _axis_order(array.shape[offset:], out_shape):
        if out.shape[offset + axis] == out_shape[axis] and steps[axis] == 1.0:
            continue
        out = linear_resample_axis(out, offset + axis, int(out_shape[axis]), float(steps[axis]))
    return out


def _memory_axes(array: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """A C-contiguous view of ``array`` (its transpose when it is Fortran-ordered, as nibabel reads NIfTI)
    and, for each axis of that view, the array axis it is.

    ``np.take`` copies a non-C-contiguous array whole before gathering (208 MB per call for a 512 x 512 x
    200 float32 CT), so the resampling gathers on this view instead.
    """
    if array.flags.c_contiguous or not array.flags.f_contiguous:
        return np.ascontiguousarray(array), list(range(array.ndim))
    return array.T, list(range(array.ndim))[::-1]


def to_model_grid(image: np.ndarray, affine: np.ndarray, spacing_mm: Sequence[float], axcodes: str = "RAS") -> tuple[np.ndarray, Geometry]:
    """Reorient a volume to ``axcodes`` and resample it trilinearly to ``spacing_mm``.

    The arithmetic is that of reorienting first and resampling the reoriented array (MONAI ``Orientation``
    then ``Spacing``), value for value; the work is not. Each reoriented axis is resampled on the input's
    own axis in its memory order, a flip folded into the sample indices (reoriented index ``i`` is input
    index ``n - 1 - i``), so the full-size volume is never copied, converted or transposed; only the
    model-grid result is. Integer voxels are gathered as they are and converted after the first pass.

    Args:
        image: ``X x Y x Z`` array (any real type) in the file's own voxel order.
        affine: its 4x4 voxel-to-world affine.
        spacing_mm: target spacing in the target axis order.
        axcodes: target orientation (``"RAS"``).

    Returns:
        ``(float32 X' x Y' x Z' array, Geometry)``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    image = np.asarray(image)
    source_ornt = orientations.io_orientation(affine)
    to_target = orientations.ornt_transform(source_ornt, orientations.axcodes2ornt(tuple(axcodes)))
    oriented_shape = [0, 0, 0]
    for in_axis, (out_axis, _) in enumerate(to_target):
        oriented_shape[int(out_axis)] = int(image.shape[in_axis])
    oriented_affine = affine @ orientations.inv_ornt_aff(to_target, image.shape)
    spacing_in = affine_spacing(oriented_affine)
    spacing_out = np.asarray(spacing_mm, dtype=np.float64)
    out_shape = resampled_shape(oriented_shape, spacing_in, spacing_out)
    steps = spacing_out / spacing_in
    base, base_to_input = _memory_axes(image)
    # oriented axis -> (axis of ``base``, flipped)
    where = {int(to_target[i][0]): (base_to_input.index(i), to_target[i][1] < 0) for i in range(3)}
    kept = {a for a in range(3) if oriented_shape[a] == out_shape[a] and steps[a] == 1.0}  # nothing to resample
    out = base
    for axis in _axis_order(oriented_shape, out_shape):
        if axis in kept:
            continue
        b, flipped = where[axis]
        n = oriented_shape[axis]
        lo, hi, w = _axis_weights(n, int(out_shape[axis]), float(steps[axis]), np.dtype(np.float32))
        if flipped:
            lo, hi = n - 1 - lo, n - 1 - hi
        out = _interpolate(out, b, lo, hi, w)
    out = out.astype(np.float32, copy=False)
    # back to the oriented axis order; flips of axes that were resampled are already in the indices
    index = [slice(None)] * 3
    for axis, (b, flipped) in where.items():
        if flipped and axis in kept:
            index[b] = slice(None, None, -1)
    out = out[tuple(index)].transpose([where[a][0] for a in range(3)])
    geometry = Geometry(
        source_shape=tuple(int(s) for s in image.shape),
        oriented_shape=tuple(oriented_shape),
        resampled_shape=tuple(int(s) for s in out_shape),
        to_target=to_target,
        spacing_in=tuple(float(s) for s in spacing_in),
        spacing_out=tuple(float(s) for s in spacing_out),
    )
    return np.ascontiguousarray(out, dtype=np.float32), geometry


def _foreground_range(lo: np.ndarray, hi: np.ndarray, first: int, last: int) -> tuple[int, int]:
    """Output indices ``[j0, j1)`` whose interpolation cell ``[lo[j], hi[j]]`` touches model voxels
    ``first..last`` (``lo`` and ``hi`` are non-decreasing)."""
    j0 = int(np.searchsorted(hi, first, side="left"))
    j1 = int(np.searchsorted(lo, last, side="right"))
    return j0, max(j0, j1)


def logits_to_source(logits: np.ndarray, geometry: Geometry, chunk_voxels: int = 1 << 21) -> np.ndarray:
    """Map ``K x X' x Y' x Z'`` model-grid logits back to the input's voxels and take the argmax.

    Logits are resampled linearly (smoother boundaries than resampling labels), then the orientation is
    undone, so the label map lines up voxel for voxel with the input file.

    Two things keep this cheap on a clinical-size CT without changing a single label:

    - Only the box of output voxels whose interpolation cell touches a model voxel whose argmax is not
      background is interpolated; every other voxel is background. That is exact: a trilinear value is a
      convex combination of its cell's corners, and where class 0 is the (first) maximum at every corner,
      ``l_0 - l_c >= 0`` holds for the combination too.
    - The box goes in slabs of about ``chunk_voxels`` output voxels along the first-resampled axis, each
      resampled and reduced to labels at once: memory stays at ``K x slab`` floats instead of ``K x`` the
      whole input (1.7 GB for 8 classes of a 512 x 512 x 200 CT), with the same arithmetic per voxel.

    Args:
        logits: ``K x X' x Y' x Z'`` float32 on the model grid.
        geometry: from :func:`to_model_grid`.
        chunk_voxels: output voxels per slab (memory/speed trade-off only; results do not depend on it).

    Returns:
        ``X x Y x Z`` class indices (uint8 up to 256 classes, else int16) in the input's own voxel order.
    """
    steps = np.asarray(geometry.spacing_in) / np.asarray(geometry.spacing_out)
    out_shape = [int(s) for s in geometry.oriented_shape]
    order = _axis_order(logits.shape[1:], out_shape)
    weights = {a: _axis_weights(logits.shape[1 + a], out_shape[a], float(steps[a]), logits.dtype) for a in range(3)}
    identity = {a: logits.shape[1 + a] == out_shape[a] and steps[a] == 1.0 for a in range(3)}
    labels = np.zeros(out_shape, dtype=label_dtype(logits.shape[0]))
    foreground = mask_box(np.argmax(logits, axis=0) != 0)
    inverse = _inverse_ornt(geometry.to_target)
    if foreground is None:
        return np.ascontiguousarray(orientations.apply_orientation(labels, inverse))
    # the output box, and the model voxels its cells read, per axis
    box, source = [], []
    for a in range(3):
        lo, hi, w = weights[a]
        j0, j1 = _foreground_range(lo, hi, foreground[a].start, foreground[a].stop - 1)
        box.append(slice(j0, j1))
        if identity[a]:  # output voxel j is model voxel j (weight 0 on the next one)
            source.append(slice(j0, j1))
            weights[a] = (lo[j0:j1] - j0, lo[j0:j1] - j0, w[j0:j1])
            continue
        m0, m1 = int(lo[j0:j1].min()), int(hi[j0:j1].max()) + 1
        source.append(slice(m0, m1))
        weights[a] = (lo[j0:j1] - m0, hi[j0:j1] - m0, w[j0:j1])
    part_logits = logits[(slice(None), *source)]
    first = order[0]
    box_shape = [b.stop - b.start for b in box]
    plane = int(np.prod(box_shape)) // max(box_shape[first], 1)
    slab = max(1, int(chunk_voxels) // max(plane, 1))
    for j0 in range(0, box_shape[first], slab):
        j1 = min(j0 + slab, box_shape[first])
        lo, hi, w = (v[j0:j1] for v in weights[first])
        start = int(lo.min())
        part = np.take(part_logits, np.arange(start, int(hi.max()) + 1), axis=1 + first)
        part = _interpolate(part, 1 + first, lo - start, hi - start, w)
        for axis in order[1:]:
            if identity[axis]:
                continue
            part = _interpolate(part, 1 + axis, *weights[axis])
        index = list(box)
        index[first] = slice(box[first].start + j0, box[first].start + j1)
        labels[tuple(index)] = np.argmax(part, axis=0)
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
