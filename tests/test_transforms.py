"""Intensity statistics, preprocessing specs, MONAI transform chains and datasets."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, list_data_collate

from data.checks import DataError
from data.dataset import load_dataset
from data.stats import compute_intensity_stats, preprocess_spec, ras_spacing
from data.transforms import load_transforms, make_dataset, random_crop_transforms, train_transforms, val_transforms

torch.set_num_threads(2)
WINDOW_CFG = {"spacing_mm": [4.0, 4.0, 4.0], "orientation": "RAS", "intensity": "window", "hu_window": [-175, 250]}


@pytest.fixture(scope="module")
def dataset(phantom_dataset):
    return load_dataset(phantom_dataset)


@pytest.fixture(scope="module")
def window_spec():
    return preprocess_spec(WINDOW_CFG)


@pytest.fixture(scope="module")
def loaded_case(dataset, window_spec):
    return val_transforms(window_spec)(dataset.items()[0])


def test_intensity_stats_match_the_foreground_and_are_cached(dataset, tmp_path):
    ids = dataset.case_ids[:3]
    cache = tmp_path / "stats.json"
    stats = compute_intensity_stats(dataset, ids, cache)
    fg = np.concatenate([np.asarray(nib.load(i["image"]).dataobj, dtype=np.float64)[
        np.asarray(nib.load(i["label"]).dataobj) > 0] for i in dataset.items(ids)])
    assert stats["foreground_voxels"] == fg.size == stats["sampled_voxels"]
    assert stats["mean"] == pytest.approx(fg.mean()) and stats["std"] == pytest.approx(fg.std())
    assert stats["p0.5"] == pytest.approx(np.percentile(fg, 0.5))
    assert stats["p99.5"] == pytest.approx(np.percentile(fg, 99.5))
    np.testing.assert_allclose(stats["median_spacing_mm"], (3.2, 3.2, 7.5), rtol=1e-5)
    # A cache whose key matches is returned as is (not recomputed) ...
    cached = json.loads(cache.read_text())
    cached["mean"] = 12345.0
    cache.write_text(json.dumps(cached))
    assert compute_intensity_stats(dataset, ids, cache)["mean"] == 12345.0
    # ... another case list recomputes; sampling bounds the voxels kept.
    sampled = compute_intensity_stats(dataset, dataset.case_ids, cache, max_samples=1000)
    assert sampled["num_cases"] == 4 and sampled["sampled_voxels"] == 1000
    assert sampled["p0.5"] < sampled["mean"] < sampled["p99.5"]


def test_spacing_is_reported_in_ras_order_for_permuted_axes():
    # Voxel axes stored as (z, x, y): the spacing must still come back as (x, y, z).
    affine = np.array([[0, 0.8, 0, 0], [0, 0, 0.9, 0], [2.5, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    assert ras_spacing(affine, (2.5, 0.8, 0.9)) == [0.8, 0.9, 2.5]


def test_preprocess_spec_window_and_percentile():
    assert preprocess_spec(WINDOW_CFG) == {
        "spacing_mm": [4.0, 4.0, 4.0], "orientation": "RAS",
        "intensity": {"mode": "scale", "hu_min": -175.0, "hu_max": 250.0, "mean": None, "std": None}}
    stats = {"p0.5": -90.0, "p99.5": 280.0, "mean": 70.0, "std": 45.0, "median_spacing_mm": [0.8, 0.8, 2.5]}
    spec = preprocess_spec({**WINDOW_CFG, "intensity": "percentile", "spacing_mm": "median"}, stats)
    assert spec["spacing_mm"] == [0.8, 0.8, 2.5]
    assert spec["intensity"] == {"mode": "zscore", "hu_min": -90.0, "hu_max": 280.0, "mean": 70.0, "std": 45.0}
    with pytest.raises(DataError, match="percentile"):
        preprocess_spec({**WINDOW_CFG, "intensity": "percentile"}, None)
    with pytest.raises(DataError, match="spacing_mm"):
        preprocess_spec({**WINDOW_CFG, "spacing_mm": [4, 0, 4]})
    with pytest.raises(DataError, match="min < max"):
        preprocess_spec({**WINDOW_CFG, "hu_window": [250, -175]})
    with pytest.raises(DataError, match="orientation"):
        preprocess_spec({**WINDOW_CFG, "orientation": "LPS"})


def test_load_transforms_resample_reorient_scale_and_crop_to_body(loaded_case):
    image, label = loaded_case["image"], loaded_case["label"]
    assert image.shape == label.shape and image.shape[0] == 1
    assert image.dtype == torch.float32
    np.testing.assert_allclose(np.diag(image.affine.numpy())[:3], (4.0, 4.0, 4.0))  # RAS, 4 mm
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    assert set(torch.unique(label).int().tolist()) == set(range(8))
    # The field of view is 204.8 mm wide; cropping to the body removes air in front and behind.
    assert image.shape[2] < 204.8 / 4
    # RAS array: index 0 grows to the patient's right, so the liver lies at higher x than the spleen.
    xs = torch.arange(image.shape[1]).view(-1, 1, 1).float()
    liver_x = (xs * (label[0] == 1)).sum() / (label[0] == 1).sum()
    spleen_x = (xs * (label[0] == 2)).sum() / (label[0] == 2).sum()
    assert liver_x > spleen_x


def test_zscore_mode_is_the_same_clip_with_another_affine_map(dataset, window_spec):
    zspec = {**window_spec, "intensity": {"mode": "zscore", "hu_min": -175.0, "hu_max": 250.0,
                                           "mean": 50.0, "std": 100.0}}
    item = dataset.test_items()[0]
    scaled = load_transforms(window_spec, keys=("image",))(item)["image"]
    zscored = load_transforms(zspec, keys=("image",))(item)["image"]
    torch.testing.assert_close(zscored * 100.0 + 50.0, scaled * 425.0 - 175.0, atol=1e-3, rtol=1e-5)


def one_hot(label: torch.Tensor, k: int) -> torch.Tensor:
    """1 x X x Y x Z class ids -> K x X x Y x Z."""
    return torch.nn.functional.one_hot(label[0].long(), k).permute(3, 0, 1, 2).float()


@pytest.mark.parametrize("class_balanced", [True, False])
def test_extra_keys_get_exactly_the_same_crops_and_flips(loaded_case, class_balanced):
    k, roi = 8, (24, 24, 16)
    item = {"image": loaded_case["image"], "label": loaded_case["label"],
            "teacher": one_hot(loaded_case["label"], k)}
    crops = random_crop_transforms(roi, k, extra_keys=("teacher",), num_samples=4, class_balanced=class_balanced,
                                   flip_prob=0.5, rotate_prob=0.5)
    for seed in range(2):
        crops.set_random_state(seed=seed)
        for sample in crops(item):
            assert sample["image"].shape == sample["label"].shape == (1, *roi)
            assert sample["teacher"].shape == (k, *roi)
            torch.testing.assert_close(torch.as_tensor(sample["teacher"]), one_hot(sample["label"], k))


def _axis_steps(volume: torch.Tensor) -> list[float]:
    """Sign of the step along X, Y, Z of a crop of the coordinate ramp (+1 as stored, -1 flipped)."""
    v = torch.as_tensor(volume)[0]
    return [float(torch.sign(v.diff(dim=axis)).mean()) for axis in range(3)]


def test_flip_and_rotate_probabilities_are_honoured():
    x, y, z = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), torch.arange(24.0), indexing="ij")
    item = {"image": (10000 * x + 100 * y + z)[None], "label": (x < 20).float()[None]}
    never = random_crop_transforms((16, 16, 8), 2, num_samples=20, class_balanced=False, flip_prob=0.0, rotate_prob=0.0)
    always = random_crop_transforms((16, 16, 8), 2, num_samples=20, class_balanced=False, flip_prob=1.0, rotate_prob=0.0)
    never.set_random_state(seed=0)
    always.set_random_state(seed=0)
    assert all(_axis_steps(s["image"]) == [1.0, 1.0, 1.0] for s in never(dict(item)))
    assert all(_axis_steps(s["image"]) == [-1.0, -1.0, -1.0] for s in always(dict(item)))
    # Rotated by 90 or 270 degrees, X of the crop runs along the volume's Y (steps of 100, not 10000).
    rotated = random_crop_transforms((16, 16, 8), 2, num_samples=20, class_balanced=False, flip_prob=0.0, rotate_prob=1.0)
    rotated.set_random_state(seed=0)
    steps = {abs(float(torch.as_tensor(s["image"])[0].diff(dim=0)[0, 0, 0])) for s in rotated(dict(item))}
    assert steps == {100.0, 10000.0}


def test_affine_moves_every_key_alike_and_intensity_jitter_touches_the_image_only(loaded_case):
    k, roi = 8, (24, 24, 16)
    item = {"image": loaded_case["image"], "label": loaded_case["label"], "teacher": loaded_case["image"].clone()}
    plain = random_crop_transforms(roi, k, extra_keys=("teacher",), num_samples=6, flip_prob=0.0, rotate_prob=0.0)
    warped = random_crop_transforms(roi, k, extra_keys=("teacher",), num_samples=6, flip_prob=0.0, rotate_prob=0.0,
                                    affine_prob=1.0, affine_rotate_deg=30.0, affine_scale=0.2)
    plain.set_random_state(seed=0)
    warped.set_random_state(seed=0)
    moved = 0
    for before, after in zip(plain(dict(item)), warped(dict(item))):
        assert after["image"].shape == after["label"].shape == (1, *roi)
        torch.testing.assert_close(torch.as_tensor(after["teacher"]), torch.as_tensor(after["image"]))  # same warp
        assert set(torch.unique(torch.as_tensor(after["label"])).tolist()) <= set(range(k))  # nearest: no blends
        moved += not torch.equal(torch.as_tensor(before["image"]), torch.as_tensor(after["image"]))
    assert moved == 6

    jitter = random_crop_transforms(roi, k, extra_keys=("teacher",), num_samples=6, flip_prob=0.0, rotate_prob=0.0,
                                    intensity_prob=1.0, intensity_shift=0.1, intensity_scale=0.1)
    jitter.set_random_state(seed=0)
    for sample in jitter(dict(item)):
        image, teacher = torch.as_tensor(sample["image"]), torch.as_tensor(sample["teacher"])
        assert not torch.allclose(image, teacher)
        # image = (teacher + shift) * factor, shift in ±0.1 and factor in 1 ± 0.1: an exact affine map of the teacher
        fit = torch.linalg.lstsq(torch.stack([teacher.flatten(), torch.ones(teacher.numel())], 1), image.flatten()[:, None])
        slope, offset = fit.solution.flatten().tolist()
        assert 0.9 - 1e-4 <= slope <= 1.1 + 1e-4 and abs(offset / slope) <= 0.1 + 1e-4


@pytest.mark.parametrize("kwargs, match", [({"flip_prob": 1.5}, "flip_prob"), ({"rotate_prob": -0.1}, "rotate_prob"),
                                           ({"affine_prob": 2}, "affine_prob"), ({"affine_scale": -0.1}, "affine_scale"),
                                           ({"intensity_prob": True}, "intensity_prob"),
                                           ({"intensity_shift": "0.1"}, "intensity_shift"),
                                           ({"roi_size": (16, 24, 8)}, "X and Y must be equal")])
def test_bad_augmentation_settings_are_refused(kwargs, match):
    args = {"roi_size": (16, 16, 8), **kwargs}
    with pytest.raises(DataError, match=match):
        random_crop_transforms(args.pop("roi_size"), 2, **args)
    if "roi_size" in kwargs:  # a non-square crop is fine without rotations
        random_crop_transforms(kwargs["roi_size"], 2, rotate_prob=0.0)


def test_class_balanced_crops_reach_every_organ(loaded_case):
    crops = random_crop_transforms((16, 16, 16), 8, num_samples=40)
    crops.set_random_state(seed=0)
    centres = {int(s["label"][0, 8, 8, 8]) for s in crops(dict(loaded_case))}
    assert centres == set(range(8))  # pancreas and aorta included, not only the liver


def test_train_dataset_batches_and_cache_modes(dataset, window_spec, tmp_path):
    items = dataset.items(dataset.case_ids[:2])
    transforms = train_transforms(window_spec, (32, 32, 16), dataset.num_classes, num_samples=2)
    train_set = make_dataset(items, transforms, cache="memory")
    loader = DataLoader(train_set, batch_size=2, collate_fn=list_data_collate)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, 32, 32, 16) and batch["label"].shape == (4, 1, 32, 32, 16)
    persistent = make_dataset(items[:1], val_transforms(window_spec), cache="persistent", cache_dir=tmp_path / "pc")
    assert persistent[0]["image"].shape[0] == 1 and any((tmp_path / "pc").iterdir())
    assert make_dataset(dataset.test_items(), val_transforms(window_spec, keys=("image",)), cache=None)[0][
        "image"].ndim == 4
    with pytest.raises(DataError, match="cache_dir"):
        make_dataset(items, transforms, cache="persistent")
    with pytest.raises(DataError, match="cache must be"):
        make_dataset(items, transforms, cache="disk")


def test_train_transforms_crop_cached_teacher_outputs_with_the_case(dataset, window_spec):
    # The pipeline's use: teacher outputs are computed once on the preprocessed volume (val_transforms)
    # and then travel with the file paths through train_transforms as an extra key.
    item = dataset.items(["phantom_001"])[0]
    preprocessed = val_transforms(window_spec)(item)
    item["teacher"] = one_hot(preprocessed["label"], dataset.num_classes)
    transforms = train_transforms(window_spec, (24, 24, 16), dataset.num_classes, extra_keys=("teacher",),
                                  num_samples=3)
    transforms.set_random_state(seed=1)
    for sample in transforms(item):
        assert sample["teacher"].shape == (dataset.num_classes, 24, 24, 16)
        torch.testing.assert_close(torch.as_tensor(sample["teacher"]), one_hot(sample["label"], dataset.num_classes))
