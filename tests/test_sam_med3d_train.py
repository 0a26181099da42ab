"""SAM-Med3D as the trained teacher: teacher.train in auto and points mode, resume, teacher.pt round trip,
click evaluation through SAM-Med3D's own interactive path, and the pipeline from teacher to student."""
import json

import numpy as np
import pytest
import torch

from configs import load_config
from data.prepare import prepare_data
from deploy.postprocess import spec_classes
from teacher.checkpoint import load_teacher
from teacher.train import TeacherTrainError, train_teacher
from tests.recompute import recomputed_scores, replayed_clicks

torch.set_num_threads(2)


def tiny_config(phantom_dataset, *extra):
    """configs/sam_med3d_demo.yaml at test size: the tiny preset (32³ crops) on 8 mm phantoms (~26 x 26 x 30)."""
    return load_config("sam_med3d_demo", [
        f"data.source={phantom_dataset}", "preprocess.spacing_mm=[8.0, 8.0, 8.0]", "run.device=cpu",
        "teacher.preset=tiny", "teacher.roi_size=[32, 32, 32]", "teacher.apg_hidden=8", "teacher.batch_size=2",
        "teacher.warmup_steps=1", "teacher.val_every=2", "teacher.steps=2",
        # float32: bf16 autocast training is not reproducible on an AVX512-BF16 EPYC and once went NaN here in 2 steps
        "teacher.amp=false", *extra,
    ])


@pytest.fixture(scope="module")
def prepared(phantom_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sam_med3d_run")
    cfg = tiny_config(phantom_dataset)
    return cfg, run_dir, prepare_data(cfg, run_dir / "data", progress=False)


@pytest.fixture(scope="module")
def auto_run(prepared):
    cfg, run_dir, data = prepared
    return train_teacher(cfg, run_dir, data=data, progress=False, out_dir=run_dir / "auto")


@pytest.fixture(scope="module")
def sam_med3d_weights(prepared):
    """A checkpoint in the published SAM-Med3D layout (weights under ``model_state_dict``), tiny preset."""
    from teacher.sam_med3d import build_sam_med3d

    _, run_dir, _ = prepared
    torch.manual_seed(123)
    path = run_dir / "sam_med3d_tiny.pth"
    torch.save({"model_state_dict": build_sam_med3d(preset="tiny").state_dict(), "epoch": 1}, path)
    return path


@pytest.fixture(scope="module")
def points_run(prepared, sam_med3d_weights):
    """Points mode from pretrained weights: frozen encoders + LoRA, the decoder trains (the real-weights path)."""
    cfg, run_dir, data = prepared
    cfg = {**cfg, "teacher": {**cfg["teacher"], "prompt_mode": "points", "checkpoint": str(sam_med3d_weights),
                              "peft": "lora", "lora_rank": 2}}
    return train_teacher(cfg, run_dir, data=data, progress=False, out_dir=run_dir / "points")


def test_preprocessing_is_the_sam_med3d_zscore_over_voxels_above_zero(prepared):
    import nibabel as nib

    _, _, data = prepared
    voxels = np.concatenate([np.asarray(nib.load(c["image"]).dataobj, dtype=np.float64).ravel() for c in data.train])
    above = voxels[voxels > 0]  # SAM-Med3D's statistics: the voxels above 0 HU, over the training cases
    assert data.preprocess["intensity"] == pytest.approx(
        {"mode": "zscore", "mean": above.mean(), "std": above.std(), "hu_min": voxels.min(), "hu_max": voxels.max()})
    assert voxels.min() < -900.0  # air is in the clip range: no HU window

    from data.checks import DataError
    from data.stats import preprocess_spec

    with pytest.raises(DataError, match="'zscore' needs"):
        preprocess_spec({"spacing_mm": [4.0, 4.0, 4.0], "intensity": "zscore"}, None)


def test_auto_mode_trains_and_teacher_pt_rebuilds_the_same_model(prepared, auto_run):
    from teacher.build import build_teacher
    from training.checkpoint import load_checkpoint

    cfg, run_dir, data = prepared
    assert auto_run.last_step == 2 and auto_run.best_step == 2
    assert auto_run.best_metric == max(h["dice"] for h in auto_run.history)
    assert set(auto_run.per_class_dice) == {name for c, name in data.labels.items() if c}
    model, meta = load_teacher(auto_run.checkpoint)
    # Two steps teach nothing to rely on: the figures are checked, recomputed from teacher.pt on the validation case.
    scores = recomputed_scores(model, meta["roi_size"], data, data.val)
    assert scores["mean"]["dice"] == pytest.approx(auto_run.best_metric, abs=1e-6)
    assert {n: v["dice"] for n, v in scores["per_class"].items()} == pytest.approx(auto_run.per_class_dice, abs=1e-6)
    assert meta["teacher_cfg"]["backbone"] == "sam_med3d" and meta["teacher_cfg"]["preset"] == "tiny"
    assert meta["roi_size"] == [32, 32, 32] and meta["preprocess"] == data.preprocess
    assert meta["num_classes"] == data.num_classes and meta["step"] == 2

    # The best weights, put into a freshly built model, give what load_teacher's model gives ...
    torch.manual_seed(1)
    fresh = build_teacher(cfg["teacher"], data.num_classes).eval()
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        untrained = fresh(image)
        fresh.load_state_dict(load_checkpoint(run_dir / "auto" / "best.pt")["model"])
        expected = fresh(image)
        torch.testing.assert_close(model(image), expected)
    assert expected.shape == (1, data.num_classes, 32, 32, 32)
    assert not torch.allclose(untrained, expected)  # ... and training moved them


def test_a_killed_run_resumes_from_last_pt(prepared, auto_run):
    cfg, run_dir, data = prepared
    longer = train_teacher(cfg, run_dir, data=data, progress=False, out_dir=run_dir / "auto", steps=4)
    assert longer.resumed_from == 2 and longer.last_step == 4
    assert [h["step"] for h in longer.history] == [2, 4]
    _, meta = load_teacher(longer.checkpoint)
    assert meta["step"] == longer.best_step


def test_points_mode_trains_the_interactive_path_with_lora_on_pretrained_weights(prepared, points_run, sam_med3d_weights):
    cfg, run_dir, data = prepared
    assert points_run.last_step == 2 and points_run.best_metric == max(h["dice"] for h in points_run.history)
    model, meta = load_teacher(points_run.checkpoint)
    assert meta["teacher_cfg"]["prompt_mode"] == "points" and meta["encoder_pretrained"]
    # best_metric is the mean Dice after one click on the validation case: recomputed from teacher.pt.
    from data.transforms import load_transforms

    assert len(data.val) == 1
    case = load_transforms(data.preprocess, keys=("image", "label"))(dict(data.val[0]))
    one_click = replayed_clicks(model, case, data.labels, data.preprocess["spacing_mm"], meta["roi_size"], "points", 1,
                                2.0)
    assert points_run.best_metric == pytest.approx(np.mean([c[0]["dice"] for c in one_click.values()]), abs=1e-6)
    image = torch.randn(2, 1, 32, 32, 32)
    clicks = (torch.tensor([[[10.0, 12.0, 9.0]], [[20.0, 5.0, 16.0]]]), torch.tensor([[1], [1]]))
    with torch.no_grad():
        first = model(image, points=clicks, use_auto_prompt=False, low_res=True)
        assert first.shape == (2, 1, 16, 16, 16)
        refined = model(image, points=clicks, use_auto_prompt=False, mask_inputs=first)
    assert refined.shape == (2, 1, 32, 32, 32) and torch.isfinite(refined).all()

    # PEFT: the published encoder weights are kept as loaded, LoRA's B (zero at the start) and the decoder
    # moved, and the automatic head (no gradient in points mode) did not.
    published = torch.load(sam_med3d_weights, weights_only=True)["model_state_dict"]
    state = model.state_dict()
    torch.testing.assert_close(state["sam.image_encoder.blocks.0.attn.qkv.base.weight"],
                               published["image_encoder.blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(state["sam.prompt_encoder.point_embeddings.1.weight"],
                               published["prompt_encoder.point_embeddings.1.weight"])
    assert state["sam.image_encoder.blocks.0.attn.qkv.lora.b_q.weight"].abs().sum() > 0
    assert not torch.allclose(state["sam.mask_decoder.mask_tokens.weight"], published["mask_decoder.mask_tokens.weight"])
    from teacher.build import build_teacher

    torch.manual_seed(int(cfg["run"]["seed"]))  # train_teacher's initial weights
    initial = build_teacher({**cfg["teacher"], "checkpoint": str(sam_med3d_weights)}, data.num_classes)
    torch.testing.assert_close(model.class_tokens.weight, initial.class_tokens.weight)


def test_click_evaluation_of_a_sam_med3d_teacher(prepared, points_run, tmp_path, capsys):
    from teacher.clicks import click_segmenter, main
    from teacher.sam_med3d.interactive import SamMed3DClickSegmenter

    cfg, run_dir, data = prepared
    model, meta = load_teacher(points_run.checkpoint)
    # points: SAM-Med3D's own click path (binary mask, previous low-res logits fed back as mask prompt).
    assert isinstance(click_segmenter(model, 1, meta["roi_size"], "points"), SamMed3DClickSegmenter)
    summary = main(["--teacher", points_run.checkpoint, "--data", str(run_dir), "--clicks", "1,3",
                    "--max-cases", "1", "--out", str(tmp_path / "clicks.csv")])
    # The figures are those of the teacher's masks: every organ's Dice and NSD after 1 and 3 clicks, replayed
    # click by click outside teacher.clicks' protocol and summary.
    from data.transforms import load_transforms

    first = data.scoring_split()[1][0]  # --max-cases 1
    case = load_transforms(meta["preprocess"], keys=("image", "label"))(dict(first))
    for mode in ("points", "auto+points"):
        dice = summary["mean"][mode]["dice"]
        assert set(dice) == {1, 3}
        replayed = replayed_clicks(model, case, data.labels, meta["preprocess"]["spacing_mm"], meta["roi_size"], mode, 3,
                                   cfg["evaluation"]["nsd_tolerance_mm"])
        assert set(summary["per_class"]) == set(replayed)
        for class_id, curve in replayed.items():
            entry = summary["per_class"][class_id][mode]
            assert entry["dice"] == pytest.approx({1: curve[0]["dice"], 3: curve[2]["dice"]}, abs=1e-6), (mode, class_id)
            assert entry["nsd"] == pytest.approx({1: curve[0]["nsd"], 3: curve[2]["nsd"]}, abs=1e-6), (mode, class_id)
        means = {n: np.mean([c[n - 1]["dice"] for c in replayed.values()]) for n in (1, 3)}
        assert dice == pytest.approx(means, abs=1e-6)
    assert (tmp_path / "clicks.csv").is_file() and "D@3" in capsys.readouterr().out


def test_a_roi_size_other_than_the_preset_crop_is_refused_by_name(prepared):
    cfg, run_dir, data = prepared
    for roi in ([64, 64, 64], [32, 32, 16]):
        bad = {**cfg, "teacher": {**cfg["teacher"], "roi_size": roi}}
        with pytest.raises(TeacherTrainError, match=r"teacher\.roi_size.*'tiny' takes \[32, 32, 32\]"):
            train_teacher(bad, run_dir, data=data, progress=False, out_dir=run_dir / "bad")
    with pytest.raises(TeacherTrainError, match="teacher.preset"):
        train_teacher({**cfg, "teacher": {**cfg["teacher"], "preset": "vit_b"}}, run_dir, data=data, progress=False,
                      out_dir=run_dir / "bad")


def test_pipeline_trains_the_sam_med3d_teacher_caches_its_native_logits_and_distils(phantom_dataset, tmp_path):
    from distill.cache import TeacherCache
    from distill.run import main

    run_dir = tmp_path / "run"
    report = main(["--config", "sam_med3d_demo", "--out", str(run_dir), f"data.source={phantom_dataset}",
                   "preprocess.spacing_mm=[8.0, 8.0, 8.0]", "run.device=cpu", "run.threads=2",
                   "teacher.preset=tiny", "teacher.roi_size=[32, 32, 32]", "teacher.apg_hidden=8",
                   "teacher.steps=2", "teacher.val_every=2", "teacher.warmup_steps=1",
                   "student.roi_size=[32, 32, 32]", "distill.steps=2", "distill.val_every=2",
                   "distill.warmup_steps=1", "distill.batch_size=1"])
    assert set(report["models"]) == {"teacher", "unet_small", "unet_small (λ=0)"}
    # Nothing here trains long enough to learn (2 steps each): the figures are checked instead. Each model's is the
    # Dice of its checkpoint on the scoring split, and each checkpoint's best_dice its Dice on the validation split,
    # both recomputed from the files.
    from data.prepare import PreparedData
    from student import load_student

    prepared = PreparedData.load(run_dir / "data" / "data.json")
    for name, entry in report["models"].items():
        model, meta = (load_teacher if entry["kind"] == "teacher" else load_student)(entry["checkpoint"])
        # A student's test figure is after its own postprocessing (chosen on validation), as deploy segments.
        clean = spec_classes(meta.get("postprocess"), prepared.num_classes, entry["checkpoint"])
        scored = recomputed_scores(model, meta["roi_size"], prepared, prepared.scoring_split()[1], clean)
        assert entry["mean"]["dice"] == pytest.approx(scored["mean"]["dice"], abs=1e-6), name
        validated = recomputed_scores(model, meta["roi_size"], prepared, prepared.val)
        assert meta["best_dice"] == pytest.approx(validated["mean"]["dice"], abs=1e-6), name

    cache = TeacherCache(next((run_dir / "cache").glob("*/manifest.json")).parent)
    assert cache.manifest["storage"]["native_factor"] == 2  # tiny: 16³ logits per 32³ crop
    assert len(cache.entries) == len(prepared.train) + len(prepared.unlabelled)  # training cases + the unlabelled one
    data = json.loads((run_dir / "data" / "data.json").read_text())
    case = data["train"][0]
    entry = cache.entries[case["case_id"]]
    assert entry["stored_shape"] == [16, 16, 16]  # one window per 8 mm phantom: its native grid
    teacher, meta = load_teacher(run_dir / "teacher" / "teacher.pt")
    from data.transforms import load_transforms
    from evaluation.sliding_window import predict_logits

    image = load_transforms(meta["preprocess"], keys=("image",))({"image": case["image"]})["image"]
    exact = torch.as_tensor(predict_logits(teacher, torch.as_tensor(np.asarray(image)), meta["roi_size"], meta["num_classes"]))
    restored = cache.load(case["case_id"], image.shape[1:])
    assert (restored.argmax(0) == exact.argmax(0)).float().mean() > 0.99
    students = {s["name"] + (" (λ=0)" if s["lambda_kd"] == 0 else ""): s for s in report["students"]}
    assert students["unet_small"]["last_step"] == 2 and students["unet_small (λ=0)"]["last_step"] == 2


def test_correction_clicks_land_on_the_errors_with_their_sign():
    from teacher.point_sampling import sample_correction_clicks

    target = torch.zeros(3, 1, 8, 8, 8, dtype=torch.bool)
    target[:, :, 2:5, 2:5, 2:5] = True
    pred = target.clone()
    pred[0, 0, 2:5, 2:5, 2] = False   # crop 0 misses a slab of the target: positive click there
    pred[1, 0, 6:8, 6:8, 6:8] = True  # crop 1 over-segments a corner: negative click there
    torch.manual_seed(0)
    for _ in range(5):
        coords, labels = sample_correction_clicks(pred, target)
        (x0, y0, z0), (x1, y1, z1) = coords[0, 0].long().tolist(), coords[1, 0].long().tolist()
        assert labels[0, 0] == 1 and target[0, 0, x0, y0, z0] and not pred[0, 0, x0, y0, z0]
        assert labels[1, 0] == 0 and pred[1, 0, x1, y1, z1] and not target[1, 0, x1, y1, z1]
        assert labels[2, 0] == -1  # crop 2 is already right: a padding click, which prompts nothing


def test_peft_none_fine_tunes_pretrained_encoders_in_full(sam_med3d_weights):
    from teacher.sam_med3d import build_sam_med3d_teacher

    full = build_sam_med3d_teacher({"preset": "tiny", "peft": "none"}, 3, checkpoint=str(sam_med3d_weights))
    assert all(p.requires_grad for p in full.sam.image_encoder.parameters())
    assert not any(".lora." in n for n, _ in full.named_parameters())
    lora = build_sam_med3d_teacher({"preset": "tiny", "peft": "lora", "lora_rank": 2}, 3, checkpoint=str(sam_med3d_weights))
    trainable = [n for n, p in lora.sam.image_encoder.named_parameters() if p.requires_grad]
    assert trainable and all(".lora." in n for n in trainable)
