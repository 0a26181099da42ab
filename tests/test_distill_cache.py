"""Teacher-output cache: compact storage, keyed by the teacher, resumable, aligned with random crops."""
import json

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from distill.cache import AttachTeacherd, CacheError, TeacherCache, build_teacher_cache, cache_key, file_sha256

K = 4
SPEC = {"spacing_mm": [4.0, 4.0, 4.0], "orientation": "RAS",
        "intensity": {"mode": "scale", "hu_min": -175.0, "hu_max": 250.0, "mean": None, "std": None}}
ROI = [16, 16, 16]


class SmoothTeacher(nn.Module):
    """A fixed smooth conv 'teacher' (logits vary on the scale of a few voxels, as a real decoder's do)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv3d(1, K, 5, padding=2)
        with torch.no_grad():
            # A per-class gain on a 5³ box filter: a low-pass, like a decoder's upsampled logits.
            gains = torch.randn(K, generator=g)
            self.conv.weight.copy_(gains.view(K, 1, 1, 1, 1) * torch.full((1, 1, 5, 5, 5), 1.0 / 125))
            self.conv.bias.copy_(torch.randn(K, generator=g))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x) * 4.0


class LabelTeacher(nn.Module):
    """Reads the class out of the image (image = class / (K-1)): logits 10·one_hot(class)."""

    def forward(self, x):
        cls = torch.round(x[:, 0] * (K - 1)).long().clamp(0, K - 1)
        return 10.0 * torch.nn.functional.one_hot(cls, K).permute(0, 4, 1, 2, 3).float()


def smooth_volume(seed, shape=(28, 24, 20)):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 2.0).astype(np.float32)[None] * 20.0


def write_checkpoint(path, model):
    torch.save(model.state_dict(), path)
    return path


def volumes_loader(volumes):
    return lambda item: {"image": torch.from_numpy(volumes[item["case_id"]])}


def build(tmp_path, teacher, ckpt, volumes, downsample=2, root="cache"):
    cases = [{"case_id": cid, "image": f"{cid}.nii.gz"} for cid in volumes]
    return build_teacher_cache(teacher, cases, volumes_loader(volumes), tmp_path / root, ckpt, SPEC, ROI, K,
                               overlap=0.25, downsample=downsample, progress=False)


def test_cache_stores_half_resolution_float16_and_restores_the_teacher_closely(tmp_path):
    teacher = SmoothTeacher()
    ckpt = write_checkpoint(tmp_path / "teacher.pt", teacher)
    volumes = {"case_0": smooth_volume(0), "case_1": smooth_volume(1)}
    cache = build(tmp_path, teacher, ckpt, volumes)

    manifest = json.loads((cache.directory / "manifest.json").read_text())
    assert manifest["teacher_sha256"] == file_sha256(ckpt)
    assert set(manifest["entries"]) == {"case_0", "case_1"}
    entry = manifest["entries"]["case_0"]
    assert entry["shape"] == [28, 24, 20] and entry["stored_shape"] == [14, 12, 10]
    with np.load(cache.directory / entry["file"]) as npz:
        assert npz["logits"].dtype == np.float16
    full_float32_bytes = K * 28 * 24 * 20 * 4
    assert entry["bytes"] < full_float32_bytes / 12  # 1/16 of the data plus the npz header

    from evaluation.sliding_window import predict_logits

    exact = predict_logits(teacher, torch.from_numpy(volumes["case_0"]), ROI, K, overlap=0.25)
    restored = cache.load("case_0", [28, 24, 20])
    assert restored.shape == (K, 28, 24, 20) and restored.dtype == torch.float32
    agreement = (restored.argmax(0) == exact.argmax(0)).float().mean().item()
    assert agreement > 0.95
    assert (restored - exact).abs().mean() < 0.1 * exact.abs().mean()


def test_a_changed_teacher_never_serves_stale_targets(tmp_path):
    volumes = {"case_0": smooth_volume(0)}
    ckpt = tmp_path / "teacher.pt"
    first = build(tmp_path, SmoothTeacher(seed=0), write_checkpoint(ckpt, SmoothTeacher(seed=0)), volumes)
    old = first.load("case_0")

    retrained = SmoothTeacher(seed=1)  # same path, new weights: the file's bytes change
    second = build(tmp_path, retrained, write_checkpoint(ckpt, retrained), volumes)
    assert second.directory != first.directory
    assert retrained.calls > 0  # it ran, it did not reuse the first teacher's entry
    assert not torch.allclose(second.load("case_0"), old)

    # Changing the preprocessing spec or the window also changes the key.
    sha = file_sha256(ckpt)
    base = cache_key(sha, SPEC, ROI, 0.25)
    assert cache_key(sha, {**SPEC, "spacing_mm": [2.0, 2.0, 2.0]}, ROI, 0.25) != base
    assert cache_key(sha, SPEC, [32, 32, 32], 0.25) != base
    assert cache_key(sha, SPEC, ROI, 0.5) != base


def test_building_again_only_computes_missing_cases(tmp_path):
    teacher = SmoothTeacher()
    ckpt = write_checkpoint(tmp_path / "teacher.pt", teacher)
    build(tmp_path, teacher, ckpt, {"a": smooth_volume(0)})
    calls_after_first = teacher.calls
    cache = build(tmp_path, teacher, ckpt, {"a": smooth_volume(0), "b": smooth_volume(1)})
    windows_per_case = calls_after_first
    assert teacher.calls == calls_after_first + windows_per_case  # only "b" ran
    assert set(cache.entries) == {"a", "b"}
    assert cache.size_bytes() == sum(e["bytes"] for e in cache.entries.values())


def test_bad_requests_are_refused_naming_the_case(tmp_path):
    teacher = SmoothTeacher()
    cache = build(tmp_path, teacher, write_checkpoint(tmp_path / "t.pt", teacher), {"a": smooth_volume(0)})
    with pytest.raises(CacheError, match="'zzz'"):
        cache.load("zzz")
    with pytest.raises(CacheError, match="grid \\[28, 24, 20\\].*\\[30, 24, 20\\]"):
        cache.load("a", [30, 24, 20])
    with pytest.raises(CacheError, match="no teacher cache manifest"):
        TeacherCache(tmp_path / "nowhere")
    assert issubclass(CacheError, ValueError)


def test_random_crops_and_flips_keep_image_label_and_teacher_aligned(tmp_path):
    """The real transform chain: AttachTeacherd, then data.transforms.random_crop_transforms."""
    from data.transforms import random_crop_transforms
    from monai.transforms import Compose

    rng = np.random.default_rng(0)
    label = ndimage.zoom(rng.integers(0, K, size=(6, 5, 4)), 5, order=0)[None].astype(np.uint8)  # 1 x 30 x 25 x 20
    image = (label / (K - 1)).astype(np.float32)
    ckpt = write_checkpoint(tmp_path / "label_teacher.pt", SmoothTeacher())
    cache = build(tmp_path, LabelTeacher(), ckpt, {"lab": image, "unl": image}, downsample=1)

    chain = Compose([AttachTeacherd(cache), random_crop_transforms([16, 16, 16], K, keys=("image", "label"),
                                                                    extra_keys=("teacher",), num_samples=3)])
    chain.set_random_state(seed=0)
    checked = 0
    for case in ({"case_id": "lab", "image": torch.from_numpy(image), "label": torch.from_numpy(label), "has_label": True},
                 {"case_id": "unl", "image": torch.from_numpy(image), "has_label": False}):
        for _ in range(4):
            for crop in chain(dict(case)):
                teacher = torch.as_tensor(crop["teacher"])
                assert teacher.shape == (K, 16, 16, 16)
                crop_label = torch.as_tensor(crop["label"])[0].long()
                crop_image = torch.as_tensor(crop["image"])[0]
                assert torch.equal(teacher.argmax(0), crop_label)
                assert torch.equal(torch.round(crop_image * (K - 1)).long(), crop_label)
                assert bool(crop["has_label"]) == (case["case_id"] == "lab")
                checked += 1
    assert checked == 2 * 4 * 3


class PoolingTeacher(nn.Module):
    """A teacher with native low-res logits, like SAM-Med3D: ``forward_low_res`` averages f³ blocks (per-class
    gain and bias), ``forward`` upsamples them ×f. Its native output does not depend on where a window starts
    (as long as it starts on a multiple of f), so blending windows must give the pooled volume exactly."""

    low_res_factor = 2

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(-2.0, 2.0, K).view(1, K, 1, 1, 1))
        self.bias = nn.Parameter(torch.linspace(0.5, -0.5, K).view(1, K, 1, 1, 1))

    def forward_low_res(self, x):
        return torch.nn.functional.avg_pool3d(x, self.low_res_factor) * self.gain + self.bias

    def forward(self, x):
        return torch.nn.functional.interpolate(self.forward_low_res(x), size=x.shape[2:], mode="trilinear",
                                               align_corners=False)


def test_native_low_res_teacher_is_cached_at_its_own_grid_across_overlapping_windows(tmp_path):
    teacher = PoolingTeacher()
    ckpt = write_checkpoint(tmp_path / "pool.pt", teacher)
    # X and Y longer than the 16³ ROI (several windows, odd sizes), Z shorter (padded, centred as MONAI does).
    volume = smooth_volume(3, shape=(37, 30, 11))
    cache = build(tmp_path, teacher, ckpt, {"big": volume}, downsample=1)  # downsample does not apply
    assert cache.manifest["storage"]["native_factor"] == 2 and cache.manifest["storage"]["downsample"] == 2
    entry = cache.entries["big"]
    assert entry["shape"] == [37, 30, 11] and entry["stored_shape"] == [19, 15, 8]  # ceil(/2), Z padded to 16
    assert entry["native_offset"] == [0, 0, 2]  # (16 - 11) // 2 voxels of padding before the case along Z

    padded = np.zeros((1, 38, 30, 16), np.float32)
    padded[:, :37, :, 2:13] = volume
    expected_native = teacher.forward_low_res(torch.from_numpy(padded)[None])[0].detach()
    with np.load(cache.directory / entry["file"]) as npz:
        stored = torch.from_numpy(npz["logits"].astype(np.float32))
    torch.testing.assert_close(stored, expected_native, atol=2e-2, rtol=1e-3)  # float16 storage

    restored = cache.load("big", [37, 30, 11])
    upsampled = torch.nn.functional.interpolate(expected_native[None], scale_factor=2, mode="trilinear",
                                                align_corners=False)[0]
    torch.testing.assert_close(restored, upsampled[:, :37, :, 2:13], atol=2e-2, rtol=1e-3)
    # Keyed apart from a full-resolution cache of the same teacher.
    sha = file_sha256(ckpt)
    assert cache.directory.name == cache_key(sha, SPEC, ROI, 0.25, 2, native=True) != cache_key(sha, SPEC, ROI, 0.25, 2)


def test_sam_med3d_cache_restores_what_the_teacher_predicts_in_one_window(tmp_path):
    from evaluation.sliding_window import predict_logits
    from teacher.sam_med3d.build import build_sam_med3d_teacher

    torch.manual_seed(0)
    teacher = build_sam_med3d_teacher({"preset": "tiny", "apg_hidden": 8}, K).eval()  # 32³ crops, 16³ logits
    with torch.no_grad():  # a non-zero auto prompt, so that the classes differ
        teacher.auto_prompt.out.weight.normal_(0, 0.5)
    ckpt = write_checkpoint(tmp_path / "sam_med3d.pt", teacher)
    volume = np.random.default_rng(0).normal(size=(1, 27, 32, 21)).astype(np.float32)  # one padded window
    cache = build_teacher_cache(teacher, [{"case_id": "c", "image": "c.nii.gz"}], volumes_loader({"c": volume}),
                                tmp_path / "cache", ckpt, SPEC, [32, 32, 32], K, downsample=2, progress=False)
    assert cache.entries["c"]["stored_shape"] == [16, 16, 16] and cache.entries["c"]["native_offset"] == [2, 0, 5]
    exact = torch.as_tensor(predict_logits(teacher, torch.from_numpy(volume), [32, 32, 32], K))
    torch.testing.assert_close(cache.load("c", [27, 32, 21]), exact, atol=5e-3, rtol=1e-2)
