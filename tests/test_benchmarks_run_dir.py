"""The benchmark harness on a pipeline-shaped run folder, and the step profile of a deployed segmentation.

The run folder is made the way pipeline/pipeline.py makes it: the data stage on phantoms (data/data.json
with validation and test splits), a student checkpoint, and its bundle at bundle/<student>/bundle/ written by
export.build_bundle. A small U-Net student keeps export to seconds; no timing is asserted.
"""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks import profile_segment_file, run_benchmarks
from benchmarks.latency import BenchmarkConfigError, config_kwargs, entries_from_run_dir
from benchmarks.volume import sliding_window_count


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """runs/<name>/ with data/data.json (1 training, 1 validation, 1 test case), students/unet_small/student.pt and
    bundle/unet_small/bundle/ (FP32), plus a stale half-written bundle copy that must be ignored."""
    from configs import load_config
    from data.prepare import prepare_data
    from export import build_bundle
    from student import build_student, save_student

    torch.set_num_threads(2)
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    cfg = load_config("demo", ["data.site.source=null", "data.phantom_cases=3", "data.phantom_test_cases=0", "data.phantom_size=[64,64,32]",
                               "data.val_fraction=0.34", "data.test_fraction=0.34"])
    data = prepare_data(cfg, run / "data", progress=False)
    ckpt = save_student(run / "students" / "unet_small" / "student.pt", build_student("unet_small", data.num_classes),
                        {"arch": {"name": "unet_small", "num_classes": data.num_classes, "in_channels": 1},
                         "roi_size": [32, 32, 32], "preprocess": data.preprocess, "labels": data.labels, "step": 0})
    bundle = build_bundle(ckpt, run / "bundle" / "unet_small" / "bundle", calibration=data.root, int8=False,
                          calibration_crops=2, validation_crops=0, log=lambda *_: None)
    shutil.copytree(bundle, run / "bundle" / "unet_small" / ".bundle.123.tmp")
    return run, bundle, data


def test_run_dir_rows_are_each_measured_once_and_scored_on_the_test_split(run_dir, tmp_path):
    run, bundle, data = run_dir
    entries, cases = entries_from_run_dir(run)
    assert [e.name for e in entries] == ["unet_small"]  # the student's folder; the hidden copy is skipped
    assert entries[0].torch == {"kind": "student", "path": str((run / "students" / "unet_small" / "student.pt").resolve())}
    assert len(data.test) == 1 and cases == [(c["image"], c["label"]) for c in data.test]

    # what pipeline/pipeline.py passes: the run dir and, again, its bundle
    # the eager (PyTorch) rows run the same code path but cost ~30 s of imports and sliding window here
    # Two thread counts and both workloads: 8 rows in 4 processes (patch and volume of one runtime × threads share
    # one), the runtime's Dice scored once and shown on each of its rows.
    section = {"quick": True, "threads": [1, 2], "workloads": ["patch", "volume"], "runtimes": ["onnxruntime", "openvino"],
               "precisions": ["fp32"], "max_dice_cases": 1, "cross_check": False}
    result = run_benchmarks(run_dir=run, bundles=[bundle], out_dir=tmp_path / "bench", nsd_tolerance_mm=4.0,
                            warmup=0, repeats=1, log_mlflow=False, progress=False, **config_kwargs(section))
    rows = result["rows"]
    keys = [(r["model"], r["runtime"], r["precision"], r["threads"], r["workload"]) for r in rows]
    assert sorted(keys) == sorted(("unet_small", rt, "fp32", t, w) for rt in ("onnxruntime", "openvino") for t in (1, 2)
                                  for w in ("patch", "volume"))
    assert [r["workload"] for r in rows] == ["patch"] * 4 + ["volume"] * 4  # report order, not process order
    for runtime in ("onnxruntime", "openvino"):
        scores = {(r["dice"], r["nsd"]) for r in rows if r["runtime"] == runtime}
        assert len(scores) == 1 and None not in next(iter(scores)), (runtime, scores)
    dice = {r["runtime"]: r["dice"] for r in rows}
    nsd = {r["runtime"]: r["nsd"] for r in rows}
    # The untrained student has no accuracy to put a floor under: the figures are checked instead. They are the
    # deployed model's on the scored case, its mask from deploy.Segmenter scored here by evaluation/.
    import nibabel as nib

    from deploy import Segmenter
    from evaluation.metrics import case_metrics, summarize

    image, label = cases[0]  # max_dice_cases=1
    mask = Segmenter(bundle, "onnxruntime", "fp32", threads=2).segment_file(image, tmp_path / "mask.nii.gz")
    reference = nib.load(label)
    expected = summarize(case_metrics(mask, np.asarray(reference.dataobj).astype(np.int64),
                                      [float(z) for z in reference.header.get_zooms()[:3]], data.labels,
                                      nsd_tolerance_mm=4.0))["mean"]
    assert dice["onnxruntime"] == pytest.approx(expected["dice"], abs=1e-6), (dice, expected)
    assert nsd["onnxruntime"] == pytest.approx(expected["nsd"], abs=1e-6), (nsd, expected)
    # the same weights on both runtimes: the same mask up to float rounding at class boundaries
    assert dice["onnxruntime"] == pytest.approx(dice["openvino"], abs=0.01)
    for r in rows:
        assert r["p95_ms"] >= r["p50_ms"] > 0
        # a deployed row's process holds no torch: far below the test process that runs it
        assert r["base_rss_mb"] <= r["peak_rss_mb"] < 1500
    md = (tmp_path / "bench" / "report.md").read_text()
    assert "held-out test case" in md and "unet_small" in md


def test_the_pipeline_measures_its_own_bundles_not_one_an_earlier_run_left_in_the_folder(run_dir, tmp_path):
    """A bundle of a student the run does not train (an earlier run's, with other student.names) is measured when the
    whole folder is asked for, and left out when the pipeline names its bundles (run_dir_bundles=False)."""
    run, _, _ = run_dir
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.copytree(copy / "bundle" / "unet_small", copy / "bundle" / "earlier_student")
    section = {"quick": True, "threads": [2], "workloads": ["patch"], "runtimes": ["openvino"],
               "precisions": ["fp32"], "cross_check": False}
    ours = copy / "bundle" / "unet_small" / "bundle"
    models = {}
    for whole_folder in (True, False):
        result = run_benchmarks(run_dir=copy, bundles=[ours], out_dir=tmp_path / f"bench_{whole_folder}",
                                warmup=0, repeats=1, log_mlflow=False, progress=False, run_dir_bundles=whole_folder,
                                **config_kwargs(section))
        models[whole_folder] = sorted(r["model"] for r in result["rows"])
    assert models == {True: ["earlier_student", "unet_small"], False: ["unet_small"]}


def test_eager_rows_segment_a_volume_as_the_deployed_bundle_does(run_dir, tmp_path):
    """PyTorch rows go through deploy's steps (body crop included): the same mask as ONNX Runtime's."""
    import nibabel as nib

    from benchmarks.volume import volume_segmenter

    run, bundle, data = run_dir
    entry = entries_from_run_dir(run)[0][0].as_dict()
    image = data.val[0]["image"]
    masks = {}
    for runtime in ("pytorch", "onnxruntime"):
        volume_segmenter(entry, runtime, "fp32", 2, entry["bundle"])(image, tmp_path / f"{runtime}.nii.gz")
        masks[runtime] = np.asarray(nib.load(str(tmp_path / f"{runtime}.nii.gz")).dataobj)
    assert masks["pytorch"].shape == nib.load(image).shape[:3]
    assert (masks["pytorch"] == masks["onnxruntime"]).mean() > 0.999


def test_a_child_reports_its_own_peak_memory_not_its_parents():
    ballast = np.ones(400 * 1024 * 1024 // 8)  # 400 MB resident in this (parent) process
    code = "from benchmarks.measure import peak_rss_mb; print(peak_rss_mb())"
    child_mb = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < child_mb < 300, child_mb  # Linux ru_maxrss would report the parent's 400+ MB here
    del ballast


def test_step_profile_times_the_deployed_steps_and_matches_segment_file(run_dir):
    from deploy import Segmenter

    _, bundle, data = run_dir
    volume = data.val[0]["image"]
    segmenter = Segmenter(bundle, "onnxruntime", "fp32", threads=2, batch_size=2)
    profile = profile_segment_file(segmenter, volume, repeats=1, warmup=0)  # raises if its mask differs
    assert set(profile.steps_ms) >= {"load", "reorient_resample", "model_calls", "window_blend", "resample_back", "save"}
    assert all(ms >= 0 for ms in profile.steps_ms.values()) and profile.steps_ms["model_calls"] > 0
    windows = sliding_window_count([max(s, 32) for s in profile.window_grid], [32, 32, 32], segmenter.overlap)
    assert profile.windows == windows and profile.model_calls == -(-windows // 2)  # 2 windows per call
    assert profile.total_ms == pytest.approx(sum(profile.steps_ms.values()), rel=0.5)
    assert "model_calls" in profile.table() and profile.segment_file_ms > 0


def test_run_dir_and_config_errors_name_the_problem(tmp_path):
    with pytest.raises(BenchmarkConfigError, match="run folder not found"):
        entries_from_run_dir(tmp_path / "missing")
    with pytest.raises(BenchmarkConfigError, match="no teacher.pt and no deploy bundle"):
        entries_from_run_dir(tmp_path)
    with pytest.raises(BenchmarkConfigError, match="unknown keys"):
        config_kwargs({"quick": True, "thread": [2]})
    (tmp_path / "bundle" / "s" / "bundle").mkdir(parents=True)
    (tmp_path / "bundle" / "s" / "bundle" / "model.json").write_text(json.dumps({"roi_size": [32, 32, 32]}))
    with pytest.raises(BenchmarkConfigError, match="lacks 'num_classes'"):
        entries_from_run_dir(tmp_path)


def test_resampling_back_in_slabs_gives_the_labels_of_resampling_the_whole_volume():
    from nibabel import orientations

    from deploy.geometry import _inverse_ornt, linear_resample, logits_to_source, to_model_grid

    rng = np.random.default_rng(0)
    affine = np.diag([-1.6, 0.9, 3.0, 1.0])  # LAS-like input, anisotropic: one axis shrinks, two grow
    image = rng.normal(size=(30, 41, 17)).astype(np.float32)
    resampled, geometry = to_model_grid(image, affine, [2.0, 2.0, 2.0])
    logits = rng.normal(size=(4, *resampled.shape)).astype(np.float32)
    steps = np.asarray(geometry.spacing_in) / np.asarray(geometry.spacing_out)
    whole = np.argmax(linear_resample(logits, geometry.oriented_shape, steps), axis=0)
    expected = orientations.apply_orientation(whole, _inverse_ornt(geometry.to_target))
    for chunk_voxels in (1, 500, 10**9):  # one plane per slab, a few planes, everything at once
        labels = logits_to_source(logits, geometry, chunk_voxels=chunk_voxels)
        assert labels.shape == image.shape and labels.dtype == np.uint8
        np.testing.assert_array_equal(labels, expected)


@pytest.mark.slow
def test_the_ct_workload_runs_deploy_infer_on_a_clinical_size_ct_and_scores_its_own_mask(run_dir, tmp_path):
    """512 x 512 x 200 at 0.8 x 0.8 x 2.5 mm through `python -m deploy.infer` (a fresh process per call) and the
    eager model through the same steps: the deployed mask scores the eager one's Dice on that CT's label."""
    from benchmarks.ct import CT_SIZE, clinical_phantom

    run, bundle, data = run_dir
    out = tmp_path / "bench"
    result = run_benchmarks(run_dir=run, out_dir=out, threads=[2], workloads=["ct"], runtimes=["pytorch", "openvino"],
                            precisions=["fp32"], quick=True, cross_check=False, log_mlflow=False, progress=False)
    rows = {r["runtime"]: r for r in result["rows"]}
    assert set(rows) == {"pytorch", "openvino"} and all(r["workload"] == "ct" for r in rows.values())
    assert rows["openvino"]["input_shape"] == "x".join(map(str, CT_SIZE))
    # the same weights through deploy.infer and through eager PyTorch: the same Dice to float rounding
    assert rows["pytorch"]["dice"] is not None
    assert abs(rows["openvino"]["dice"] - rows["pytorch"]["dice"]) < 0.005, rows
    # windows: deploy.infer's report and the eager segmenter's count, the same for the same preprocessing
    assert rows["openvino"]["windows"] == rows["pytorch"]["windows"] >= 2
    assert rows["openvino"]["gflops"] == pytest.approx(rows["openvino"]["windows"] * rows["pytorch"]["gflops"] / rows["pytorch"]["windows"])
    # the deploy process's own peak, read by deploy.infer itself: a torch-free process, far below the test's
    assert 50 < rows["openvino"]["peak_rss_mb"] < 1500
    md = (out / "report.md").read_text()
    assert "## Workload `ct`" in md and "deploy.infer" in md
    # the CT is generated once per report folder and reused
    image, _ = clinical_phantom(out / "ct_phantom")
    stamp = image.stat().st_mtime_ns
    assert clinical_phantom(out / "ct_phantom")[0].stat().st_mtime_ns == stamp
