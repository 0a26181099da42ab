"""Synthetic CT phantoms: geometry, anatomy, intensities, determinism, dataset writing and the CLI."""
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from data.phantom import FIELD_OF_VIEW_MM, LABELS, PhantomError, make_phantom
from data.phantom_dataset import case_rng, write_dataset

SMALL = (64, 64, 32)


def world_centroids(label, affine):
    """Centroid of every labelled class in RAS world millimetres."""
    out = {}
    for k in np.unique(label):
        if k == 0:
            continue
        ijk = np.argwhere(label == k).mean(axis=0)
        out[int(k)] = affine[:3, :3] @ ijk + affine[:3, 3]
    return out


def test_phantom_arrays_geometry_and_labels():
    image, label, affine = make_phantom(0, SMALL)
    assert image.shape == label.shape == SMALL
    assert image.dtype == np.int16 and label.dtype == np.uint8
    # Stored like DICOM-derived NIfTI: x and y flipped (L, P, S), origin away from zero.
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    assert not np.allclose(affine, np.eye(4))
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), np.array(FIELD_OF_VIEW_MM) / SMALL)
    assert set(np.unique(label)) == set(range(8))

    _, label_gb, _ = make_phantom(0, SMALL, label_gallbladder=True)
    assert set(np.unique(label_gb)) == set(range(9))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_organs_in_plausible_relative_positions(seed):
    _, label, affine = make_phantom(seed, SMALL)
    c = world_centroids(label, affine)
    liver, spleen, rkid, lkid, pancreas, stomach, aorta = (c[k] for k in range(1, 8))
    x, y, z = 0, 1, 2  # RAS: +x patient's right, +y anterior, +z superior
    assert liver[x] > spleen[x] + 50
    assert rkid[x] > aorta[x] > lkid[x]
    midline = 0.5 * (rkid[x] + lkid[x])
    assert aorta[x] < midline  # the aorta runs left of the midline
    assert pancreas[y] > aorta[y] and pancreas[y] > rkid[y] and pancreas[y] > lkid[y]
    assert stomach[x] < midline and stomach[y] > lkid[y]
    assert liver[z] > rkid[z] and spleen[z] > lkid[z]


def test_intensities_are_ct_like_and_not_separable_by_threshold():
    image, label, _ = make_phantom(3, SMALL)
    hu = {name: image[label == k] for k, name in LABELS.items() if k in np.unique(label)}
    assert np.median(image[:4, :4, :]) < -900  # air outside the body
    assert image.max() > 400  # bone
    assert 30 < np.median(hu["liver"]) < 100
    assert np.median(hu["aorta"]) > np.median(hu["liver"]) + 60
    assert np.median(hu["right_kidney"]) > np.median(hu["liver"]) + 30
    # Overlapping ranges: liver vs spleen, pancreas vs unlabelled soft tissue inside the body.
    liver_iqr = np.percentile(hu["liver"], [10, 90])
    spleen_iqr = np.percentile(hu["spleen"], [10, 90])
    assert spleen_iqr[1] > liver_iqr[0] and liver_iqr[1] > spleen_iqr[0]
    pan_lo, pan_hi = np.percentile(hu["pancreas"], [10, 90])
    unlabelled_soft = image[(label == 0) & (image > pan_lo) & (image < pan_hi)]
    assert unlabelled_soft.size > hu["pancreas"].size


def test_same_seed_same_bytes_other_seed_differs():
    a = make_phantom(7, SMALL)
    b = make_phantom(np.random.default_rng(7), SMALL)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    np.testing.assert_array_equal(a[2], b[2])
    c = make_phantom(8, SMALL)
    assert (a[1] != c[1]).mean() > 0.01


def test_smaller_size_is_a_coarser_scan_of_the_same_anatomy():
    _, fine, aff_fine = make_phantom(5, (64, 64, 32))
    _, coarse, aff_coarse = make_phantom(5, (32, 32, 16))
    np.testing.assert_allclose(np.abs(np.diag(aff_coarse)[:3]), 2 * np.abs(np.diag(aff_fine)[:3]))
    ml_fine = np.prod(np.abs(np.diag(aff_fine)[:3])) / 1000
    ml_coarse = np.prod(np.abs(np.diag(aff_coarse)[:3])) / 1000
    for k in (1, 2, 6):  # big organs: volume survives coarse sampling
        assert (coarse == k).sum() * ml_coarse == pytest.approx((fine == k).sum() * ml_fine, rel=0.2)


def test_invalid_parameters_are_refused(tmp_path):
    with pytest.raises(PhantomError, match="size"):
        make_phantom(0, (4, 64, 32))
    with pytest.raises(PhantomError, match="cases"):
        write_dataset(tmp_path, cases=0)


def test_cli_writes_msd_dataset_with_preview(tmp_path):
    out = tmp_path / "p"
    cmd = [sys.executable, "-m", "data.phantom", "--out", str(out), "--cases", "2", "--test-cases", "1",
           "--seed", "0", "--size", "48", "48", "24", "--preview"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "phantom_001" in run.stdout and "liver" in run.stdout
    info = json.loads((out / "dataset.json").read_text())
    assert info["modality"] == {"0": "CT"}
    assert info["labels"]["1"] == "liver" and info["labels"]["7"] == "aorta" and "8" not in info["labels"]
    assert info["numTraining"] == 2 and info["numTest"] == 1
    assert info["training"][0] == {"image": "./imagesTr/phantom_000.nii.gz", "label": "./labelsTr/phantom_000.nii.gz"}
    assert (out / info["test"][0]).is_file()
    assert (out / "preview.png").stat().st_size > 10_000
    img = nib.load(out / "imagesTr" / "phantom_001.nii.gz")
    np.testing.assert_allclose(img.header.get_zooms(), np.array(FIELD_OF_VIEW_MM) / (48, 48, 24), rtol=1e-5)
    # The files hold exactly what make_phantom returns for that case.
    image, label, affine = make_phantom(case_rng(0, 0, 1), (48, 48, 24))
    np.testing.assert_array_equal(np.asarray(img.dataobj), image)
    np.testing.assert_array_equal(np.asarray(nib.load(out / "labelsTr" / "phantom_001.nii.gz").dataobj), label)
    np.testing.assert_allclose(img.affine, affine, atol=1e-4)
    assert not list(out.rglob(".*tmp*"))  # no temporary files left behind


def test_a_clinical_field_of_view_keeps_the_anatomy_at_its_size_with_air_around():
    """--spacing: the field of view is size x spacing; organs keep their physical size and the body its
    centre, and the voxels outside the usual field of view are air."""
    base_image, base_label, base_affine = make_phantom(3, SMALL)
    spacing = tuple(2 * f / n for f, n in zip(FIELD_OF_VIEW_MM, SMALL))  # twice the field of view
    image, label, affine = make_phantom(3, SMALL, spacing_mm=spacing)
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), spacing)
    ml = lambda lab, aff: {k: (lab == k).sum() * abs(np.linalg.det(aff[:3, :3])) / 1000 for k in range(1, 8)}  # noqa: E731
    base_ml, wide_ml = ml(base_label, base_affine), ml(label, affine)
    for k in range(1, 8):
        assert wide_ml[k] == pytest.approx(base_ml[k], rel=0.5), (LABELS[k], base_ml[k], wide_ml[k])
    # the outer quarter of each in-plane axis lies outside the usual field of view: air, no organ
    q = SMALL[0] // 4
    assert image[:q].max() <= -900 and image[-q:].max() <= -900 and not label[:q].any()
    assert image[SMALL[0] // 2, SMALL[1] // 2].max() > -500  # the body at the centre
    with pytest.raises(PhantomError, match="spacing"):
        make_phantom(3, SMALL, spacing_mm=(1.0, 0.0, 2.0))


def test_cases_written_by_two_processes_are_those_one_process_writes(tmp_path, capsys):
    # Each case has its own random stream, so the workers (spawned processes) change the time, not the dataset.
    write_dataset(tmp_path / "one", 3, test_cases=1, seed=4, size=(48, 48, 24), verbose=True)
    one = capsys.readouterr().out
    write_dataset(tmp_path / "two", 3, test_cases=1, seed=4, size=(48, 48, 24), verbose=True, workers=2)
    two = capsys.readouterr().out
    assert json.loads((tmp_path / "one" / "dataset.json").read_text()) == json.loads((tmp_path / "two" / "dataset.json").read_text())
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.nii.gz"))
    assert len(files) == 7
    for rel in files:
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "one" / rel).dataobj),
                                      np.asarray(nib.load(tmp_path / "two" / rel).dataobj))
    # the same lines in the same order, up to each case's seconds, and the same organ statistics
    strip = lambda text: [line.rsplit(",", 1)[0] for line in text.splitlines()]
    assert strip(one.replace("/one", "/two")) == strip(two) and "phantom_ts_000" in one and "liver" in two
