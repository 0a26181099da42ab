"""The torch-free edge runtime: geometry and windows match MONAI, masks line up with their inputs,
bad inputs and tampered bundles are refused, and deploy/ runs with torch, MONAI and scipy unimportable."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from deploy import BundleError, ImplausibleInputWarning, InputVolumeError, RuntimeChoiceError, Segmenter, load_bundle
from deploy.geometry import to_model_grid
from deploy.sliding_window import gaussian_importance_map, sliding_window_logits

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"spacing_mm": [4.0, 4.0, 4.0], "orientation": "RAS",
        "intensity": {"mode": "scale", "hu_min": -175.0, "hu_max": 250.0, "mean": None, "std": None}}


@pytest.fixture(scope="module")
def student_bundle(phantom_dataset, tmp_path_factory):
    """An untrained U-Net student (32^3 ROI) exported FP32-only, parity-checked on phantom crops."""
    from export import build_bundle
    from student import build_student, save_student

    torch.set_num_threads(2)
    torch.manual_seed(0)
    info = json.loads((phantom_dataset / "dataset.json").read_text())
    labels = {int(k): v for k, v in info["labels"].items()}
    work = tmp_path_factory.mktemp("deploy_bundle")
    ckpt = save_student(work / "student.pt", build_student("unet_small", len(labels)),
                        {"arch": {"name": "unet_small", "num_classes": len(labels), "in_channels": 1},
                         "roi_size": [32, 32, 32], "preprocess": SPEC, "labels": labels})
    bundle = build_bundle(ckpt, work / "bundle", calibration=phantom_dataset, int8=False, calibration_crops=2,
                          validation_crops=0, log=lambda *_: None)
    return bundle, ckpt


@pytest.fixture(scope="module")
def case(phantom_dataset):
    """A phantom CT (LPS, 3.2 x 3.2 x 7.5 mm, int16 on disk) and its path."""
    path = phantom_dataset / "imagesTr" / "phantom_000.nii.gz"
    img = nib.load(str(path))
    return path, np.asarray(img.dataobj), img.affine


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_resampling_matches_monai_orientation_and_spacing(case):
    from monai.transforms import Orientation, Spacing
    from monai.data import MetaTensor

    _, image, affine = case
    # A second orientation: axes permuted (Z, X, Y order on disk), with a flip, same physical volume.
    permuted = np.flip(np.transpose(image, (2, 0, 1)), axis=1)
    perm_affine = affine[:, [2, 0, 1, 3]].copy()
    perm_affine[:3, 3] = affine[:3, :3] @ np.array([0, image.shape[0] - 1, 0]) + affine[:3, 3]
    perm_affine[:3, 1] = -perm_affine[:3, 1]
    for data, aff in ((image, affine), (permuted, perm_affine)):
        mine, _ = to_model_grid(data.astype(np.float32), aff, [4.0, 3.0, 5.0])
        t = MetaTensor(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None], affine=torch.as_tensor(aff))
        ref = Spacing(pixdim=[4.0, 3.0, 5.0], mode="bilinear")(Orientation(axcodes="RAS")(t))
        assert mine.shape == tuple(ref.shape[1:])
        np.testing.assert_allclose(mine, ref[0].numpy(), atol=1e-2)  # HU; float32 grid rounding only


@pytest.mark.parametrize("shape", [(40, 70, 33), (20, 12, 9)])
def test_sliding_window_matches_monai_including_volumes_smaller_than_the_roi(shape):
    from monai.inferers import sliding_window_inference

    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, *shape)).astype(np.float32)

    def predictor(batch):  # window-dependent, so placement and blending both matter
        return np.concatenate([batch * 2.0, batch.mean(axis=(2, 3, 4), keepdims=True) + 0 * batch], axis=1)

    mine = sliding_window_logits(image, predictor, [16, 24, 16], 2, overlap=0.25, batch_size=3)
    ref = sliding_window_inference(torch.from_numpy(image)[None], (16, 24, 16), 3,
                                   lambda x: torch.from_numpy(predictor(x.numpy())), overlap=0.25, mode="gaussian")
    np.testing.assert_allclose(mine, ref[0].numpy(), atol=1e-5)
    from monai.data.utils import compute_importance_map

    np.testing.assert_allclose(gaussian_importance_map([16, 24, 16]),
                               compute_importance_map((16, 24, 16), mode="gaussian", sigma_scale=0.125).numpy(), rtol=1e-6)


def test_deployed_fp32_matches_the_pytorch_student_through_monai(student_bundle, case):
    from evaluation.sliding_window import predict_case
    from student import load_student

    bundle, ckpt = student_bundle
    path, _, _ = case
    model, meta = load_student(ckpt)
    reference = predict_case(model, path, meta["preprocess"], meta["roi_size"], meta["labels"])
    for runtime in ("openvino", "onnxruntime"):
        mask = Segmenter(bundle, runtime, "fp32", threads=2, resample_back="labels").segment(*case[1:])
        dice = [2 * ((mask == k) & (reference == k)).sum() / ((mask == k).sum() + (reference == k).sum())
                for k in range(1, 8) if (mask == k).any() or (reference == k).any()]
        assert np.mean(dice) >= 0.99, (runtime, dice)


def test_mask_has_the_input_affine_and_shape_for_ras_and_lps_inputs(student_bundle, case, tmp_path):
    bundle, _ = student_bundle
    _, image, affine = case
    seg = Segmenter(bundle, "onnxruntime", "fp32", threads=2)
    lps = _write(tmp_path / "lps.nii.gz", image.astype(np.int16), affine)
    # The same voxels stored RAS: flip the first two axes and move the origin to the new first voxel.
    ras_affine = affine @ np.array([[-1, 0, 0, image.shape[0] - 1], [0, -1, 0, image.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    ras = _write(tmp_path / "ras.nii", np.flip(image, (0, 1)).astype(np.float32), ras_affine)
    masks = {}
    for src in (lps, ras):
        out = tmp_path / f"mask_{src.name}"
        masks[src] = seg.segment_file(src, out)
        written, given = nib.load(str(out)), nib.load(str(src))
        assert written.shape == given.shape
        np.testing.assert_array_equal(written.affine, given.affine)
        assert written.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(written.dataobj), masks[src])
    assert nib.aff2axcodes(ras_affine) == ("R", "A", "S") and nib.aff2axcodes(affine) == ("L", "P", "S")
    # Same anatomy, same mask, whatever the storage order.
    np.testing.assert_array_equal(np.flip(masks[ras], (0, 1)), masks[lps])
    assert not list(tmp_path.glob(".*tmp*"))


def test_volume_smaller_than_the_roi_is_padded(student_bundle):
    bundle, _ = student_bundle
    # 72 x 60 x 45 mm against the 128 mm window: smaller than the ROI on every axis of the model grid (18 x 15 x
    # 11 voxels), large enough to be segmented; under half the window on two axes, which the input check says.
    small = np.full((24, 20, 9), -800, np.int16)
    small[5:19, 4:16, 2:7] = 60
    with pytest.warns(ImplausibleInputWarning, match="small field of view"):
        mask = Segmenter(bundle, "openvino", "fp32").segment(small, np.diag([3.0, 3.0, 5.0, 1.0]))
    assert mask.shape == small.shape


@pytest.mark.parametrize("data,match", [
    (np.zeros((8, 8), np.float32), "expected a 3D volume"),
    (np.zeros((8, 8, 8, 2), np.float32), "expected a 3D volume"),
    (np.zeros((8, 0, 8), np.float32), "empty"),
    (np.where(np.eye(8)[:, :, None] > 0, np.nan, 0).repeat(8, 2).astype(np.float32), "NaN"),
])
def test_bad_volumes_are_refused_naming_the_file(student_bundle, tmp_path, data, match):
    bundle, _ = student_bundle
    path = _write(tmp_path / "bad.nii.gz", data, np.eye(4))
    with pytest.raises(InputVolumeError, match=f"bad.nii.gz.*{match}"):
        Segmenter(bundle, "onnxruntime").segment_file(path, tmp_path / "mask.nii.gz")
    assert not (tmp_path / "mask.nii.gz").exists()


def test_unreadable_or_missing_files_and_unavailable_precisions_are_refused(student_bundle, tmp_path):
    bundle, _ = student_bundle
    seg = Segmenter(bundle, "onnxruntime")
    fake = tmp_path / "scan.nii.gz"
    fake.write_text("not an image")
    with pytest.raises(InputVolumeError, match="scan.nii.gz.*not a readable NIfTI"):
        seg.segment_file(fake, tmp_path / "mask.nii.gz")
    with pytest.raises(InputVolumeError, match="nothing.nii.gz.*no such file"):
        seg.segment_file(tmp_path / "nothing.nii.gz", tmp_path / "mask.nii.gz")
    with pytest.raises(RuntimeChoiceError, match="no int8 model for onnxruntime"):
        Segmenter(bundle, "onnxruntime", "int8")
    with pytest.raises(RuntimeChoiceError, match="runtime"):
        Segmenter(bundle, "tensorrt")


def test_a_tampered_or_incomplete_bundle_is_refused_naming_the_file(student_bundle, tmp_path):
    bundle, _ = student_bundle
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    load_bundle(copy)
    weights = copy / "openvino" / "model_fp32.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model_fp32.bin: sha256 differs"):
        Segmenter(copy, "openvino")
    (copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx: listed in model.json but missing"):
        load_bundle(copy, verify=False)
    (copy / "model.json").unlink()
    with pytest.raises(BundleError, match="not a deploy bundle"):
        load_bundle(copy)


def test_runtimes_and_precisions_agree(student_bundle, case):
    from deploy.runtime import cpu_supports_bf16

    bundle, _ = student_bundle
    _, image, affine = case
    ov_fp32 = Segmenter(bundle, "openvino", "fp32").segment(image, affine)
    assert (Segmenter(bundle, "onnxruntime", "fp32").segment(image, affine) == ov_fp32).mean() > 0.999
    if cpu_supports_bf16():
        assert (Segmenter(bundle, "openvino", "bf16").segment(image, affine) == ov_fp32).mean() > 0.95
    else:
        with pytest.raises(RuntimeChoiceError, match="bf16"):
            Segmenter(bundle, "openvino", "bf16")


TORCH_BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'monai', 'scipy'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_deploy_runs_with_torch_monai_and_scipy_unimportable(student_bundle, case, tmp_path):
    bundle, _ = student_bundle
    path, _, _ = case
    script = TORCH_BLOCKER + f"""
import runpy
import deploy
deploy.Segmenter({str(bundle)!r}, runtime="onnxruntime").segment_file({str(path)!r}, {str(tmp_path / 'a.nii.gz')!r})
sys.argv = ["deploy.infer", "--bundle", {str(bundle)!r}, "--input", {str(path)!r}, "--output",
            {str(tmp_path / 'b.nii.gz')!r}, "--runtime", "openvino", "--precision", "fp32", "--threads", "2", "--overlay", {str(tmp_path / 'b.png')!r}]
try:
    runpy.run_module("deploy.infer", run_name="__main__")
except SystemExit as exc:
    assert exc.code == 0, exc.code
assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'monai', 'scipy')]
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = nib.load(str(tmp_path / "a.nii.gz")), nib.load(str(tmp_path / "b.nii.gz"))
    assert (np.asarray(a.dataobj) == np.asarray(b.dataobj)).mean() > 0.999
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_a_bad_input_with_exit_code_2(student_bundle, tmp_path, capsys):
    from deploy.infer import main

    bundle, _ = student_bundle
    flat = _write(tmp_path / "flat.nii.gz", np.zeros((8, 8, 2, 3), np.float32), np.eye(4))
    assert main(["--bundle", str(bundle), "--input", str(flat), "--output", str(tmp_path / "m.nii.gz")]) == 2
    assert "flat.nii.gz" in capsys.readouterr().err
