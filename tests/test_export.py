"""Export: ONNX and OpenVINO reproduce the PyTorch student, INT8 keeps its Dice drop within bound, and the
bundle is complete, checksummed and published atomically."""
import json

import numpy as np
import onnx
import pytest
import torch

from deploy import Segmenter, load_bundle
from export import ExportError, build_bundle
from export.calibration import dataset_crops
from student import build_student, save_student

SPEC = {"spacing_mm": [4.0, 4.0, 4.0], "orientation": "RAS",
        "intensity": {"mode": "scale", "hu_min": -175.0, "hu_max": 250.0, "mean": None, "std": None}}


def _student(path, name, roi, dataset):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    labels = {int(k): v for k, v in json.loads((dataset / "dataset.json").read_text())["labels"].items()}
    return save_student(path, build_student(name, len(labels)),
                        {"arch": {"name": name, "num_classes": len(labels), "in_channels": 1}, "roi_size": roi,
                         "preprocess": SPEC, "labels": labels, "step": 3, "lambda_kd": 0.5})


@pytest.mark.slow
def test_swinunetr_tiny_exports_with_logit_parity_on_onnxruntime_and_openvino(phantom_dataset, tmp_path):
    # Batch 1 at once, as the demo exports SwinUNETR (export.dynamic_batch: false; its dynamic batch was rejected on
    # every demo run, and each export is most of this test); the dynamic-batch check runs on unet_small below.
    ckpt = _student(tmp_path / "student.pt", "swinunetr_tiny", [64, 32, 32], phantom_dataset)
    bundle = build_bundle(ckpt, tmp_path / "bundle", calibration=phantom_dataset, int8=False, calibration_crops=0,
                          validation_crops=2, dynamic_batch=False, log=lambda *_: None)
    meta = load_bundle(bundle)
    parity = meta["parity"]
    assert parity["crops"] == "preprocessed dataset crops"
    for runtime in ("onnxruntime_fp32", "openvino_fp32"):
        assert parity[runtime]["max_abs_diff"] < 1e-3, parity
        assert parity[runtime]["argmax_agreement"] > 0.999
    model = onnx.load(str(bundle / "model.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert not [p for p in bundle.iterdir() if p.suffix not in (".onnx", ".json") and p.name != "openvino"]
    assert meta["batch"] == 1 and meta["input_shape"] == [1, 1, 64, 32, 32]
    assert meta["student"]["arch"]["name"] == "swinunetr_tiny" and 4.0e6 < meta["student"]["params"] < 4.2e6
    assert meta["student"]["gflops"] > 0 and set(meta["versions"]) >= {"torch", "monai", "onnx", "onnxruntime", "openvino", "nncf"}
    assert sorted(meta["files"]) == ["model.onnx", "openvino/model_fp32.bin", "openvino/model_fp32.xml"]
    assert meta["models"]["openvino"]["fp32"] == "openvino/model_fp32.xml" and "int8" not in meta["models"]["openvino"]

    # The INT8 export's float32 modules (student.INT8_FP32_MODULES) are found in the IR by their weights' names.
    import openvino as ov

    from export.int8 import ops_of_modules
    from student import INT8_FP32_MODULES

    ir = ov.Core().read_model(str(bundle / "openvino" / "model_fp32.xml"))
    kept = ops_of_modules(ir, INT8_FP32_MODULES["swinunetr_tiny"])
    assert len(kept) == 2
    assert {ir_op.get_type_name() for ir_op in ir.get_ordered_ops() if ir_op.get_friendly_name() in kept} == {"Convolution"}
    assert len(ops_of_modules(ir, ["decoder2"])) > 2, "a prefix takes the whole module"
    with pytest.raises(ValueError, match=r"no operation .* under \['decoder9.conv'\]"):
        ops_of_modules(ir, ["decoder2.conv_block.conv1", "decoder9.conv"])


def test_int8_accuracy_control_keeps_the_dice_drop_within_bound(phantom_dataset, tmp_path):
    ckpt = _student(tmp_path / "student.pt", "unet_small", [32, 32, 32], phantom_dataset)
    calibration = [crop for crop, _ in dataset_crops(phantom_dataset, SPEC, [32, 32, 32], 4, seed=0)]
    # No labels: the FP32 model's own argmax is the reference, so any INT8 error shows as a Dice drop.
    validation = [crop for crop, _ in dataset_crops(phantom_dataset, SPEC, [32, 32, 32], 3, seed=1)]
    bundle = build_bundle(ckpt, tmp_path / "bundle", calibration=calibration, validation=validation, int8=True,
                          max_dice_drop=0.01, log=lambda *_: None)
    meta = load_bundle(bundle)
    report = meta["int8"]["openvino"]
    assert report["fp32_dice"] == pytest.approx(1.0)
    assert report["within_bound"] and report["dice_drop"] <= 0.01
    assert report["enforced"] and report["offered"] and report["method"] == "nncf.quantize_with_accuracy_control"
    assert report["fake_quantize_ops"] > 0, "accuracy control fell back on every layer"
    assert meta["models"]["openvino"]["int8"] == "openvino/model_int8.xml"

    # The runtime's INT8 model agrees with its FP32 one on a whole volume.
    image_path = phantom_dataset / "imagesTr" / "phantom_001.nii.gz"
    fp32 = Segmenter(bundle, "openvino", "fp32").segment_file(image_path, tmp_path / "fp32.nii.gz")
    int8 = Segmenter(bundle, "openvino", "int8").segment_file(image_path, tmp_path / "int8.nii.gz")
    assert (fp32 == int8).mean() > 0.9

    ort = meta["int8"]["onnxruntime"]
    assert ort["fp32_patch_s"] > 0 and ort["int8_patch_s"] > 0
    assert ort["offered"] == (ort["int8_patch_s"] < ort["fp32_patch_s"] and ort["dice_drop"] <= 0.01)
    assert (bundle / "model_int8.onnx").exists() == ort["offered"]


def test_int8_bound_is_not_enforced_below_the_fp32_dice_floor(phantom_dataset, tmp_path):
    from export.int8 import quantize_openvino
    import openvino as ov

    ckpt = _student(tmp_path / "student.pt", "unet_small", [32, 32, 32], phantom_dataset)
    bundle = build_bundle(ckpt, tmp_path / "bundle", calibration=phantom_dataset, int8=False, calibration_crops=2,
                          validation_crops=0, onnxruntime_int8=False, dynamic_batch=False, log=lambda *_: None)
    meta = load_bundle(bundle)  # export.dynamic_batch: false exports batch 1 once, with no dynamic-batch check
    assert meta["batch"] == 1 and meta["input_shape"][0] == 1 and "not tried" in meta["parity"]["dynamic_batch_check"]
    model = ov.Core().read_model(str(bundle / "openvino" / "model_fp32.xml"))
    calibration = [crop for crop, _ in dataset_crops(phantom_dataset, SPEC, [32, 32, 32], 2, seed=0)]
    labelled = dataset_crops(phantom_dataset, SPEC, [32, 32, 32], 2, seed=1)
    assert all(label is not None for _, label in labelled)
    k = len(json.loads((phantom_dataset / "dataset.json").read_text())["labels"])

    # An untrained student against true labels: below the floor, plain quantisation, drop reported, INT8 offered.
    _, low = quantize_openvino(model, calibration, labelled, k, max_drop=0.0, min_fp32_dice=1.01)
    assert low["method"] == "nncf.quantize" and not low["enforced"] and low["offered"]
    assert "below min_fp32_dice 1.01" in low["not_enforced_because"]
    assert low["dice_drop"] == pytest.approx(low["fp32_dice"] - low["int8_dice"]) and low["fake_quantize_ops"] > 0

    # At or above the floor the bound is enforced; a floor of 0 always enforces it.
    _, high = quantize_openvino(model, calibration, labelled, k, max_drop=1.0, min_fp32_dice=0.0)
    assert high["method"] == "nncf.quantize_with_accuracy_control" and high["enforced"]
    assert high["offered"] == high["within_bound"] is True

    # ONNX Runtime INT8 reads the same floor; without labels (the FP32 argmax is the reference) it always enforces.
    from export.int8 import quantize_onnxruntime

    ort_args = (bundle / "model.onnx", tmp_path / "int8.onnx", calibration)
    ort_low = quantize_onnxruntime(*ort_args, labelled, k, "image", repeats=1, min_fp32_dice=1.01)
    assert not ort_low["enforced"] and "below min_fp32_dice 1.01" in ort_low["not_enforced_because"]
    assert quantize_onnxruntime(*ort_args, labelled, k, "image", repeats=1, min_fp32_dice=0.0)["enforced"]
    unlabelled = [(crop, None) for crop, _ in labelled]
    assert quantize_onnxruntime(*ort_args, unlabelled, k, "image", repeats=1, min_fp32_dice=1.01)["enforced"]


def test_cli_exports_replaces_an_old_bundle_and_refuses_bad_requests(phantom_dataset, tmp_path, capsys):
    from export.__main__ import main

    ckpt = _student(tmp_path / "student.pt", "unet_small", [32, 32, 32], phantom_dataset)
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "stale.txt").write_text("old bundle")
    assert main(["--student", str(ckpt), "--out", str(out), "--calib-dir", str(phantom_dataset), "--calib-crops", "2",
                 "--val-crops", "0"]) == 0
    assert not (out / "stale.txt").exists() and load_bundle(out)["int8"] == {"requested": False}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "student.pt"]

    with pytest.raises(SystemExit) as exc:
        main(["--student", str(ckpt), "--out", str(tmp_path / "b2"), "--int8"])
    assert exc.value.code == 2 and "--calib-dir" in capsys.readouterr().err

    not_a_student = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, not_a_student)
    assert main(["--student", str(not_a_student), "--out", str(tmp_path / "b3")]) == 2
    assert "weights.pt" in capsys.readouterr().err
    assert not (tmp_path / "b3").exists() and not list(tmp_path.glob(".b3*"))


def test_crops_of_the_wrong_size_are_refused(phantom_dataset, tmp_path):
    ckpt = _student(tmp_path / "student.pt", "unet_small", [32, 32, 32], phantom_dataset)
    with pytest.raises(ExportError, match="does not match the student's ROI"):
        build_bundle(ckpt, tmp_path / "bundle", calibration=[np.zeros((1, 16, 16, 16), np.float32)], log=lambda *_: None)
    assert not (tmp_path / "bundle").exists()


def test_calibration_crops_pad_a_small_volume_as_training_and_deploy_do():
    """A volume smaller than the ROI sits in the crop where training's SpatialPadd and deploy's sliding window put
    it (half the padding before), not at the start: the students segment end-padded crops far worse (0.23 against
    0.80 foreground Dice on the demo's validation crop), which made the INT8 accuracy check compare noise."""
    from monai.transforms import SpatialPad

    from export.calibration import foreground_crop

    rng = np.random.default_rng(0)
    image = rng.uniform(0.1, 1.0, (1, 5, 9, 20)).astype(np.float32)   # X, Y below the ROI, Z above it
    label = np.zeros((5, 9, 20), np.int64)
    label[2, 4, 10] = 3                                                # one foreground voxel: the crop's centre
    crop, crop_label = foreground_crop(image, label, [8, 16, 8], np.random.default_rng(1))
    padded = np.asarray(SpatialPad(spatial_size=[8, 16, -1], value=0.0)(image))
    assert crop.shape == (1, 8, 16, 8) and crop_label.shape == (8, 16, 8)
    # X and Y: MONAI's symmetric padding exactly (1 before / 2 after, 3 / 4); Z: the window around slice 10.
    np.testing.assert_array_equal(crop, padded[:, :, :, 6:14])
    assert crop_label[1 + 2, 3 + 4, 4] == 3 and crop_label.sum() == 3
