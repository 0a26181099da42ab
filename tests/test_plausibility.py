"""Input checks, training side and deploy side, on the same constructed NIfTI files.

1. Structure: ``data.checks`` and ``deploy`` accept and refuse the same files (one implementation, in
   ``deploy.volume_io``): 3D or X x Y x Z x 1, real numbers, finite, a non-empty grid, an invertible affine.
2. Plausibility (``deploy.plausibility``): a volume that does not look like the CT the model was trained for
   (not HU, no body, too few voxels, far too small for the window) is refused by the runtime and by the data
   stage alike; unusual but usable ones (oblique, small field of view) are segmented with a warning that the
   Python API, the command line and its ``--report`` carry; ``--force`` / ``force=True`` overrides a refusal.

Deploy runs through ``Segmenter.segment_file`` (a stand-in predictor: the checks come before the model) and
through ``python -m deploy.infer`` on a one-layer ONNX bundle built here (no torch, no export).
"""
import gzip
import json
import warnings

import nibabel as nib
import numpy as np
import pytest

from data.checks import BadCaseWarning, DataError, PlausibilityWarning, check_dataset, check_image
from data.dataset import load_dataset
from data.phantom import make_phantom
from data.phantom_dataset import write_dataset
from deploy import ImplausibleInputError, ImplausibleInputWarning, InputVolumeError, Segmenter, assess_ct, file_sha256

SPEC = {"spacing_mm": [4.0, 4.0, 4.0], "orientation": "RAS",
        "intensity": {"mode": "scale", "hu_min": -175.0, "hu_max": 250.0, "mean": None, "std": None}}
ROI = [32, 32, 32]  # 128 mm at 4 mm
LABELS = {0: "background", 1: "organ", 2: "other"}
MANIFEST = {"preprocess": SPEC, "roi_size": ROI, "num_classes": 3, "labels": LABELS, "overlap": 0.25,
            "crop_foreground": {"threshold_hu": -500.0, "margin": 4}}
SIZE = (32, 32, 16)  # phantom: 6.4 x 6.4 x 15 mm voxels, 205 x 205 x 240 mm


def predictor(batch):
    """Logits favouring background everywhere: what the model says does not matter here."""
    out = np.zeros((batch.shape[0], 3, *batch.shape[2:]), np.float32)
    out[:, 0] = 1.0
    return out


def segmenter():
    return Segmenter.with_predictor(MANIFEST, predictor, source="test manifest")


@pytest.fixture(scope="module")
def phantom():
    image, label, affine = make_phantom(0, SIZE)
    return image, label, affine


def save(path, data, affine, **kwargs):
    nib.save(nib.Nifti1Image(data, affine, **kwargs), str(path))
    return path


def rotation_z(degrees):
    t = np.radians(degrees)
    r = np.eye(4)
    r[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return r


# ---------------------------------------------------------------------------------------------------------------
# 1. The same files, the same verdict (and the same reason) from the training checks and the runtime.

def _uint16_with_intercept(path, image, affine):
    img = nib.Nifti1Image((image.astype(np.int32) + 1024).astype(np.uint16), affine)
    img.header.set_slope_inter(1.0, -1024.0)  # stored unsigned, scaled back to HU by the header: a correct CT
    nib.save(img, str(path))
    return path


def _singular(path, image, affine):
    bad = affine.copy()
    bad[:3, 2] = bad[:3, 1]  # two voxel axes along the same direction
    img = nib.Nifti1Image(image, None)
    img.set_sform(bad, code=1)
    nib.save(img, str(path))
    return path


def _nan_spacing(path, image, affine):
    img = nib.Nifti1Image(image, None)  # qform from pixdim only
    img.header["pixdim"][1:4] = [3.2, np.nan, 7.5]
    nib.save(img, str(path))
    return path


def _rgb(path, image, affine):
    rgb = np.zeros(image.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = np.clip(image // 8 + 128, 0, 255)
    nib.save(nib.Nifti1Image(rgb, affine), str(path))
    return path


def _truncated(path, image, affine):
    save(path, image, affine)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-500]))
    return path


def _with_nan(image):
    out = image.astype(np.float32)
    out[3, 4, 5] = np.nan
    return out


def _with_inf(image):
    out = image.astype(np.float32)
    out[3, 4, 5] = np.inf
    return out


# (name, file name, writer(path, image, affine), accepted, old_disagreement): the last says which side accepted it
# before the two were made one ("data": the training checks let it through, deploy refused it).
STRUCTURE_CASES = [
    ("int16 3D", "int16.nii.gz", lambda p, i, a: save(p, i, a), True, None),
    ("float64 3D", "float64.nii", lambda p, i, a: save(p, i.astype(np.float64), a), True, None),
    ("uint16 + header intercept", "u16.nii.gz", _uint16_with_intercept, True, None),
    ("X x Y x Z x 1", "single.nii.gz", lambda p, i, a: save(p, i[..., None], a), True, None),
    ("X x Y x Z x 1 x 1", "five.nii.gz", lambda p, i, a: save(p, i[..., None, None], a), False, "data"),
    ("X x Y x Z x 3", "series.nii.gz", lambda p, i, a: save(p, np.stack([i] * 3, -1), a), False, None),
    ("2D", "slice.nii.gz", lambda p, i, a: save(p, i[:, :, 5], a), False, None),
    ("zero-size axis", "empty.nii.gz", lambda p, i, a: save(p, i[:, :0], a), False, "data"),
    ("NaN voxel", "nan.nii.gz", lambda p, i, a: save(p, _with_nan(i), a), False, None),
    ("inf voxel", "inf.nii.gz", lambda p, i, a: save(p, _with_inf(i), a), False, None),
    ("complex voxels", "complex.nii.gz", lambda p, i, a: save(p, i.astype(np.complex64), a), False, "data"),
    ("RGB voxels", "rgb.nii.gz", _rgb, False, None),
    ("singular affine", "singular.nii.gz", _singular, False, "data"),
    ("NaN spacing", "nanspacing.nii.gz", _nan_spacing, False, "data"),
    ("Analyze-style pair", "pair.img", lambda p, i, a: nib.save(nib.Nifti1Pair(i, a), str(p)) or p, False, "data"),
    ("MGH", "brain.mgz", lambda p, i, a: nib.save(nib.MGHImage(i.astype(np.float32), a), str(p)) or p, False, "data"),
    ("truncated", "truncated.nii.gz", _truncated, False, None),
    ("not an image", "garbage.nii.gz", lambda p, i, a: p.write_bytes(b"not an image") and p, False, None),
    ("missing", "missing.nii.gz", lambda p, i, a: p, False, None),
    # readable, not plausible: both sides now apply the same judgement (both accepted it before)
    ("normalised [0, 1]", "normalised.nii.gz", lambda p, i, a: save(p, _min_max(i), a), False, None),
    ("oblique (warned)", "oblique.nii.gz", lambda p, i, a: save(p, i, rotation_z(25) @ a), True, None),
]


def _outcome(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except (DataError, InputVolumeError) as exc:
            return False, str(exc), caught
    return True, None, caught


def _reason(message):
    """The problem, without the file name and without the side's own override hint."""
    return message.split(": ", 1)[1].split(" (if it is a real CT")[0]


@pytest.mark.parametrize("name,filename,write,accepted,_old", STRUCTURE_CASES, ids=[c[0] for c in STRUCTURE_CASES])
def test_training_checks_and_runtime_agree_on_the_same_file(phantom, tmp_path, name, filename, write, accepted, _old):
    image, _, affine = phantom
    path = write(tmp_path / filename, image, affine)
    out = tmp_path / "mask.nii.gz"
    data_ok, data_msg, data_warned = _outcome(lambda: check_image(path))
    deploy_ok, deploy_msg, deploy_warned = _outcome(lambda: segmenter().segment_file(path, out))
    assert (data_ok, deploy_ok) == (accepted, accepted), (name, data_msg, deploy_msg)
    assert out.exists() == accepted
    if not accepted:
        assert filename in data_msg and filename in deploy_msg, (data_msg, deploy_msg)
        if name not in ("truncated", "not an image", "missing"):  # reading errors are worded by each side
            assert _reason(data_msg) == _reason(deploy_msg)
    plausibility_warnings = lambda caught: [str(w.message) for w in caught if issubclass(w.category, ImplausibleInputWarning)]
    assert bool(plausibility_warnings(data_warned)) == bool(plausibility_warnings(deploy_warned)) == name.endswith("(warned)")


def test_a_labelled_case_gets_the_same_structural_rules(phantom, tmp_path):
    from data.checks import check_case

    image, label, affine = phantom
    img = save(tmp_path / "img.nii.gz", image[..., None, None], affine)
    lab = save(tmp_path / "lab.nii.gz", label, affine)
    with pytest.raises(DataError, match=r"img\.nii\.gz: image is 5D"):
        check_case(img, lab, dict(enumerate(range(8))), read_arrays=False)


# ---------------------------------------------------------------------------------------------------------------
# 2. Plausibility: constructed inputs, the same verdict from the runtime and from the data stage.

def _mr_like(image):
    rng = np.random.default_rng(1)
    body = image > -500
    mr = np.where(body, 0.5 * (image.astype(np.float32) + 1000.0), 0.0) + np.abs(rng.normal(0, 8, image.shape))
    return mr.astype(np.float32)  # 0 outside, ~450..650 inside: positive only, no air at -1000


def _min_max(image):
    image = image.astype(np.float32)
    return (image - image.min()) / (image.max() - image.min())  # exactly [0, 1]


def _all_air(image):
    rng = np.random.default_rng(2)
    return np.round(-1000 + rng.normal(0, 15, image.shape)).astype(np.int16)


# (name, transform(image, label, affine) -> (image, label, affine), deploy verdict, codes, data-stage verdict
# without the model's window (it has no model yet), with it)
PLAUSIBILITY_CASES = [
    ("phantom", lambda i, l, a: (i, l, a), "accept", set(), "accept"),
    ("normalised [0, 1]", lambda i, l, a: (_min_max(i), l, a), "refuse", {"not_hu"}, "refuse"),
    ("all air", lambda i, l, a: (_all_air(i), l, a), "refuse", {"no_body"}, "refuse"),
    ("MR-like, positive only", lambda i, l, a: (_mr_like(i), l, a), "refuse", {"not_hu"}, "refuse"),
    ("8-bit 0..255", lambda i, l, a: (np.clip((i + 1024) // 8, 0, 255).astype(np.uint8), l, a), "refuse",
     {"not_hu"}, "refuse"),
    ("2 slices", lambda i, l, a: (i[:, :, 7:9], l[:, :, 7:9], a), "refuse", {"too_few_voxels"}, "refuse"),
    ("unsigned CT 0..4095 (intercept missing)",
     lambda i, l, a: ((i.astype(np.int32) + 1024).astype(np.uint16), l, a), "refuse", {"unsigned_ct"}, "refuse"),
    ("oblique 25 degrees", lambda i, l, a: (i, l, rotation_z(25) @ a), "warn", {"oblique"}, "warn"),
    ("small field of view (4 slices, 60 mm)", lambda i, l, a: (i[:, :, 6:10], l[:, :, 6:10], a), "warn",
     {"small_fov"}, "accept"),
]


def _mini_dataset(root, image, label, affine, labelled):
    """A 2-case phantom dataset (+1 unlabelled) whose phantom_001 (labelled) or unlabelled case is ``image``."""
    write_dataset(root, cases=2, test_cases=1, seed=0, size=SIZE)
    if labelled:
        save(root / "imagesTr" / "phantom_001.nii.gz", image, affine)
        save(root / "labelsTr" / "phantom_001.nii.gz", label, affine)
    else:
        save(root / "imagesTs" / "phantom_ts_000.nii.gz", image, affine)
    return load_dataset(root)


def _data_verdict(dataset, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            check_dataset(dataset, **kwargs)
        except DataError as exc:
            return "refuse", str(exc)
    plausibility = [str(w.message) for w in caught if issubclass(w.category, PlausibilityWarning)]
    return ("warn" if plausibility else "accept"), plausibility


@pytest.mark.parametrize("name,transform,verdict,codes,data_verdict", PLAUSIBILITY_CASES,
                         ids=[c[0] for c in PLAUSIBILITY_CASES])
def test_constructed_inputs_get_the_same_judgement_from_runtime_and_data_stage(phantom, tmp_path, name, transform,
                                                                               verdict, codes, data_verdict):
    image, label, affine = transform(*phantom)
    # the judgement itself, with the model's window (deploy) and without (the data stage)
    assessment = assess_ct(image.astype(np.float32), affine, "case", spacing_mm=SPEC["spacing_mm"], roi_size=ROI)
    assert (assessment.verdict, {f.code for f in assessment.findings}) == (verdict, codes), assessment.findings
    assert assess_ct(image.astype(np.float32), affine, "case").verdict == data_verdict

    # deploy: Segmenter.segment_file refuses before anything is computed, or segments with a warning
    path = save(tmp_path / "ct.nii.gz", image, affine)
    out = tmp_path / "mask.nii.gz"
    seg = segmenter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if verdict == "refuse":
            with pytest.raises(ImplausibleInputError, match=r"ct\.nii\.gz: does not look like a CT") as info:
                seg.segment_file(path, out)
            assert {f.code for f in info.value.assessment.refusals} == codes
            assert not out.exists()
        else:
            seg.segment_file(path, out)
            assert out.exists() and seg.last_check.verdict == verdict
    warned = [w for w in caught if issubclass(w.category, ImplausibleInputWarning)]
    assert len(warned) == (len(codes) if verdict == "warn" else 0)
    assert all("ct.nii.gz" in str(w.message) for w in warned)

    # the data stage: a labelled and an unlabelled case, refused (naming the file) or kept (with a warning)
    for labelled in (True, False):
        ds = _mini_dataset(tmp_path / f"ds_{labelled}", image, label, affine, labelled)
        bad_file = "phantom_001.nii.gz" if labelled else "phantom_ts_000.nii.gz"
        got, detail = _data_verdict(ds)
        assert got == data_verdict, (labelled, detail)
        got_with_window, _ = _data_verdict(ds, spacing_mm=SPEC["spacing_mm"], roi_size=ROI)
        assert got_with_window == verdict  # given the window, the data stage judges exactly as the runtime
        if data_verdict == "refuse":
            assert bad_file in detail and "does not look like a CT" in detail
            with pytest.warns(BadCaseWarning, match="skipping case phantom_"):
                kept = check_dataset(ds, skip_bad=True)
            assert len(kept.training) + len(kept.test) == 2  # the bad one is dropped, the others kept
        elif data_verdict == "warn":
            assert all(bad_file in m for m in detail)


def test_force_turns_refusals_into_warnings_in_runtime_and_data_stage(phantom, tmp_path):
    image, label, affine = phantom
    unsigned = (image.astype(np.int32) + 1024).astype(np.uint16)
    path = save(tmp_path / "unsigned.nii.gz", unsigned, affine)
    seg = segmenter()
    with pytest.warns(ImplausibleInputWarning, match="unsigned.nii.gz: segmented only because forced.*rescale intercept"):
        seg.segment_file(path, tmp_path / "mask.nii.gz", force=True)
    assert (tmp_path / "mask.nii.gz").exists() and seg.last_check.verdict == "forced"
    with pytest.warns(ImplausibleInputWarning, match="forced"):
        assert seg.segment(unsigned, affine, force=True).shape == unsigned.shape
    assert seg.check(unsigned, affine).refused and not seg.check(unsigned, affine, force=True).refused

    ds = _mini_dataset(tmp_path / "ds", unsigned, label, affine, labelled=True)
    with pytest.raises(DataError, match="phantom_001.nii.gz: does not look like a CT.*force=True"):
        check_dataset(ds)
    with pytest.warns(PlausibilityWarning, match="phantom_001.nii.gz: segmented only because forced"):
        assert check_dataset(ds, force=True).case_ids == ["phantom_000", "phantom_001"]


def test_the_same_raw_numbers_are_a_ct_once_the_header_carries_the_intercept(phantom, tmp_path):
    image, _, affine = phantom
    raw = (image.astype(np.int32) + 1024).astype(np.uint16)
    wrong = save(tmp_path / "no_intercept.nii.gz", raw, affine)
    right = _uint16_with_intercept(tmp_path / "intercept.nii.gz", image, affine)
    with pytest.raises(DataError, match="no_intercept.nii.gz: .*scl_inter = -1024"):
        check_image(wrong)
    assert check_image(right)["plausibility"] == "accept"
    segmenter().segment_file(right, tmp_path / "mask.nii.gz")


@pytest.mark.parametrize("size", [(8, 8, 8), (16, 16, 8), (64, 64, 32), (160, 128, 48)])
def test_synthetic_phantoms_are_plausible_for_the_demo_and_test_models(size):
    image, _, affine = make_phantom(3, size)
    for spacing, roi in ((SPEC["spacing_mm"], ROI), ([4.0, 4.0, 4.0], [64, 64, 32]), ([4.0, 4.0, 4.0], [48, 48, 48])):
        assessment = assess_ct(image, affine, "phantom", spacing_mm=spacing, roi_size=roi)
        assert assessment.verdict == "accept", assessment.findings


def test_the_judgement_reads_a_large_volume_quickly():
    import time

    image = np.full((512, 512, 160), -1000, np.int16)
    image[100:400, 120:380, :] = 40
    start = time.perf_counter()
    assessment = assess_ct(image, np.diag([0.7, 0.7, 2.5, 1.0]), "big", spacing_mm=[1.5, 1.5, 2.0], roi_size=[96] * 3)
    assert assessment.verdict == "accept"
    assert time.perf_counter() - start < 5.0  # about 0.3 s here; the model takes minutes on such a volume


# ---------------------------------------------------------------------------------------------------------------
# 3. The command line: refusal with exit code 2 and no mask, --force, warnings in the summary and the report.

@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A valid deploy bundle around a one-layer ONNX model (a 1x1x1 convolution), built without torch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path_factory.mktemp("tiny_bundle")
    weight = numpy_helper.from_array(np.array([-1.0, 0.0, 1.0], np.float32).reshape(3, 1, 1, 1, 1), "w")
    bias = numpy_helper.from_array(np.array([0.5, 0.0, 0.0], np.float32), "b")
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w", "b"], ["logits"])], "tiny",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, *ROI])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, *ROI])], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    manifest = {**MANIFEST, "format_version": 1, "labels": {str(k): v for k, v in LABELS.items()}, "batch": 1,
                "input_name": "image", "output_name": "logits", "models": {"onnxruntime": {"fp32": "model.onnx"}},
                "files": {"model.onnx": file_sha256(folder / "model.onnx")}}
    (folder / "model.json").write_text(json.dumps(manifest))
    return folder


def _infer(bundle, path, out, *extra):
    from deploy.infer import main

    return main(["--bundle", str(bundle), "--input", str(path), "--output", str(out), "--runtime", "onnxruntime",
                 "--threads", "1", *extra])


def test_cli_refuses_an_implausible_volume_with_exit_2_a_reason_and_a_report(tiny_bundle, phantom, tmp_path, capsys):
    image, _, affine = phantom
    path = save(tmp_path / "normalised.nii.gz", _min_max(image), affine)
    out, report = tmp_path / "mask.nii.gz", tmp_path / "report.json"
    assert _infer(tiny_bundle, path, out, "--report", str(report)) == 2
    err = capsys.readouterr().err
    assert "normalised.nii.gz: does not look like a CT" in err and "not HU" in err and "--force" in err
    assert not out.exists()
    written = json.loads(report.read_text())
    assert written["status"] == "refused" and written["input_check"]["verdict"] == "refuse"
    assert [f["code"] for f in written["input_check"]["findings"]] == ["not_hu"]

    assert _infer(tiny_bundle, path, out, "--report", str(report), "--force") == 0
    captured = capsys.readouterr()
    assert out.exists() and "input check: forced (not_hu)" in captured.out
    assert "warning: " in captured.err and "segmented only because forced" in captured.err
    written = json.loads(report.read_text())
    assert written["status"] == "segmented" and written["forced"] and written["input_check"]["verdict"] == "forced"
    assert written["warnings"] and written["shape"] == list(image.shape)


def test_cli_segments_a_plausible_or_unusual_volume_and_says_what_it_saw(tiny_bundle, phantom, tmp_path, capsys):
    image, _, affine = phantom
    plain = save(tmp_path / "plain.nii.gz", image, affine)
    assert _infer(tiny_bundle, plain, tmp_path / "plain_mask.nii.gz") == 0
    captured = capsys.readouterr()
    assert "input check: accept" in captured.out and "warning" not in captured.err
    tilted = save(tmp_path / "tilted.nii.gz", image, rotation_z(25) @ affine)
    report = tmp_path / "tilted.json"
    assert _infer(tiny_bundle, tilted, tmp_path / "tilted_mask.nii.gz", "--report", str(report)) == 0
    captured = capsys.readouterr()
    assert "input check: warn (oblique)" in captured.out
    assert "warning: " in captured.err and "tilted.nii.gz" in captured.err and "degrees off" in captured.err
    written = json.loads(report.read_text())
    assert written["input_check"]["verdict"] == "warn" and written["input_check"]["stats"]["obliquity_deg"] > 20
    # a structurally bad file is still an error with exit code 2, and the report says so
    assert _infer(tiny_bundle, tmp_path / "nowhere.nii.gz", tmp_path / "m.nii.gz", "--report", str(report)) == 2
    assert json.loads(report.read_text())["status"] == "error"
