"""Geometry primitives the phantom anatomy is drawn with, in the canonical frame (millimetres, RAS).

A voxel grid (``Grid``: voxel-centre coordinates, and index boxes around a shape), smooth random fields
(``smooth_noise``: a coarse random grid upsampled by separable cubic B-spline matrices), implicit shapes
evaluated inside their bounding boxes only (``ellipsoid`` with smooth radial deformations, ``tube`` along a
polyline), and the ``Canvas`` they are painted on (HU image, label map, abdominal cavity). Evaluating
shapes in their boxes and noise by matrices is what keeps a 160x128x48 case well under a second on one core.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

AIR_HU = -1000.0


@dataclass
class Grid:
    """Voxel-centre coordinates in the canonical frame for an internal RAS-ordered array."""

    x: np.ndarray  # (X,) canonical mm, increasing towards the patient's right
    y: np.ndarray  # (Y,) increasing towards anterior
    z: np.ndarray  # (Z,) increasing towards superior
    spacing_mm: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.x.size, self.y.size, self.z.size)

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[tuple[slice, slice, slice], tuple[np.ndarray, ...]]:
        """Index slices covering canonical bounds [lo, hi] and open-grid coordinates inside them."""
        slices = []
        coords = []
        for axis, (axis_coords, a, b) in enumerate(zip((self.x, self.y, self.z), lo, hi)):
            start = int(np.searchsorted(axis_coords, a, side="left"))
            stop = int(np.searchsorted(axis_coords, b, side="right"))
            stop = max(stop, start)
            slices.append(slice(start, stop))
            view = [1, 1, 1]
            view[axis] = stop - start
            coords.append(axis_coords[start:stop].reshape(view))
        return tuple(slices), tuple(coords)


def _bspline_upsampling_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of a cubic B-spline through n_in control points, sampled at n_out positions."""
    positions = (np.arange(n_out) + 0.5) / n_out * (n_in - 3) + 1.0
    d = np.abs(positions[:, None] - np.arange(n_in)[None, :])
    w = np.where(d < 1, 2.0 / 3.0 - d**2 + d**3 / 2.0, np.where(d < 2, (2.0 - d) ** 3 / 6.0, 0.0))
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], spacing_mm: Sequence[float], corr_mm: float) -> np.ndarray:
    """Zero-mean, unit-std random field of ``shape`` whose features are about ``corr_mm`` wide."""
    coarse = [max(4, int(math.ceil(n * s / corr_mm)) + 3) for n, s in zip(shape, spacing_mm)]
    control = rng.standard_normal(coarse).astype(np.float32)
    mx, my, mz = (_bspline_upsampling_matrix(n, c) for n, c in zip(shape, coarse))
    field = np.einsum("ia,abc->ibc", mx, control)
    field = np.einsum("jb,ibc->ijc", my, field)
    field = np.einsum("kc,ijc->ijk", mz, field)
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return field


def shape_modes(rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Coefficients of a smooth radial deformation (see ``ellipsoid``)."""
    return rng.normal(0.0, amplitude, size=8)


def _radial_modulation(nu: np.ndarray, nv: np.ndarray, nw: np.ndarray, modes: np.ndarray) -> np.ndarray:
    # Low-order polynomials of the unit direction: dents, bulges and tapers that stay smooth.
    basis = (nu, nv, nw, nu * nv, nv * nw, nu * nw, nu * nu - nv * nv, 3.0 * nw * nw - 1.0)
    m = np.ones_like(nu)
    for c, b in zip(modes, basis):
        m += c * b
    return np.maximum(m, 0.3)


def ellipsoid(grid: Grid, centre: Sequence[float], radii: Sequence[float], angle_deg: float = 0.0,
               modes: np.ndarray | None = None):
    """Level of a deformed ellipsoid rotated by ``angle_deg`` in the axial plane: < 1 inside.

    Returns (box slices, level array over the box).
    """
    reach = 1.6 * max(radii)
    box, (gx, gy, gz) = grid.box([c - reach for c in centre], [c + reach for c in centre])
    a = math.radians(angle_deg)
    dx, dy, dz = gx - centre[0], gy - centre[1], gz - centre[2]
    pu = (math.cos(a) * dx + math.sin(a) * dy) / radii[0]
    pv = (-math.sin(a) * dx + math.cos(a) * dy) / radii[1]
    pw = dz / radii[2]
    r = np.sqrt(pu * pu + pv * pv + pw * pw)
    if modes is None:
        return box, r
    safe = np.maximum(r, 1e-6)
    return box, r / _radial_modulation(pu / safe, pv / safe, pw / safe, modes)


def tube(grid: Grid, points: Sequence[Sequence[float]], radii: Sequence[float]):
    """Level of a tube along a polyline with linearly varying radius: < 1 inside. Returns (box, level)."""
    pts = np.asarray(points, dtype=np.float64)
    rad = np.asarray(radii, dtype=np.float64)
    reach = 1.3 * rad.max()
    box, (gx, gy, gz) = grid.box(pts.min(axis=0) - reach, pts.max(axis=0) + reach)
    level = None
    for (a, b, ra, rb) in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
        ab = b - a
        t = ((gx - a[0]) * ab[0] + (gy - a[1]) * ab[1] + (gz - a[2]) * ab[2]) / float(ab @ ab)
        t = np.clip(t, 0.0, 1.0)
        d2 = (gx - a[0] - t * ab[0]) ** 2 + (gy - a[1] - t * ab[1]) ** 2 + (gz - a[2] - t * ab[2]) ** 2
        seg = np.sqrt(d2) / (ra + t * (rb - ra))
        level = seg if level is None else np.minimum(level, seg)
    return box, level


class Canvas:
    """The volume being painted: HU image, label map, and the abdominal cavity that organs are clipped to."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.image = np.full(grid.shape, AIR_HU, dtype=np.float32)
        self.label = np.zeros(grid.shape, dtype=np.uint8)
        self.cavity = np.zeros(grid.shape, dtype=bool)

    def paint(self, box, mask: np.ndarray, hu: float | np.ndarray, label: int | None = None,
              clip_to_cavity: bool = True) -> np.ndarray:
        """Set HU (and optionally the label) where ``mask`` (over ``box``) holds; returns the mask used."""
        if clip_to_cavity:
            mask = mask & self.cavity[box]
        region = self.image[box]
        region[mask] = hu if np.isscalar(hu) else hu[mask]
        if label is not None:
            self.label[box][mask] = label
        return mask

