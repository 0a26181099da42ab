"""Crops larger than their volume: padding gets no invented teacher target, and the image is padded as at inference.

A body-cropped 4 mm phantom (~52 x 39 voxels in-plane) is smaller than the 64 x 64 x 32 student ROI, so much
of a student crop is padding. Zero-padded teacher logits there are a uniform distribution over the classes,
which pulled the student away from the label's background; now the crop carries an inside-the-volume mask and
the KD term averages over inside voxels only (data/transforms.py, distill/loss.py).
"""
import numpy as np
import pytest
import torch

from data.transforms import IMAGE_PAD_VALUE, random_crop_transforms
from distill.cache import AttachTeacherd
from distill.loss import KDLoss
from tests.test_distill_cache import K, SmoothTeacher, build, smooth_volume, write_checkpoint

SHAPE = (20, 18, 12)          # the case's preprocessed grid
CROP = [24, 24, 16]           # larger than the case along every axis


def index_image(shape=SHAPE) -> torch.Tensor:
    """An image whose value names its voxel: 1 + flat index (so 0 can only be padding)."""
    return torch.arange(1, int(np.prod(shape)) + 1, dtype=torch.float32).reshape(1, *shape)


def crop_chain(cache, seed):
    chain = [AttachTeacherd(cache),
             random_crop_transforms(CROP, K, extra_keys=("teacher",), num_samples=1, flip_prob=0.5, rotate_prob=0.5,
                                    inside_key="inside")]
    for t in chain[1].transforms:
        if hasattr(t, "set_random_state"):
            t.set_random_state(seed)
    return chain


@pytest.mark.parametrize("downsample", [1, 2])
def test_kd_targets_of_a_crop_larger_than_its_volume(tmp_path, downsample):
    teacher = SmoothTeacher()
    ckpt = write_checkpoint(tmp_path / "teacher.pt", teacher)
    cache = build(tmp_path, teacher, ckpt, {"case_0": smooth_volume(0, SHAPE)}, downsample=downsample)
    full = cache.load("case_0", SHAPE)                                   # K x X x Y x Z, the targets served
    label = (torch.arange(int(np.prod(SHAPE))) % K).reshape(1, *SHAPE).float()
    kd = KDLoss(1.0, kd_target="probs", temperature=2.0, num_classes=K)
    flips_seen = set()
    for seed in range(6):
        attach, crops = crop_chain(cache, seed)
        crop = crops(attach({"case_id": "case_0", "image": index_image(), "label": label}))[0]
        idx, inside, target = crop["image"][0].long(), crop["inside"][0], torch.as_tensor(crop["teacher"])
        assert tuple(target.shape) == (K, *CROP)
        padded = idx == 0
        # The mask is exactly "inside the volume": 1 where a real voxel landed, 0 on every padded voxel.
        assert padded.sum() > 0 and torch.equal(inside.bool(), ~padded)
        # Inside the volume the target is the teacher's logit at the voxel that landed there (flips/rotations
        # included): the image names that voxel.
        x, y, z = np.unravel_index((idx[~padded] - 1).numpy(), SHAPE)
        torch.testing.assert_close(target[:, ~padded], full[:, x, y, z])
        flips_seen.add(tuple(int(v) for v in (x[0], y[0], z[0])))
        # The padded image holds what inference pads with.
        assert torch.all(torch.as_tensor(crop["image"])[0][padded] == IMAGE_PAD_VALUE)

        # On padding the KD term has no target: the student's logits there do not change it ...
        student = torch.randn(1, K, *CROP)
        mask = torch.as_tensor(crop["inside"])[None]
        base = kd.kd_term(student, target[None], mask)
        moved = student.clone()
        moved[:, :, padded] += 5.0 * torch.randn_like(moved[:, :, padded])
        torch.testing.assert_close(kd.kd_term(moved, target[None], mask), base)
        # ... and it is the mean over inside voxels and classes, computed independently here (T² = 4).
        diff = torch.softmax(student / 2, 1) - torch.softmax(target[None] / 2, 1)
        expected = 4.0 * (diff[:, :, ~padded] ** 2).mean()
        torch.testing.assert_close(base, expected)
        # Without the mask the padding (zero logits: a uniform distribution) would have counted.
        assert not torch.isclose(kd.kd_term(moved, target[None]), kd.kd_term(student, target[None]))
    assert len(flips_seen) > 1  # the crops were placed and flipped differently


def test_online_crops_carry_the_mask_without_a_teacher_key():
    """Online KD runs the teacher on the padded crop; the same mask leaves the padding out."""
    label = torch.zeros(1, *SHAPE)
    label[0, 5:9, 5:9, 3:6] = 1
    crop = random_crop_transforms(CROP, 2, num_samples=1, inside_key="inside")({"image": index_image(), "label": label})[0]
    assert torch.equal(torch.as_tensor(crop["inside"])[0].bool(), torch.as_tensor(crop["image"])[0] > 0)
    assert int(torch.as_tensor(crop["inside"]).sum()) == int(np.prod(SHAPE))  # the whole volume fits: every voxel once


def test_a_batch_of_padding_only_contributes_no_kd():
    kd = KDLoss(0.5, kd_target="logits", num_classes=K)
    student = torch.randn(2, K, 4, 4, 4, requires_grad=True)
    loss, parts = kd(student, torch.randn(2, K, 4, 4, 4), torch.zeros(2, 1, 4, 4, 4).long(),
                     kd_mask=torch.zeros(2, 1, 4, 4, 4))
    assert parts["kd"] == 0.0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="kd_mask must be"):
        kd(student, torch.randn(2, K, 4, 4, 4), None, torch.zeros(2, dtype=torch.bool), kd_mask=torch.ones(2, 1, 4, 4, 3))


def test_training_and_inference_pad_the_image_alike():
    """Training crops, evaluation's sliding window and the deployed runtime pad with the same value."""
    from deploy.sliding_window import IMAGE_PAD_VALUE as DEPLOY_PAD_VALUE
    from deploy.sliding_window import sliding_window_logits
    from evaluation.sliding_window import predict_logits

    assert DEPLOY_PAD_VALUE == IMAGE_PAD_VALUE
    image = np.full((1, 10, 9, 6), 0.7, np.float32)
    seen = []

    def record(batch):
        seen.append(np.array(batch))
        return np.zeros((batch.shape[0], 2, *batch.shape[2:]), np.float32)

    predict_logits(record, image, [16, 16, 8], num_classes=2)
    sliding_window_logits(image, record, [16, 16, 8], num_classes=2)
    for window in seen:
        assert window.shape[2:] == (16, 16, 8)
        assert set(np.unique(window).tolist()) == {IMAGE_PAD_VALUE, np.float32(0.7)}
