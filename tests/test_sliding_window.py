"""One sliding window for torch modules and numpy callables; whole-NIfTI prediction back in input geometry."""
import nibabel as nib
import numpy as np
import pytest
import torch

from evaluation.sliding_window import SlidingWindowError, predict_case, predict_labels, predict_logits

torch.set_num_threads(2)

SPEC = {
    "spacing_mm": [2.0, 2.0, 2.5],
    "orientation": "RAS",
    "intensity": {"mode": "scale", "hu_min": -175.0, "hu_max": 250.0, "mean": None, "std": None},
}


def pointwise_net(num_classes=3, seed=0):
    """A translation-equivariant net with no spatial context: every window's voxels are exact."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 1), torch.nn.Tanh(), torch.nn.Conv3d(4, num_classes, 1))


def whole_volume(net, image):
    with torch.no_grad():
        return net(torch.from_numpy(image)[None])[0].numpy()


def test_module_and_numpy_callable_give_identical_logits():
    net = pointwise_net()
    image = np.random.default_rng(0).random((1, 40, 36, 20), dtype=np.float32)

    def onnx_like(batch: np.ndarray) -> np.ndarray:  # what an ONNX Runtime wrapper looks like from outside
        assert batch.dtype == np.float32 and batch.shape[1:] == (1, 16, 16, 16)
        with torch.no_grad():
            return net(torch.from_numpy(batch)).numpy()

    from_module = predict_logits(net, image, (16, 16, 16), num_classes=3, overlap=0.5, sw_batch_size=2)
    from_numpy = predict_logits(onnx_like, image, (16, 16, 16), num_classes=3, overlap=0.5, sw_batch_size=2)
    assert isinstance(from_module, np.ndarray) and from_module.shape == (3, 40, 36, 20)
    np.testing.assert_array_equal(from_module, from_numpy)
    # Blending is a weighted mean of identical per-voxel answers here, so it must equal the whole volume.
    np.testing.assert_allclose(from_module, whole_volume(net, image), atol=1e-5)


def test_stitching_a_3d_conv_reproduces_the_whole_volume_inside_every_window():
    torch.manual_seed(1)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    image = np.random.default_rng(1).random((1, 32, 48, 16), dtype=np.float32)
    # Non-overlapping 16^3 windows tile the volume: inside each window a 3^3 conv sees exactly what it
    # sees on the whole volume; only the one-voxel layer on the seams between windows can differ.
    logits = predict_logits(conv, torch.from_numpy(image), (16, 16, 16), num_classes=2, overlap=0.0, mode="constant")
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 32, 48, 16)
    reference = whole_volume(conv, image)
    on_seam = np.zeros(image.shape[1:], bool)
    for axis, size in enumerate(image.shape[1:]):
        seam = np.zeros(size, bool)
        seam[16:size:16] = seam[15:size:16] = True
        on_seam |= np.expand_dims(seam, tuple(a for a in range(3) if a != axis))
    np.testing.assert_allclose(logits.numpy()[:, ~on_seam], reference[:, ~on_seam], atol=1e-5)
    assert not np.allclose(logits.numpy()[:, on_seam], reference[:, on_seam], atol=1e-3)  # the seams are real


def test_volume_smaller_than_the_roi_is_padded_and_cropped_back():
    net = pointwise_net(num_classes=2)
    image = np.random.default_rng(2).random((1, 10, 12, 7), dtype=np.float32)
    logits = predict_logits(net, image, (16, 16, 16), num_classes=2)
    assert logits.shape == (2, 10, 12, 7)
    np.testing.assert_allclose(logits, whole_volume(net, image), atol=1e-5)
    labels = predict_labels(net, image, (16, 16, 16), num_classes=2)
    assert labels.shape == (10, 12, 7) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, logits.argmax(0))


def test_module_mode_is_restored_and_wrong_outputs_are_refused():
    net = pointwise_net()
    net.train()
    predict_logits(net, np.zeros((1, 8, 8, 8), np.float32), (8, 8, 8), num_classes=3)
    assert net.training
    with pytest.raises(SlidingWindowError, match="num_classes"):
        predict_logits(net, np.zeros((1, 8, 8, 8), np.float32), (8, 8, 8), num_classes=4)
    with pytest.raises(SlidingWindowError, match="C x X x Y x Z"):
        predict_logits(net, np.zeros((8, 8, 8), np.float32), (8, 8, 8), num_classes=3)
    with pytest.raises(SlidingWindowError, match="roi_size"):
        predict_logits(net, np.zeros((1, 8, 8, 8), np.float32), (8, 8), num_classes=3)


def threshold_net():
    """Class 1 wherever the scaled intensity exceeds 0.5 (HU > 37.5 with the BTCV window)."""
    net = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        net.weight[:] = torch.tensor([0.0, 20.0]).view(2, 1, 1, 1, 1)
        net.bias[:] = torch.tensor([0.0, -10.0])
    return net


def write_ct(path, affine, shape=(48, 44, 20)):
    """A patient (-100 HU) in air (-1000 HU) holding an off-centre box of 200 HU.

    The air makes the preprocessing crop to the body, and the off-centre box catches any flip or shift
    of the mask on the way back.
    """
    hu = np.full(shape, -1000.0, np.float32)
    hu[2:34, 4:33, 1:18] = -100.0
    hu[5:20, 8:30, 3:12] = 200.0
    truth = np.zeros(shape, np.uint8)
    truth[5:20, 8:30, 3:12] = 1
    nib.save(nib.Nifti1Image(hu, affine), str(path))
    return truth


def test_predict_case_writes_a_mask_in_the_input_geometry(tmp_path):
    # An LPS-like, anisotropic, translated affine: the prediction runs in RAS at 2 x 2 x 2.5 mm on the
    # body crop and must come back to these voxels exactly.
    affine = np.diag([-1.5, -1.2, 3.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    truth = write_ct(tmp_path / "ct.nii.gz", affine)
    out = tmp_path / "masks" / "ct.nii.gz"
    mask = predict_case(threshold_net(), tmp_path / "ct.nii.gz", SPEC, (16, 16, 16), {0: "background", 1: "box"}, out)

    assert mask.shape == truth.shape and mask.dtype == np.uint8
    dice = 2 * np.sum(mask & truth) / (mask.sum() + truth.sum())
    assert dice > 0.9  # resampling to 2 mm and back only blurs the box's faces
    written = nib.load(str(out))
    assert written.shape == truth.shape
    np.testing.assert_array_equal(written.affine, nib.load(str(tmp_path / "ct.nii.gz")).affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), mask)
    assert sorted(p.name for p in out.parent.iterdir()) == ["ct.nii.gz"]  # atomic: no temporary left


def test_predict_case_refuses_a_bad_spec_or_file(tmp_path):
    write_ct(tmp_path / "ct.nii.gz", np.eye(4))
    bad = {**SPEC, "intensity": {"mode": "zscore", "hu_min": -175.0, "hu_max": 250.0, "mean": None, "std": None}}
    with pytest.raises(ValueError, match="zscore"):
        predict_case(threshold_net(), tmp_path / "ct.nii.gz", bad, (16, 16, 16), {0: "background", 1: "box"})
    with pytest.raises(SlidingWindowError, match="missing.nii.gz"):
        predict_case(threshold_net(), tmp_path / "missing.nii.gz", SPEC, (16, 16, 16), {0: "background", 1: "box"})
