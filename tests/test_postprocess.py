"""Largest-connected-piece postprocessing (deploy/postprocess.py): components as scipy finds them, the pieces it
removes, the classes validation chooses, and the deploy segmenter applying what a bundle records."""
import numpy as np
import pytest
from scipy import ndimage

from deploy import BundleError, Segmenter
from deploy.postprocess import (PostprocessError, choose_largest_component, connected_components,
                                keep_largest_component, spec_classes)

FULL = np.ones((3, 3, 3))


@pytest.mark.parametrize("seed", range(6))
def test_components_are_scipys_26_connected_ones(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((23, 17, 11)) > (0.6 + 0.04 * seed)
    if seed % 2:
        mask = ndimage.binary_opening(rng.random((23, 17, 11)) > 0.45)
    ours, count = connected_components(mask)
    theirs, expected = ndimage.label(mask, structure=FULL)
    assert count == expected > 1
    assert ((ours > 0) == mask).all()
    # The same partition: every (our id, scipy id) pair occurs once per component.
    assert len(set(zip(ours[mask].tolist(), theirs[mask].tolist()))) == count


def test_a_long_winding_piece_is_one_component():
    # A serpentine: rows joined at alternating ends, 15 turns, so propagation must travel its whole length.
    mask = np.zeros((60, 40, 3), bool)
    mask[::4, :, 1] = True
    for i, x in enumerate(range(0, 56, 4)):
        mask[x:x + 5, 0 if i % 2 else 39, 1] = True
    assert connected_components(mask)[1] == ndimage.label(mask, structure=FULL)[1] == 1
    assert connected_components(np.zeros((4, 4, 4), bool))[1] == 0


def two_blobs_logits():
    """3 classes on 20^3: class 1 a 5^3 blob and a 2^3 island (class 2 second most likely there), class 2 one blob."""
    logits = np.zeros((3, 20, 20, 20), np.float32)
    logits[0] = 1.0
    logits[1, 2:7, 2:7, 2:7] = 3.0
    logits[1, 15:17, 15:17, 15:17] = 3.0
    logits[2, 15:17, 15:17, 15:17] = 2.0
    logits[2, 10:13, 2:5, 2:5] = 3.0
    return logits


def test_keep_largest_component_moves_other_pieces_to_their_next_class():
    logits = two_blobs_logits()
    before = logits.copy()
    out = keep_largest_component(logits, [1, 2])
    assert np.array_equal(logits, before)  # the input is not modified
    labels, original = out.argmax(0), logits.argmax(0)
    assert (labels[2:7, 2:7, 2:7] == 1).all() and (labels[15:17, 15:17, 15:17] == 2).all()
    assert ((labels != original) == (original == 1) & (np.indices(labels.shape)[0] >= 15)).all()
    assert keep_largest_component(logits, []) is logits
    with pytest.raises(PostprocessError, match=r"class ids \[3\]"):
        keep_largest_component(logits, [3])


def test_validation_chooses_the_classes_that_gain():
    logits = two_blobs_logits()
    ref = np.zeros((20, 20, 20), np.int64)
    ref[2:7, 2:7, 2:7] = 1  # the island of class 1 is a false positive: cleaning it helps
    ref[10:13, 2:5, 2:5] = 2
    ref[15:17, 15:17, 15:17] = 0
    gain = choose_largest_component([logits], [ref], 3)
    assert gain["largest_component"] == [1]
    assert gain["validation"]["1"]["cleaned"] == pytest.approx(1.0) and gain["validation"]["1"]["raw"] < 1.0
    # Class 2 is also in two pieces here, both real: keeping one would lose the other, so class 2 is not cleaned.
    logits2 = logits.copy()
    logits2[2, 17:19, 2:4, 2:4] = 3.0
    ref2 = ref.copy()
    ref2[17:19, 2:4, 2:4] = 2
    choice = choose_largest_component([logits2], [ref2], 3)
    assert choice["largest_component"] == [1]
    assert choice["validation"]["2"]["cleaned"] < choice["validation"]["2"]["raw"] == pytest.approx(1.0)
    with pytest.raises(PostprocessError, match="reference shape"):
        choose_largest_component([logits], [ref[:10]], 3)


def test_spec_classes_reads_and_checks_a_recorded_spec():
    assert spec_classes(None, 8) == [] and spec_classes({"largest_component": [5, 1]}, 8) == [1, 5]
    with pytest.raises(PostprocessError, match="model.json.*not foreground"):
        spec_classes({"largest_component": [0]}, 8, "model.json")
    with pytest.raises(PostprocessError, match="must be a mapping"):
        spec_classes([1, 2], 8)


SPEC = {"spacing_mm": [4.0, 4.0, 4.0], "orientation": "RAS",
        "intensity": {"mode": "scale", "hu_min": -175.0, "hu_max": 250.0, "mean": None, "std": None}}
MANIFEST = {"preprocess": SPEC, "roi_size": [16, 16, 16], "num_classes": 3, "overlap": 0.25,
            "labels": {0: "background", 1: "organ", 2: "other"}}


def blob_predictor(batch):
    """A window predictor that marks class 1 in two pieces of every window: a large block and a corner voxel pair."""
    out = np.zeros((batch.shape[0], 3, *batch.shape[2:]), np.float32)
    out[:, 0] = 1.0
    out[:, 1, 4:12, 4:12, 4:12] = 3.0
    out[:, 1, 0:2, 0:2, 0:2] = 3.0
    return out


@pytest.mark.filterwarnings("ignore::deploy.ImplausibleInputWarning")  # a blank volume, segmented with force=True
def test_segmenter_applies_the_bundles_postprocess_on_the_model_grid():
    image = np.full((16, 16, 16), 40.0, np.float32)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    raw = Segmenter.with_predictor(MANIFEST, blob_predictor).segment(image, affine, force=True)
    ids, count = ndimage.label(raw == 1, structure=FULL)
    assert count == 2
    cleaned = Segmenter.with_predictor({**MANIFEST, "postprocess": {"largest_component": [1]}},
                                       blob_predictor).segment(image, affine, force=True)
    assert ndimage.label(cleaned == 1, structure=FULL)[1] == 1
    assert (cleaned[raw != 1] == raw[raw != 1]).all() and (cleaned == 1).sum() == (raw == 1).sum() - 8
    with pytest.raises(BundleError, match="not foreground classes"):
        Segmenter.with_predictor({**MANIFEST, "postprocess": {"largest_component": [7]}}, blob_predictor)


def test_fresh_phantoms_score_a_student_after_its_own_postprocessing(tmp_path):
    """teacher.generalization scores a student.pt on fresh phantoms with the classes its ``postprocess`` names cleaned,
    as scipy's pieces give them (tests/recompute.py), and refuses the seeds of the run's and the site's phantoms."""
    import json
    from types import SimpleNamespace

    import torch

    from student import build_student, load_student, save_student
    from teacher.generalization import GeneralizationError, fresh_phantom_dice, main
    from tests.recompute import recomputed_scores

    torch.manual_seed(0)
    spec = {"spacing_mm": [6.0, 6.0, 6.0], "orientation": "RAS",
            "intensity": {"mode": "scale", "hu_min": -175.0, "hu_max": 250.0, "mean": None, "std": None}}
    labels = {0: "background", 1: "liver", 2: "spleen", 3: "right_kidney", 4: "left_kidney", 5: "pancreas",
              6: "stomach", 7: "aorta"}
    config = {"run": {"seed": 0}, "data": {"source": "phantoms", "phantom_size": [64, 64, 32],
                                           "site": {"source": "phantoms", "phantom_seed": 1000}}}
    meta = {"arch": {"name": "unet_small", "num_classes": 8, "in_channels": 1}, "roi_size": [32, 32, 32],
            "preprocess": spec, "labels": labels, "config": config,
            "postprocess": {"largest_component": [1, 2, 5], "validation": {}, "cases": 1}}
    ckpt = save_student(tmp_path / "student.pt", build_student("unet_small", 8), meta)
    model, meta = load_student(ckpt)

    for seed, match in ((0, "run's own data seed"), (1000, "site's phantom seed")):
        with pytest.raises(GeneralizationError, match=match):
            fresh_phantom_dice(model, meta, 1, seed=seed, phantom_dir=tmp_path / "p", progress=False)
    out = main(["--student", str(ckpt), "--cases", "2", "--seed", "5", "--phantom-dir", str(tmp_path / "p"),
                "--output", str(tmp_path / "fresh.json")])
    got = out["models"][str(ckpt.resolve())]
    assert got["kind"] == "student" and got["postprocess"] == [1, 2, 5] and got["cases"] == 2
    assert json.loads((tmp_path / "fresh.json").read_text())["models"][str(ckpt.resolve())]["dice"] == got["dice"]

    root = tmp_path / "p"  # the phantoms the tool wrote (its own generation is checked in test_teacher_train.py)
    items = [{"case_id": p.name.split(".")[0], "image": str(p), "label": str(root / "labelsTr" / p.name)}
             for p in sorted((root / "imagesTr").glob("*.nii.gz"))]
    data = SimpleNamespace(preprocess=spec, num_classes=8, labels=labels)
    cleaned = recomputed_scores(model, [32, 32, 32], data, items, clean=[1, 2, 5])
    raw = recomputed_scores(model, [32, 32, 32], data, items)
    assert got["dice"] == pytest.approx(cleaned["mean"]["dice"], abs=1e-6)
    assert abs(cleaned["mean"]["dice"] - raw["mean"]["dice"]) > 1e-4  # the cleaning changed something
    with pytest.raises(SystemExit, match="at least one"):
        main(["--cases", "1"])
