"""The benchmark harness: GEMM peak, timing statistics, Pareto front, and a full run on a tiny ONNX model.

No timing assertions: speed targets live in benchmarks/targets.md. These tests check that the numbers
exist, are consistent (p95 >= p50 > 0) and land in every report file.
"""
import csv
import math

import numpy as np
import pytest
import torch

from benchmarks import CSV_COLUMNS, ModelEntry, cpu_supports_bf16, measure_gemm_peak, pareto_front, plan_rows, run_benchmarks
from benchmarks.crosscheck import CrossCheckError, parse_benchmark_app
from benchmarks.measure import MeasureError, time_runs, timing_from_samples
from benchmarks.peak import PeakError
from benchmarks.report import read_csv
from benchmarks.volume import sliding_window_count
from benchmarks.plan import process_groups


def test_gemm_peak_is_positive_and_bf16_is_measured_where_native():
    torch.set_num_threads(1)
    peak = measure_gemm_peak("fp32", threads=1, size=256, min_time_s=0.05)
    assert peak.gflops > 0 and peak.median_gflops > 0
    assert peak.gflops >= peak.median_gflops  # the peak is the best run
    assert peak.runs >= 3
    if cpu_supports_bf16():
        assert measure_gemm_peak("bf16", threads=1, size=256, min_time_s=0.05).gflops > 0
    with pytest.raises(PeakError, match="precision"):
        measure_gemm_peak("fp8")


def test_timing_percentiles_from_known_samples():
    t = timing_from_samples([10.0, 20.0, 30.0, 40.0, 100.0])
    assert t.p50_ms == 30.0
    assert t.p50_ms <= t.p95_ms <= 100.0
    assert t.min_ms == 10.0 and t.runs == 5
    calls = []
    timed = time_runs(lambda: calls.append(1), warmup=2, repeats=4)
    assert len(calls) == 6 and timed.runs == 4  # warm-up calls are not timed
    with pytest.raises(MeasureError):
        timing_from_samples([])


def test_pareto_front_on_hand_made_points():
    # (latency ms, Dice): b beats a on both; d is slowest but most accurate; c is dominated by b;
    # e has no Dice and is never on the front
    points = [(50.0, 0.70), (40.0, 0.80), (45.0, 0.75), (90.0, 0.85), (10.0, float("nan")), (20.0, 0.60)]
    assert pareto_front(points) == [5, 1, 3]
    assert pareto_front([(5.0, 0.5), (5.0, 0.5)]) == [0, 1]  # ties dominate neither
    assert pareto_front([]) == []


def test_sliding_window_count_matches_monai():
    from monai.inferers import sliding_window_inference

    calls = []

    def predictor(x):
        calls.append(1)
        return x

    sliding_window_inference(torch.zeros(1, 1, 70, 40, 20), (32, 32, 16), 1, predictor, overlap=0.25)
    assert sliding_window_count((70, 40, 20), (32, 32, 16), 0.25) == len(calls)


def test_benchmark_app_output_is_parsed_with_units():
    text = "[ INFO ] Latency:\n[ INFO ]    Median:        605.09 us\n[ INFO ]    Average:  1.5 ms\n[ INFO ] Throughput:   1096.44 FPS\n"
    figures = parse_benchmark_app(text)
    assert figures["median_ms"] == pytest.approx(0.60509)
    assert figures["average_ms"] == 1.5 and figures["throughput_fps"] == 1096.44
    with pytest.raises(CrossCheckError):
        parse_benchmark_app("nothing here")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """A two-layer Conv3d segmenter (1 → 3 classes) exported to ONNX, with its FLOPs per 32³ patch."""
    from student import describe

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 3, 1)).eval()
    path = tmp_path_factory.mktemp("tiny_onnx") / "model.onnx"
    torch.onnx.export(net, (torch.zeros(1, 1, 32, 32, 32),), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return path, describe(net, [32, 32, 32])["gflops"]


def test_plan_rows_follows_what_exists(tiny_onnx):
    path, _ = tiny_onnx
    entry = ModelEntry(name="tiny", roi_size=[32, 32, 32], num_classes=3, onnx=str(path))
    plans = plan_rows([entry], threads=[1, 2], workloads=["patch", "volume"], bf16_native=False)
    combos = {(p["runtime"], p["precision"], p["threads"], p["workload"]) for p in plans}
    # no eager model, no INT8 file, no bf16, no bundle for the volume workload
    assert combos == {("onnxruntime", "fp32", 1, "patch"), ("onnxruntime", "fp32", 2, "patch"),
                      ("openvino", "fp32", 1, "patch"), ("openvino", "fp32", 2, "patch")}


def test_patch_and_volume_rows_of_one_model_runtime_precision_and_threads_share_a_process():
    plans = [{"model": m, "runtime": r, "precision": "fp32", "threads": t, "workload": w}
             for w in ("patch", "volume", "ct") for m in ("a", "b") for r in ("pytorch", "openvino") for t in (1, 2)]
    groups = process_groups(plans)
    assert sorted(i for g in groups for i in g) == list(range(len(plans)))  # every row once
    for g in groups:
        rows = [plans[i] for i in g]
        if rows[0]["workload"] == "ct":
            assert len(rows) == 1  # a CT row measures its own process (deploy.infer children)
        else:
            assert [r["workload"] for r in rows] == ["patch", "volume"]  # the patch first: its peak RSS is its own
            assert len({(r["model"], r["runtime"], r["precision"], r["threads"]) for r in rows}) == 1
    assert len(groups) == 8 + 8


def test_harness_on_tiny_onnx_model_writes_every_report_file(tiny_onnx, tmp_path):
    path, gflops = tiny_onnx
    entry = ModelEntry(name="tiny_conv", roi_size=[32, 32, 32], num_classes=3, onnx=str(path), gflops=gflops)
    out = tmp_path / "bench"
    result = run_benchmarks([entry], out_dir=out, threads=[1], workloads=["patch"], warmup=1, repeats=3,
                            peak_size=256, cross_check=True, log_mlflow=False, progress=False)
    rows = result["rows"]
    runtimes = {(r["runtime"], r["precision"]) for r in rows}
    assert {("onnxruntime", "fp32"), ("openvino", "fp32")} <= runtimes
    assert (("openvino", "bf16") in runtimes) == cpu_supports_bf16()
    for r in rows:
        assert r["p95_ms"] >= r["p50_ms"] > 0
        assert r["throughput"] == pytest.approx(1000.0 / r["p50_ms"])
        assert r["peak_rss_mb"] >= r["base_rss_mb"] > 0
        assert r["size_mb"] == pytest.approx(path.stat().st_size / 1e6)
        assert r["gflops"] == pytest.approx(gflops) and r["pct_of_peak"] > 0
        assert r["speedup_vs_eager"] is None  # no eager row for an ONNX-only model
        assert r["dice"] is None  # no labelled cases given

    with open(out / "benchmark.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header[: len(CSV_COLUMNS)] == list(CSV_COLUMNS)
    written = read_csv(out / "benchmark.csv")
    assert len(written) == len(rows)
    assert all(math.isclose(w["p50_ms"], r["p50_ms"], rel_tol=1e-5) for w, r in zip(written, rows))

    md = (out / "report.md").read_text()
    assert "tiny_conv" in md and "GEMM peak" in md and "Dice is empty" in md
    assert "benchmark_app" in md and result["cross_checks"][0]["median_ms"] > 0
    for name in ("latency_patch.png", "dice_vs_latency_patch.png", "machine.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "latency_patch.png").read_bytes()[:4] == b"\x89PNG"
    assert result["machine"]["cpu_model"] and result["machine"]["versions"]["onnxruntime"]


def test_bad_inputs_are_refused_with_clear_errors(tmp_path):
    from benchmarks.latency import BenchmarkConfigError, entry_from_bundle

    with pytest.raises(BenchmarkConfigError, match="threads"):
        run_benchmarks([], out_dir=tmp_path, threads=[0])
    with pytest.raises(BenchmarkConfigError, match="model.json"):
        entry_from_bundle(tmp_path)
    with pytest.raises(BenchmarkConfigError, match="workloads"):
        run_benchmarks([], out_dir=tmp_path, workloads=["gpu"])


def test_scores_on_the_foreground_crop_equal_the_whole_volume_scores():
    from benchmarks.accuracy import crop_to_foreground
    from evaluation.metrics import case_metrics

    rng = np.random.default_rng(3)
    label = np.zeros((60, 50, 40), np.int64)
    label[20:35, 10:30, 5:25] = 1
    label[38:44, 30:36, 20:30] = 2
    pred = label.copy()
    noise = np.zeros(pred.shape, bool)
    noise[12:50, 4:44, 2:36] = rng.random((38, 40, 34)) < 0.02
    pred[noise] = 1  # scattered false positives, far from the organs' surfaces
    pred[30:36, 12:20, 5:10] = 0
    names = {0: "background", 1: "a", 2: "b"}
    whole = case_metrics(pred, label, [0.8, 0.8, 2.5], names, 2.0)
    cp, cl = crop_to_foreground(pred, label)
    assert cp.shape == (42, 44, 38)  # smaller than the volume
    cropped = case_metrics(cp, cl, [0.8, 0.8, 2.5], names, 2.0)
    for a, b in zip(whole, cropped):
        for key in ("dice", "nsd", "hd95"):
            assert a[key] == pytest.approx(b[key], abs=1e-9), (key, a, b)
    # a tight case: foreground only in a corner is cropped with background around it
    label2 = np.zeros((30, 30, 30), np.int64)
    label2[:4, :4, :4] = 1
    cp, cl = crop_to_foreground(label2, label2)
    assert cp.shape == (6, 6, 6)


def test_dice_only_scoring_gives_the_dice_of_the_full_metrics(tmp_path):
    import nibabel as nib

    from benchmarks.accuracy import score_masks

    rng = np.random.default_rng(4)
    label = np.zeros((30, 30, 20), np.uint8)
    label[5:20, 5:20, 5:15] = 1
    label[22:27, 22:27, 2:8] = 2
    pred = label.copy()
    pred[rng.random(pred.shape) < 0.05] = 3  # a class absent from the label: Dice 0, in the mean
    pred[10:14, 10:14, 5:9] = 0
    paths = []
    for name, arr in (("pred", pred), ("label", label)):
        nib.save(nib.Nifti1Image(arr, np.diag([0.8, 0.8, 2.5, 1.0])), str(tmp_path / f"{name}.nii.gz"))
        paths.append(str(tmp_path / f"{name}.nii.gz"))
    names = {0: "background", 1: "a", 2: "b", 3: "c", 4: "never"}
    full = score_masks([paths[0]], [(paths[1], paths[1])], names, 2.0)
    dice_only = score_masks([paths[0]], [(paths[1], paths[1])], names, 2.0, surface=False)
    assert dice_only["nsd"] is None and full["nsd"] is not None
    assert dice_only["dice"] == pytest.approx(full["dice"], abs=1e-6)  # MONAI computes in float32
    assert 0.3 < full["dice"] < 0.8  # the absent class 3 counts 0, class 4 (in neither) is left out
