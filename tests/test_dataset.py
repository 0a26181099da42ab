"""Dataset layouts (MSD and nnU-Net v2 raw) and reproducible train/validation splits."""
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data.checks import DataError, check_dataset
from data.dataset import CTDataset, load_dataset, make_split

PHANTOM_CLASSES = {0: "background", 1: "liver", 2: "spleen", 3: "right_kidney", 4: "left_kidney",
                   5: "pancreas", 6: "stomach", 7: "aorta"}


def write_nnunet_copy(msd_root: Path, out: Path) -> Path:
    """Re-lay an MSD phantom dataset out as nnU-Net v2 raw (case_0000.nii.gz images, name -> id labels)."""
    msd = load_dataset(msd_root)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (out / sub).mkdir(parents=True)
    for case in msd.training:
        shutil.copy(case["image"], out / "imagesTr" / f"{case['case_id']}_0000.nii.gz")
        shutil.copy(case["label"], out / "labelsTr" / f"{case['case_id']}.nii.gz")
    for case in msd.test:
        shutil.copy(case["image"], out / "imagesTs" / f"{case['case_id']}_0000.nii.gz")
    info = {"channel_names": {"0": "CT"}, "labels": {name: k for k, name in msd.labels.items()},
            "numTraining": len(msd.training), "file_ending": ".nii.gz", "name": "PhantomNN"}
    (out / "dataset.json").write_text(json.dumps(info))
    return out


def test_msd_layout_reads_phantom_dataset(phantom_dataset):
    ds = load_dataset(phantom_dataset)
    assert ds.layout == "msd" and ds.name == "Phantom"
    assert ds.labels == PHANTOM_CLASSES and ds.num_classes == 8
    assert ds.case_ids == ["phantom_000", "phantom_001", "phantom_002", "phantom_003"]
    assert all(Path(c["image"]).is_file() and Path(c["label"]).is_file() for c in ds.training)
    assert [c["case_id"] for c in ds.test] == ["phantom_ts_000"]
    items = ds.items(["phantom_002"])
    assert items == [{"image": str(ds.training[2]["image"]), "label": str(ds.training[2]["label"]),
                      "case_id": "phantom_002"}]
    spacing = nib.load(items[0]["image"]).header.get_zooms()
    np.testing.assert_allclose(spacing, (3.2, 3.2, 7.5), rtol=1e-5)


def test_nnunet_layout_reads_the_same_cases(phantom_dataset, tmp_path):
    root = write_nnunet_copy(phantom_dataset, tmp_path / "Dataset001_Phantom")
    ds = load_dataset(root)
    msd = load_dataset(phantom_dataset)
    assert ds.layout == "nnunet" and ds.name == "PhantomNN"
    assert ds.labels == msd.labels
    assert ds.case_ids == msd.case_ids
    assert ds.training[0]["image"].name == "phantom_000_0000.nii.gz"
    assert [c["case_id"] for c in ds.test] == ["phantom_ts_000"]
    assert len(check_dataset(ds, read_arrays=False).training) == 4


def test_nnunet_refuses_multichannel_and_region_labels(tmp_path):
    base = {"labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps({**base, "channel_names": {"0": "CT", "1": "PET"}}))
    with pytest.raises(DataError, match="single-channel"):
        load_dataset(tmp_path)
    regions = {"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
               "labels": {"background": 0, "liver": 1, "liver_and_tumour": [1, 2]}}
    (tmp_path / "dataset.json").write_text(json.dumps(regions))
    with pytest.raises(DataError, match="region"):
        load_dataset(tmp_path)


def test_bad_dataset_descriptions_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing dataset.json"):
        load_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"1": "liver"},
                                                       "training": []}))
    with pytest.raises(DataError, match="background 0"):
        load_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "bg"},
                                                       "training": []}))
    with pytest.raises(DataError, match="no labelled training cases"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="unknown layout"):
        load_dataset(tmp_path, layout="kits")


def fake_dataset(n: int) -> CTDataset:
    training = [{"case_id": f"case_{i:02d}", "image": Path(f"i{i}.nii.gz"), "label": Path(f"l{i}.nii.gz")}
                for i in range(n)]
    return CTDataset("fake", Path("."), "msd", {0: "background", 1: "organ"}, training)


def test_split_is_reproducible_disjoint_and_complete():
    ds = fake_dataset(20)
    a = make_split(ds, val_fraction=0.2, seed=0)
    assert a == make_split(ds, val_fraction=0.2, seed=0)
    assert len(a["val"]) == 4 and len(a["train"]) == 16
    assert sorted(a["train"] + a["val"]) == sorted(ds.case_ids)
    assert make_split(ds, val_fraction=0.2, seed=1)["val"] != a["val"]
    # Tiny datasets still get one case on each side.
    small = make_split(fake_dataset(2), val_fraction=0.1, seed=0)
    assert len(small["train"]) == 1 and len(small["val"]) == 1


def test_saved_split_is_reused_and_a_changed_case_list_is_refused(tmp_path):
    path = tmp_path / "splits.json"
    first = make_split(fake_dataset(10), val_fraction=0.3, seed=0, path=path)
    saved = json.loads(path.read_text())
    assert saved["train"] == first["train"] and saved["seed"] == 0
    # The saved split wins over a different seed (a resumed run keeps its validation cases) ...
    assert make_split(fake_dataset(10), val_fraction=0.3, seed=99, path=path) == first
    # ... and a hand-edited split is respected.
    edited = {"train": first["train"][1:], "val": first["val"] + first["train"][:1]}
    path.write_text(json.dumps(edited))
    assert make_split(fake_dataset(10), path=path) == {"train": sorted(edited["train"]), "val": sorted(edited["val"]),
                                                       "test": []}
    with pytest.raises(DataError, match="does not match the dataset's cases"):
        make_split(fake_dataset(11), path=path)
