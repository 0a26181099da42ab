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


# -- a changed image or body crop never serves stale targets -------------------------------------------------------

def write_image(path, volume):
    """A NIfTI image at the spacing of SPEC (no resampling); ``volume`` is ``1 x X x Y x Z`` HU."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(volume[0].astype(np.float32), np.diag([4.0, 4.0, 4.0, 1.0])), str(path))
    return path


def edit_one_voxel(path, index=(14, 12, 10), delta=300.0):
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32).copy()
    data[index] += delta
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))


def nifti_cases(tmp_path, n=3):
    folder = tmp_path / "images"
    folder.mkdir()
    return [{"case_id": f"case_{i}", "image": str(write_image(folder / f"case_{i}.nii.gz", smooth_volume(i)))}
            for i in range(n)]


def build_files(tmp_path, teacher, ckpt, cases):
    from data.transforms import load_transforms

    return build_teacher_cache(teacher, cases, load_transforms(SPEC, keys=("image",)), tmp_path / "cache", ckpt, SPEC,
                               ROI, K, overlap=0.25, downsample=2, progress=False)


def test_an_edited_image_is_recomputed_at_the_next_build_and_the_other_entries_are_not(tmp_path):
    teacher = SmoothTeacher()
    ckpt = write_checkpoint(tmp_path / "teacher.pt", teacher)
    cases = nifti_cases(tmp_path)
    first = build_files(tmp_path, teacher, ckpt, cases)
    before = json.loads(json.dumps(first.entries))
    old_logits = {c["case_id"]: first.load(c["case_id"]) for c in cases}
    mtimes = {c["case_id"]: (first.directory / before[c["case_id"]]["file"]).stat().st_mtime_ns for c in cases}
    calls_per_case = teacher.calls // len(cases)

    edit_one_voxel(cases[1]["image"])
    second = build_files(tmp_path, teacher, ckpt, cases)
    assert second.directory == first.directory  # same teacher, spec and crop: same folder, one entry redone
    assert teacher.calls == (len(cases) + 1) * calls_per_case
    assert not torch.allclose(second.load("case_1"), old_logits["case_1"])
    after = second.entries
    for case in cases:
        assert before[case["case_id"]]["image"] == case["image"]
    assert before["case_0"]["image_sha256"] == file_sha256(cases[0]["image"])
    assert after["case_1"]["image_sha256"] == file_sha256(cases[1]["image"]) != before["case_1"]["image_sha256"]
    for cid in ("case_0", "case_2"):
        assert after[cid] == before[cid]
        assert (second.directory / after[cid]["file"]).stat().st_mtime_ns == mtimes[cid]
        assert torch.equal(second.load(cid), old_logits[cid])
    # A third build finds everything current.
    build_files(tmp_path, teacher, ckpt, cases)
    assert teacher.calls == (len(cases) + 1) * calls_per_case


def test_an_entry_whose_image_changed_is_refused_when_attached_or_loaded_with_the_new_hash(tmp_path):
    teacher = SmoothTeacher()
    cases = nifti_cases(tmp_path, n=2)
    cache = build_files(tmp_path, teacher, write_checkpoint(tmp_path / "teacher.pt", teacher), cases)
    recorded = cache.entries["case_0"]["image_sha256"]
    cache.load("case_0", image_sha256=recorded)  # the same file: fine
    assert AttachTeacherd(cache).stale == {}

    edit_one_voxel(cases[0]["image"])
    with pytest.raises(CacheError, match="'case_0'.*image changed"):
        cache.load("case_0", image_sha256=file_sha256(cases[0]["image"]))
    assert set(cache.stale_entries()) == {"case_0"} == set(cache.stale_entries(cases))
    attach = AttachTeacherd(cache)  # hashes each entry's file once, here
    image = torch.zeros(1, *cache.entries["case_1"]["shape"])
    assert attach({"case_id": "case_1", "image": image})["teacher"].shape == (K, *cache.entries["case_1"]["shape"])
    with pytest.raises(CacheError, match=f"'case_0'.*{cases[0]['image']}.*image changed"):
        attach({"case_id": "case_0", "image": image})
    # Rebuilding brings the entry up to date again.
    rebuilt = build_files(tmp_path, teacher, write_checkpoint(tmp_path / "teacher.pt", teacher), cases)
    assert AttachTeacherd(rebuilt).stale == {}


def test_the_body_crop_constants_key_the_cache(tmp_path, monkeypatch):
    from data import transforms

    sha = "0" * 64
    base = cache_key(sha, SPEC, ROI, 0.25)
    monkeypatch.setattr(transforms, "BODY_THRESHOLD_HU", transforms.BODY_THRESHOLD_HU + 100.0)
    assert cache_key(sha, SPEC, ROI, 0.25) != base
    monkeypatch.undo()
    assert cache_key(sha, SPEC, ROI, 0.25) == base
    assert base == cache_key(sha, SPEC, ROI, 0.25, body_crop={"threshold_hu": transforms.BODY_THRESHOLD_HU,
                                                               "margin": transforms.BODY_CROP_MARGIN})
    monkeypatch.setattr(transforms, "BODY_CROP_MARGIN", transforms.BODY_CROP_MARGIN + 2)
    assert cache_key(sha, SPEC, ROI, 0.25) != base
    monkeypatch.undo()

    # A build under another threshold lands in another folder, and records the crop it used.
    teacher = SmoothTeacher()
    ckpt = write_checkpoint(tmp_path / "teacher.pt", teacher)
    volumes = {"a": smooth_volume(0)}
    first = build(tmp_path, teacher, ckpt, volumes)
    assert first.manifest["body_crop"] == {"threshold_hu": transforms.BODY_THRESHOLD_HU,
                                           "margin": transforms.BODY_CROP_MARGIN}
    monkeypatch.setattr(transforms, "BODY_THRESHOLD_HU", -300.0)
    second = build(tmp_path, teacher, ckpt, volumes)
    assert second.directory != first.directory and second.manifest["body_crop"]["threshold_hu"] == -300.0


@pytest.mark.slow
def test_the_pipeline_cache_stage_reruns_when_an_image_changes(phantom_dataset, tmp_path):
    """distill.stages skips a stage whose inputs hash is unchanged: the cache stage's inputs must see image bytes."""
    import shutil

    from configs import load_config
    from pipeline import Pipeline
    from tests.test_teacher_compat import write_teacher

    from data.dataset import load_dataset

    dataset = tmp_path / "dataset"
    shutil.copytree(phantom_dataset, dataset)  # the session's phantoms stay untouched
    teacher = write_teacher(tmp_path / "teacher.pt", load_dataset(dataset).labels)
    cfg = load_config("demo", ["data.site.source=null", f"data.source={dataset}", "preprocess.spacing_mm=[6.0, 6.0, 6.0]", "run.device=cpu",
                               "teacher.roi_size=[32, 32, 32]", f"teacher.checkpoint_file={teacher}"])
    run_dir = tmp_path / "run"

    def cache_stage():
        lines = []
        pipe = Pipeline(cfg, out_dir=run_dir, log=lines.append)
        pipe.stage_data()
        directory = pipe.stage_cache(pipe.stage_teacher())
        return pipe, TeacherCache(directory), lines

    pipe, first, _ = cache_stage()
    case = pipe.data.train[0]
    before = dict(first.entries[case["case_id"]])
    old = first.load(case["case_id"])

    _, again, lines = cache_stage()
    assert any(line.startswith("[cache] up to date") for line in lines)

    import nibabel as nib

    img = nib.load(case["image"])
    data = np.asarray(img.dataobj).copy()
    data[tuple(s // 2 for s in data.shape)] += 400
    nib.save(nib.Nifti1Image(data, img.affine, img.header), case["image"])
    _, third, lines = cache_stage()
    assert not any(line.startswith("[cache] up to date") for line in lines)
    assert not torch.allclose(third.load(case["case_id"]), old)
    entry = third.entries[case["case_id"]]
    assert entry["image_sha256"] == file_sha256(case["image"]) != before["image_sha256"]
