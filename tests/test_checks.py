"""Input checks: one test per kind of bad input, fail-fast ordering, and skipping bad cases."""
import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from data.checks import BadCaseWarning, DataError, check_case, check_dataset, check_image
from data.dataset import load_dataset

CLASSES = {0: "background", 1: "liver", 2: "spleen"}
AFFINE = np.diag([-0.8, -0.8, 2.5, 1.0])


def save(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def ct_image():
    """A tiny plausible CT: air around a block of soft tissue (HU)."""
    image = np.full((12, 10, 6), -1000, dtype=np.int16)
    image[2:10, 2:8, 1:5] = 50
    return image


def good_case(tmp_path, name="case"):
    image = ct_image()
    label = np.zeros((12, 10, 6), dtype=np.uint8)
    label[3:6, 3:6, 2:4] = 1
    label[7:9, 3:6, 2:4] = 2
    return save(tmp_path / f"{name}_img.nii.gz", image), save(tmp_path / f"{name}_lab.nii.gz", label)


def test_good_case_passes_and_reports_classes(tmp_path):
    image, label = good_case(tmp_path)
    report = check_case(image, label, CLASSES)
    assert report["shape"] == (12, 10, 6)
    assert report["classes_present"] == [0, 1, 2]
    np.testing.assert_allclose(report["spacing_mm"], (0.8, 0.8, 2.5))


def test_mismatched_shape(tmp_path):
    image, _ = good_case(tmp_path)
    label = save(tmp_path / "lab.nii.gz", np.zeros((12, 10, 5), dtype=np.uint8))
    with pytest.raises(DataError, match=r"lab\.nii\.gz.*shape \(12, 10, 5\) does not match"):
        check_case(image, label, CLASSES, read_arrays=False)


def test_mismatched_affine(tmp_path):
    image, _ = good_case(tmp_path)
    label = np.zeros((12, 10, 6), dtype=np.uint8)
    label[1, 1, 1] = 1
    shifted = AFFINE.copy()
    shifted[2, 3] = 5.0
    bad = save(tmp_path / "lab.nii.gz", label, shifted)
    with pytest.raises(DataError, match="affine differs"):
        check_case(image, bad, CLASSES, read_arrays=False)


def test_label_value_outside_declared_classes(tmp_path):
    image, _ = good_case(tmp_path)
    label = np.zeros((12, 10, 6), dtype=np.uint8)
    label[4, 4, 2] = 9
    bad = save(tmp_path / "lab.nii.gz", label)
    with pytest.raises(DataError, match=r"lab\.nii\.gz: label values \[9\] are not declared"):
        check_case(image, bad, CLASSES)


def test_empty_label(tmp_path):
    image, _ = good_case(tmp_path)
    bad = save(tmp_path / "lab.nii.gz", np.zeros((12, 10, 6), dtype=np.uint8))
    with pytest.raises(DataError, match="empty"):
        check_case(image, bad, CLASSES)


def test_2d_image_is_refused(tmp_path):
    flat = save(tmp_path / "slice.nii.gz", np.zeros((12, 10), dtype=np.int16))
    with pytest.raises(DataError, match=r"slice\.nii\.gz: image is 2D"):
        check_image(flat)


def test_4d_image_is_refused_unless_singleton(tmp_path):
    series = save(tmp_path / "series.nii.gz", np.zeros((12, 10, 6, 3), dtype=np.int16))
    with pytest.raises(DataError, match=r"series\.nii\.gz: image is 4D"):
        check_image(series)
    # One volume of a NIfTI series is 3D; a 5th axis is not (MONAI would load it as 4 spatial axes).
    assert check_image(save(tmp_path / "single.nii.gz", ct_image()[..., None]))["shape"] == (12, 10, 6)
    with pytest.raises(DataError, match=r"five\.nii\.gz: image is 5D"):
        check_image(save(tmp_path / "five.nii.gz", ct_image()[..., None, None]))


def test_non_finite_intensities(tmp_path):
    _, label = good_case(tmp_path)
    image = np.zeros((12, 10, 6), dtype=np.float32)
    image[0, 0, 0] = np.nan
    image[1, 0, 0] = np.inf
    bad = save(tmp_path / "img.nii.gz", image)
    with pytest.raises(DataError, match=r"img\.nii\.gz: 2 non-finite"):
        check_case(bad, label, CLASSES)


def test_corrupt_files(tmp_path):
    image, label = good_case(tmp_path)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match=r"garbage\.nii\.gz: unreadable or corrupt image header"):
        check_image(garbage)
    # A truncated download: the header parses, the voxel data does not.
    raw = gzip.decompress(image.read_bytes())
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(raw[: len(raw) - 200]))
    check_case(truncated, label, CLASSES, read_arrays=False)  # header checks cannot see it
    with pytest.raises(DataError, match=r"truncated\.nii\.gz: unreadable or corrupt image data"):
        check_case(truncated, label, CLASSES)


def test_missing_file(tmp_path):
    image, _ = good_case(tmp_path)
    with pytest.raises(DataError, match=r"nowhere\.nii\.gz: missing file"):
        check_case(image, tmp_path / "nowhere.nii.gz", CLASSES)


def copy_dataset(src, dst):
    shutil.copytree(src, dst)
    return load_dataset(dst)


def test_check_dataset_raises_or_skips_bad_cases(phantom_dataset, tmp_path):
    ds = copy_dataset(phantom_dataset, tmp_path / "ds")
    assert check_dataset(ds).case_ids == ds.case_ids
    bad_label = ds.training[1]["label"]
    lab = nib.load(bad_label)
    values = np.asarray(lab.dataobj).copy()
    values[0, 0, 0] = 42
    nib.save(nib.Nifti1Image(values, lab.affine), str(bad_label))
    with pytest.raises(DataError, match="phantom_001.nii.gz: label values \\[42\\]"):
        check_dataset(ds)
    with pytest.warns(BadCaseWarning, match="skipping case phantom_001"):
        kept = check_dataset(ds, skip_bad=True)
    assert kept.case_ids == ["phantom_000", "phantom_002", "phantom_003"]
    assert ds.case_ids == ["phantom_000", "phantom_001", "phantom_002", "phantom_003"]  # input untouched


def test_header_problems_are_found_before_reading_any_array(phantom_dataset, tmp_path):
    ds = copy_dataset(phantom_dataset, tmp_path / "ds")
    # First case: corrupt voxel data (found only by reading); last case: shape mismatch (header only).
    first = ds.training[0]["image"]
    raw = gzip.decompress(first.read_bytes())
    first.write_bytes(gzip.compress(raw[:-1000]))
    last = ds.training[3]["label"]
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), dtype=np.uint8), np.eye(4)), str(last))
    with pytest.raises(DataError, match="phantom_003.nii.gz: label shape"):
        check_dataset(ds)
    with pytest.warns(BadCaseWarning):
        kept = check_dataset(ds, skip_bad=True)
    assert kept.case_ids == ["phantom_001", "phantom_002"]


def test_command_line_inspection_reports_and_fails_on_bad_cases(phantom_dataset, tmp_path, capsys):
    from data.__main__ import main

    assert main([str(phantom_dataset), "--stats"]) == 0
    out = capsys.readouterr().out
    assert "labelled cases: 4 (of 4), unlabelled: 1 (of 1)" in out
    assert "median [3.2, 3.2, 7.5]" in out and "foreground HU" in out
    ds = copy_dataset(phantom_dataset, tmp_path / "ds")
    ds.training[2]["label"].write_bytes(b"broken")
    assert main([str(ds.root)]) == 1
    assert "phantom_002.nii.gz: unreadable or corrupt image header" in capsys.readouterr().err
    assert main([str(ds.root), "--skip-bad"]) == 0
    assert "labelled cases: 3 (of 4)" in capsys.readouterr().out
