"""The deploy resampling takes short cuts on large CTs (memory-order gathers, flips folded into indices, a
foreground box for the way back); each must give exactly what the plain reorient-then-resample gives."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from nibabel import orientations

from deploy.geometry import _inverse_ornt, linear_resample, logits_to_source, to_model_grid


def _reference_grid(image: np.ndarray, affine: np.ndarray, spacing, axcodes="RAS") -> np.ndarray:
    """Reorient the whole float32 volume (MONAI Orientation), then resample it (Spacing): the plain way."""
    to_target = orientations.ornt_transform(orientations.io_orientation(affine), orientations.axcodes2ornt(tuple(axcodes)))
    oriented = orientations.apply_orientation(np.asarray(image, dtype=np.float32), to_target)
    oriented_affine = affine @ orientations.inv_ornt_aff(to_target, image.shape)
    spacing_in = np.sqrt((oriented_affine[:3, :3] ** 2).sum(axis=0))
    spacing_out = np.asarray(spacing, dtype=np.float64)
    shape = tuple(max(int(v), 1) for v in np.round((np.asarray(oriented.shape) - 1.0) * spacing_in / spacing_out + 1.0))
    return linear_resample(oriented, shape, spacing_out / spacing_in)


def _affine(perm, flips, spacing) -> np.ndarray:
    affine = np.zeros((4, 4))
    for axis, (world, flip) in enumerate(zip(perm, flips)):
        affine[world, axis] = spacing[axis] * flip
    affine[:3, 3] = [12.0, -30.0, 5.0]
    affine[3, 3] = 1.0
    return affine


CASES = list(itertools.product([(0, 1, 2), (1, 0, 2), (2, 0, 1)], [(1, 1, 1), (-1, -1, 1), (1, -1, -1)]))


@pytest.mark.parametrize("perm,flips", CASES)
@pytest.mark.parametrize("order", ["C", "F"])
def test_model_grid_equals_reorienting_then_resampling(perm, flips, order):
    rng = np.random.default_rng(sum(perm) * 7 + flips[0] + 3 * flips[1])
    # int16 HU as a CT file holds; one axis keeps its spacing (no resampling along it, a flip still applies)
    image = np.asfortranarray(rng.integers(-1024, 2000, size=(23, 31, 12), dtype=np.int16)) if order == "F" else \
        rng.integers(-1024, 2000, size=(23, 31, 12), dtype=np.int16)
    spacing = (1.7, 0.9, 2.0)
    affine = _affine(perm, flips, spacing)
    target = [2.0, 2.0, 2.0]
    mine, geometry = to_model_grid(image, affine, target)
    expected = _reference_grid(image, affine, target)
    assert mine.dtype == np.float32 and mine.flags.c_contiguous
    np.testing.assert_array_equal(mine, expected)
    assert geometry.resampled_shape == expected.shape
    # floats (a converted volume) give the same
    np.testing.assert_array_equal(to_model_grid(image.astype(np.float64), affine, target)[0], expected)


def _reference_back(logits: np.ndarray, geometry) -> np.ndarray:
    steps = np.asarray(geometry.spacing_in) / np.asarray(geometry.spacing_out)
    whole = np.argmax(linear_resample(logits, geometry.oriented_shape, steps), axis=0)
    return orientations.apply_orientation(whole, _inverse_ornt(geometry.to_target))


@pytest.mark.parametrize("perm,flips", CASES[:4])
def test_labels_back_from_the_foreground_box_equal_resampling_everything(perm, flips):
    rng = np.random.default_rng(5)
    image = rng.normal(size=(40, 33, 14)).astype(np.float32)
    affine = _affine(perm, flips, (1.1, 0.8, 2.0))
    resampled, geometry = to_model_grid(image, affine, [2.0, 2.0, 2.0])
    logits = rng.normal(size=(5, *resampled.shape)).astype(np.float32)
    # background wins everywhere except a small blob and one isolated voxel at a border
    logits[0] += 10.0
    x, y, z = (s // 2 for s in resampled.shape)
    logits[2, x - 2 : x + 1, y : y + 3, z - 1 : z + 1] += 14.0
    logits[4, 0, -1, 0] += 15.0
    for chunk_voxels in (1, 300, 10**9):
        labels = logits_to_source(logits, geometry, chunk_voxels=chunk_voxels)
        assert labels.shape == image.shape and labels.dtype == np.uint8
        np.testing.assert_array_equal(labels, _reference_back(logits, geometry))
    assert set(np.unique(labels)) == {0, 2, 4}


def test_labels_back_when_everything_or_nothing_is_foreground():
    rng = np.random.default_rng(1)
    affine = np.diag([-1.3, 1.0, 2.0, 1.0])  # the z spacing equals the target: no resampling along it
    resampled, geometry = to_model_grid(rng.normal(size=(20, 18, 9)).astype(np.float32), affine, [2.0, 2.0, 2.0])
    logits = rng.normal(size=(3, *resampled.shape)).astype(np.float32)
    np.testing.assert_array_equal(logits_to_source(logits, geometry), _reference_back(logits, geometry))
    logits[0] += 100.0
    labels = logits_to_source(logits, geometry)
    assert labels.shape == (20, 18, 9) and not labels.any()
