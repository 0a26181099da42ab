"""Train / validation / test: validation chooses, test is scored once, and nothing else reads it."""
import json

import pytest

from data.checks import DataError
from data.dataset import make_split
from tests.test_dataset import fake_dataset


def test_three_way_split_is_disjoint_complete_reproducible_and_saved(tmp_path):
    ds = fake_dataset(50)
    path = tmp_path / "splits.json"
    split = make_split(ds, val_fraction=0.1, test_fraction=0.2, seed=0, path=path)
    assert [len(split[k]) for k in ("train", "val", "test")] == [35, 5, 10]
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(ds.case_ids)
    assert not set(split["test"]) & (set(split["train"]) | set(split["val"]))
    assert split == make_split(ds, val_fraction=0.1, test_fraction=0.2, seed=0)
    saved = json.loads(path.read_text())
    assert saved["test"] == split["test"] and saved["test_fraction"] == 0.2
    # A saved split wins (a resumed run keeps its test cases) ...
    assert make_split(ds, val_fraction=0.3, test_fraction=0.1, seed=5, path=path) == split
    # ... and a tiny dataset still gets a case in each split.
    tiny = make_split(fake_dataset(3), val_fraction=0.1, test_fraction=0.1, seed=0)
    assert [len(tiny[k]) for k in ("train", "val", "test")] == [1, 1, 1]


def test_a_saved_two_way_split_is_refused_when_a_test_split_is_asked_for(tmp_path):
    ds = fake_dataset(10)
    path = tmp_path / "splits.json"
    make_split(ds, val_fraction=0.2, seed=0, path=path)           # an older run: train / val only
    with pytest.raises(DataError, match="no test cases"):
        make_split(ds, val_fraction=0.2, test_fraction=0.2, seed=0, path=path)
    split = json.loads(path.read_text())
    split["test"] = split["val"][:1]
    path.write_text(json.dumps(split))
    with pytest.raises(DataError, match="both val and test"):
        make_split(ds, val_fraction=0.2, test_fraction=0.2, path=path)
    with pytest.raises(DataError, match="must leave training cases"):
        make_split(ds, val_fraction=0.5, test_fraction=0.5)


def test_prepared_data_scores_the_test_split_and_calibrates_on_training_cases(tmp_path, monkeypatch):
    """The data stage writes all three splits; evaluation, benchmark and export read the right one."""
    from benchmarks.latency import run_dir_cases
    from configs import load_config
    from data.prepare import PreparedData, prepare_data

    cfg = load_config("configs/demo.yaml", ["data.site.source=null", "data.phantom_cases=8", "data.phantom_test_cases=1",
                                             "data.phantom_size=[48,40,24]", "data.val_fraction=0.25",
                                             "data.test_fraction=0.25"])
    prepared = prepare_data(cfg, tmp_path / "data", progress=False)
    assert (len(prepared.train), len(prepared.val), len(prepared.test), len(prepared.unlabelled)) == (4, 2, 2, 1)
    again = PreparedData.load(tmp_path / "data" / "data.json")
    assert again.test == prepared.test and again.scoring_split() == ("test", prepared.test)
    ids = lambda cases: {c["case_id"] for c in cases}
    assert not ids(prepared.test) & (ids(prepared.train) | ids(prepared.val))
    # The benchmark's Dice column reads the test cases of a run folder.
    split, cases = run_dir_cases(tmp_path)
    assert split == "test" and cases == [(c["image"], c["label"]) for c in prepared.test]
    # A run without a test split falls back to validation, and says so.
    no_test = PreparedData(**{**prepared.__dict__, "test": []})
    assert no_test.scoring_split() == ("val", prepared.val)


def test_export_calibration_draws_only_from_the_cases_it_is_given(tmp_path):
    from data.phantom_dataset import write_dataset
    from data.dataset import load_dataset
    from export.calibration import case_crops

    root = write_dataset(tmp_path / "ph", cases=3, seed=0, size=(48, 40, 24))
    items = load_dataset(root).items()
    spec = {"spacing_mm": [4.0, 4.0, 4.0], "orientation": "RAS",
            "intensity": {"mode": "scale", "hu_min": -175.0, "hu_max": 250.0, "mean": None, "std": None}}
    one = case_crops(items[:1], spec, [16, 16, 16], 4, seed=0)
    other = case_crops(items[1:2], spec, [16, 16, 16], 4, seed=0)
    assert len(one) == 4 and all(c.shape == (1, 16, 16, 16) for c, _ in one)
    assert any(not (a == b).all() for (a, _), (b, _) in zip(one, other))
    with pytest.raises(ValueError, match="none of the given cases has a label"):
        case_crops([{"image": items[0]["image"]}], spec, [16, 16, 16], 2)


def test_the_students_site_data_comes_from_another_seed_stream_with_a_chosen_number_of_labels(tmp_path):
    """data.site: the teacher's corpus is split as before; the students learn from the site's cases (a seeded
    choice of ``labelled`` keep their label), which are not the corpus's phantoms; the full-label regime gives
    back the withheld labels."""
    import nibabel as nib
    import numpy as np

    from configs import load_config
    from data.prepare import DataStageError, PreparedData, prepare_data
    from pipeline.kd_regimes import full_label_data

    base = ["data.phantom_cases=6", "data.phantom_test_cases=1", "data.phantom_size=[48,40,24]",
            "data.val_fraction=0.2", "data.test_fraction=0.2"]
    cfg = load_config("configs/demo.yaml", base + ["data.site.phantom_cases=5", "data.site.labelled=2"])
    prepared = prepare_data(cfg, tmp_path / "data", progress=False)
    labelled, unlabelled = prepared.student_cases()
    assert (len(labelled), len(unlabelled)) == (2, 3)
    assert all("label" in c for c in labelled) and not any("label" in c for c in unlabelled)
    assert all(c["case_id"].startswith("site_") for c in labelled + unlabelled)
    assert prepared.site["labels_withheld"] == 3 and prepared.site["seed"] == 1000
    # Another seed stream: the site's first phantom is not the corpus's first phantom.
    corpus_img = nib.load(str(tmp_path / "data" / "phantoms" / "imagesTr" / "phantom_000.nii.gz")).get_fdata()
    site_img = nib.load(str(tmp_path / "data" / "site" / "imagesTr" / "phantom_000.nii.gz")).get_fdata()
    assert not np.array_equal(corpus_img, site_img)
    # Validation and test stay the corpus's; the teacher's training split is untouched by the site.
    assert (len(prepared.train), len(prepared.val), len(prepared.test)) == (4, 1, 1)
    assert PreparedData.load(tmp_path / "data" / "data.json").student_cases() == (labelled, unlabelled)
    full = full_label_data(prepared)
    assert len(full.site_labelled) == 5 and full.site_unlabelled == [] and full.student_cases()[0][0]["label"]
    assert {c["case_id"] for c in full.site_labelled} == {c["case_id"] for c in labelled + unlabelled}
    # Without a site the students learn from the corpus's training split and unlabelled cases.
    plain = PreparedData(**{**prepared.__dict__, "site": None})
    assert plain.student_cases() == (prepared.train, prepared.unlabelled)

    with pytest.raises(DataStageError, match="phantom_seed=0 is the corpus's seed"):
        prepare_data(load_config("configs/demo.yaml", base + ["data.site.phantom_seed=0"]), tmp_path / "d2", progress=False)
    with pytest.raises(DataStageError, match=r"labelled=9.*has 5 labelled cases"):
        prepare_data(load_config("configs/demo.yaml", base + ["data.site.phantom_cases=5", "data.site.labelled=9"]),
                     tmp_path / "d3", progress=False)
    # A site dataset with other classes than the corpus's is refused before anything trains on it.
    from data.phantom_dataset import write_dataset

    other = write_dataset(tmp_path / "gallbladder", cases=2, seed=3, size=(48, 40, 24), label_gallbladder=True)
    with pytest.raises(DataStageError, match="differ from the corpus's"):
        prepare_data(load_config("configs/demo.yaml", base + [f"data.site.source={other}"]), tmp_path / "d4", progress=False)
