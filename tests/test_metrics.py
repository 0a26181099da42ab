"""Dice / NSD / HD95 on masks whose answers are known in closed form, and the summary and report."""
import csv
import math

import numpy as np
import pytest
import torch

from evaluation.metrics import MetricInputError, case_metrics, mask_metrics, summarize
from evaluation.report import format_summary, write_metrics_csv

LABELS = {0: "background", 1: "liver", 2: "spleen"}
SPACING = (1.0, 1.5, 2.5)  # anisotropic on purpose: every distance must be in mm, not voxels
SHAPE = (48, 40, 24)


def sphere(center_mm, radius_mm, shape=SHAPE, spacing=SPACING):
    """A ball of ``radius_mm`` in physical space (an ellipsoid in voxels when the spacing is anisotropic)."""
    axes = [np.arange(n) * s for n, s in zip(shape, spacing)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return np.linalg.norm(grid - np.asarray(center_mm), axis=-1) <= radius_mm


def lens_dice(radius, shift):
    """Dice of two balls of equal radius whose centres are ``shift`` apart (lens volume / ball volume)."""
    lens = math.pi * (4 * radius + shift) * (2 * radius - shift) ** 2 / 12
    return lens / (4 / 3 * math.pi * radius**3)


CENTER = np.array([24.0, 30.0, 30.0])
RADIUS = 12.0


def test_identical_masks_score_perfectly():
    label = np.zeros(SHAPE, np.uint8)
    label[sphere(CENTER, RADIUS)] = 1
    label[30:40, 5:15, 2:8] = 2
    rows = case_metrics(label, label.copy(), SPACING, LABELS, nsd_tolerance_mm=1.0)
    assert [r["class_name"] for r in rows] == ["liver", "spleen"]
    for row in rows:
        assert row["dice"] == pytest.approx(1.0)
        assert row["nsd"] == pytest.approx(1.0)
        assert row["hd95"] == pytest.approx(0.0)


def test_disjoint_masks_have_zero_dice_and_nsd():
    pred = np.zeros(SHAPE, np.uint8)
    label = np.zeros(SHAPE, np.uint8)
    pred[2:10, 2:10, 2:6] = 1
    label[30:40, 25:35, 15:20] = 1
    (row,) = case_metrics(pred, label, SPACING, {0: "background", 1: "kidney"}, nsd_tolerance_mm=2.0)
    assert row["dice"] == 0.0
    assert row["nsd"] == 0.0
    # The nearest boundary points are (30-9, 25-9, 15-5) voxels apart; HD95 is at least that far in mm.
    assert row["hd95"] >= math.dist((0, 0, 0), (21 * 1.0, 16 * 1.5, 10 * 2.5)) - 1e-6


@pytest.mark.parametrize("shift_voxels", [1, 2, 3])
def test_shifted_sphere_matches_the_analytic_answer(shift_voxels):
    # Shift along z, the 2.5 mm axis: in mm the shift is 2.5, 5.0, 7.5.
    shift_mm = shift_voxels * SPACING[2]
    label = sphere(CENTER, RADIUS).astype(np.uint8)
    pred = sphere(CENTER + [0.0, 0.0, shift_mm], RADIUS).astype(np.uint8)
    (row,) = case_metrics(torch.from_numpy(pred), label, SPACING, {0: "background", 1: "ball"}, nsd_tolerance_mm=shift_mm)

    assert row["hd95"] == pytest.approx(shift_mm, abs=0.5)
    assert row["dice"] == pytest.approx(lens_dice(RADIUS, shift_mm), abs=0.02)
    # Every boundary point is within the shift of the other boundary: NSD at that tolerance is 1.
    assert row["nsd"] == pytest.approx(1.0)


def test_nsd_below_the_shift_counts_only_the_boundary_within_tolerance():
    shift_mm = 2 * SPACING[2]
    label = sphere(CENTER, RADIUS)
    pred = sphere(CENTER + [0.0, 0.0, shift_mm], RADIUS)
    scores = {tol: mask_metrics(pred, label, SPACING, nsd_tolerance_mm=tol)["nsd"] for tol in (0.0, 1.0, 2.5, 5.0)}
    # For a ball shifted by d, the boundary distance is ~d|cos(theta)|, uniform on [0, d]: NSD ~ tol / d,
    # plus the voxels where the two boundaries coincide.
    assert scores[0.0] < scores[1.0] < scores[2.5] < scores[5.0] == pytest.approx(1.0)
    assert 0.25 < scores[2.5] < 0.75


def test_missing_classes_follow_the_documented_conventions():
    label = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    label[5:15, 5:15, 5:10] = 1  # liver: in the label, missed by the prediction
    pred[30:35, 30:35, 15:20] = 2  # spleen: predicted, absent from the label
    labels = {0: "background", 1: "liver", 2: "spleen", 3: "pancreas"}  # pancreas: in neither
    rows = {r["class_name"]: r for r in case_metrics(pred, label, SPACING, labels)}
    diagonal = float(np.linalg.norm(np.array(SHAPE) * SPACING))
    for name in ("liver", "spleen"):
        assert rows[name]["dice"] == 0.0 and rows[name]["nsd"] == 0.0
        assert rows[name]["hd95"] == pytest.approx(diagonal)
    assert all(math.isnan(rows["pancreas"][k]) for k in ("dice", "nsd", "hd95"))


def test_bad_inputs_raise_clear_errors():
    label = np.zeros((8, 8, 8), np.uint8)
    with pytest.raises(MetricInputError, match="shape"):
        case_metrics(label, np.zeros((8, 8, 9), np.uint8), SPACING, LABELS)
    with pytest.raises(MetricInputError, match="spacing_mm"):
        case_metrics(label, label, (1.0, 1.0), LABELS)
    unknown = label.copy()
    unknown[0, 0, 0] = 7
    with pytest.raises(MetricInputError, match=r"\[7\]"):
        case_metrics(unknown, label, SPACING, LABELS)
    with pytest.raises(MetricInputError, match="logits"):
        case_metrics(np.full((8, 8, 8), 0.5), label, SPACING, LABELS)


def test_summary_means_skip_absent_classes_and_weigh_classes_equally(tmp_path):
    rows = [
        {"case": "a", "class_id": 1, "class_name": "liver", "dice": 0.9, "nsd": 0.8, "hd95": 4.0},
        {"case": "a", "class_id": 2, "class_name": "spleen", "dice": math.nan, "nsd": math.nan, "hd95": math.nan},
        {"case": "b", "class_id": 1, "class_name": "liver", "dice": 0.7, "nsd": 0.6, "hd95": 6.0},
        {"case": "b", "class_id": 2, "class_name": "spleen", "dice": 0.5, "nsd": 0.4, "hd95": 10.0},
    ]
    summary = summarize(rows)
    assert summary["cases"] == 2
    assert summary["per_class"]["liver"] == pytest.approx({"dice": 0.8, "nsd": 0.7, "hd95": 5.0})
    assert summary["per_class"]["spleen"] == pytest.approx({"dice": 0.5, "nsd": 0.4, "hd95": 10.0})
    assert summary["mean"] == pytest.approx({"dice": 0.65, "nsd": 0.55, "hd95": 7.5})

    text = format_summary(summary, nsd_tolerance_mm=2.0)
    lines = text.splitlines()
    assert lines[0].split() == ["class", "Dice", "NSD@2mm", "HD95", "mm"]
    assert lines[1].split() == ["liver", "0.800", "0.700", "5.0"]
    assert any(line.split() == ["mean", "0.650", "0.550", "7.5"] for line in lines)

    path = write_metrics_csv(rows, tmp_path / "metrics.csv")
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["case", "class_id", "class_name", "dice", "nsd", "hd95"]
    assert len(table) == 4 and math.isnan(float(table[1]["dice"])) and float(table[3]["hd95"]) == 10.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # no temporary file left behind


def test_summary_of_case_metrics_end_to_end():
    label = np.zeros(SHAPE, np.uint8)
    label[sphere(CENTER, RADIUS)] = 1
    label[30:40, 5:15, 2:8] = 2
    pred = label.copy()
    pred[30:40, 5:15, 2:8] = 0  # the spleen is missed entirely
    rows = case_metrics(pred, label, SPACING, LABELS)
    summary = summarize(rows)
    assert summary["cases"] == 1
    assert summary["per_class"]["liver"]["dice"] == pytest.approx(1.0)
    assert summary["per_class"]["spleen"]["dice"] == 0.0
    assert summary["mean"]["dice"] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nsd_and_hd95_from_one_surface_pass_equal_monais_two_functions(seed):
    """The NSD and HD95 computed from one pass over the surfaces are MONAI's compute_surface_dice and
    compute_hausdorff_distance on the same masks, to float rounding, on irregular overlapping shapes."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(seed)
    ref = sphere(CENTER, RADIUS) & (rng.random(SHAPE) > 0.2)
    pred = sphere(CENTER + rng.normal(0, 3, 3), RADIUS * rng.uniform(0.7, 1.2)) | (rng.random(SHAPE) > 0.995)
    yp = torch.from_numpy(pred)[None, None].float()
    yg = torch.from_numpy(ref)[None, None].float()
    for tol in (0.0, 1.5, 4.0):
        ours = mask_metrics(pred, ref, SPACING, tol)
        nsd = compute_surface_dice(yp, yg, [tol], include_background=True, spacing=list(SPACING)).item()
        hd95 = compute_hausdorff_distance(yp, yg, include_background=True, percentile=95, spacing=list(SPACING)).item()
        assert 0.0 < nsd < 1.0 and hd95 > 1.0  # a case where both are informative
        assert ours["nsd"] == pytest.approx(nsd, abs=1e-6) and ours["hd95"] == pytest.approx(hd95, abs=1e-5)
