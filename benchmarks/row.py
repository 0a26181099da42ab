"""Measurement rows, run in a fresh process: ``python -m benchmarks.row SPEC.json OUT.json``.

A fresh process keeps rows of different models, runtimes and precisions independent (one runtime's thread pool or
allocator does not colour the next row). The patch and volume rows of one model × runtime × precision share one
(``{"rows": [patch spec, volume spec]}``; ``benchmarks.plan.process_groups``): the patch row's peak RSS is its own.

Spec keys: ``entry`` (model entry dict), ``runtime``, ``precision``, ``threads``, ``workload``
(``"patch"``, ``"volume"`` or ``"ct"``), ``warmup``, ``repeats``; patch rows: ``roi_size``, ``batch``; volume rows:
``volume_path`` (NIfTI) and ``bundle`` (deploy bundle folder, for onnxruntime/openvino); ct rows the same
(``benchmarks.ct``: a fresh ``deploy.infer`` process per call for deployed runtimes); optional
``dice_cases`` (list of ``[image, label]`` NIfTI paths) with ``pred_dir``: after timing, the row segments
each case into ``pred_dir`` and the harness scores the masks (``benchmarks.accuracy``) in its own process.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.measure import current_rss_mb, peak_rss_mb, time_runs
from benchmarks.volume import volume_segmenter


def _import_runtime(runtime: str) -> None:
    # Imported before the model is loaded so that base_rss_mb holds the library footprint.
    if runtime == "pytorch":
        import torch  # noqa: F401
    elif runtime == "onnxruntime":
        import onnxruntime  # noqa: F401
    elif runtime == "openvino":
        import openvino  # noqa: F401


def measure_row(spec: dict) -> dict:
    """Load the row's model, run its workload ``warmup`` + ``repeats`` times, and report.

    Args:
        spec: see the module docstring.

    Returns:
        ``{"timing": Timing dict, "load_ms", "base_rss_mb", "peak_rss_mb", "output_shape" (patch),
        "pred_paths" (when dice_cases given)}``.
    """
    from benchmarks.runtimes import load_predictor

    runtime, precision, threads = spec["runtime"], spec["precision"], int(spec["threads"])
    _import_runtime(runtime)
    base_rss = current_rss_mb()
    result: dict = {}
    start = time.perf_counter()
    if spec["workload"] == "patch":
        shape = [int(spec.get("batch", 1)), 1, *[int(s) for s in spec["roi_size"]]]
        predictor = load_predictor(spec["entry"], runtime, precision, threads, shape)
        result["load_ms"] = (time.perf_counter() - start) * 1000.0
        # CT after intensity scaling lies in [0, 1]; content does not change the arithmetic.
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        out = predictor(x)
        result["output_shape"] = list(out.shape)
        if not np.all(np.isfinite(out)):
            raise RuntimeError(f"{spec['entry'].get('name')}/{runtime}/{precision}: non-finite logits")
        timing = time_runs(lambda: predictor(x), warmup=int(spec["warmup"]), repeats=int(spec["repeats"]))
    elif spec["workload"] == "volume":
        segment = volume_segmenter(spec["entry"], runtime, precision, threads, spec.get("bundle"))
        result["load_ms"] = (time.perf_counter() - start) * 1000.0
        with tempfile.TemporaryDirectory(prefix="bench_volume_") as tmp:
            out_path = Path(tmp) / "mask.nii.gz"
            timing = time_runs(
                lambda: segment(spec["volume_path"], out_path), warmup=int(spec["warmup"]), repeats=int(spec["repeats"])
            )
        if spec.get("dice_cases"):
            pred_dir = Path(spec["pred_dir"])
            pred_dir.mkdir(parents=True, exist_ok=True)
            result["pred_paths"] = []
            for i, (image_path, _) in enumerate(spec["dice_cases"]):
                out_path = pred_dir / f"{i:03d}_{Path(image_path).name}"
                segment(image_path, out_path)
                result["pred_paths"].append(str(out_path))
    elif spec["workload"] == "ct":
        timing, extra = _ct_row(spec, runtime, precision, threads)
        result.update(extra)
    else:
        raise ValueError(f"unknown workload {spec['workload']!r} (patch | volume | ct)")
    result["timing"] = timing.as_dict()
    result["base_rss_mb"] = base_rss
    result["peak_rss_mb"] = max(peak_rss_mb(), result.pop("child_peak_rss_mb", 0.0) or 0.0)
    return result


def measure_rows(specs: list[dict]) -> dict:
    """Several rows of one model × runtime × precision × threads in this process, in order (``benchmarks.plan.
    process_groups``: the patch, then the volume). Each row's peak RSS is the process's when it ends, so the first
    row's is its own; every row reports the library footprint measured before the first model was loaded."""
    import gc

    out = []
    base = None
    for spec in specs:
        result = measure_row(spec)
        base = result["base_rss_mb"] if base is None else base
        result["base_rss_mb"] = base
        out.append(result)
        gc.collect()
    return {"rows": out}


def _ct_row(spec: dict, runtime: str, precision: str, threads: int):
    """Time the clinical-size CT end to end (``benchmarks.ct``); the last repeat's mask is kept for Dice."""
    import shutil

    from benchmarks.ct import deploy_infer
    from benchmarks.measure import timing_from_samples

    volume = spec["volume_path"]
    extra: dict = {}
    samples, reports = [], []
    with tempfile.TemporaryDirectory(prefix="bench_ct_") as tmp:
        out_path = Path(tmp) / "mask.nii.gz"
        for i in range(int(spec["warmup"]) + int(spec["repeats"])):
            if runtime == "pytorch":
                start = time.perf_counter()
                segment = volume_segmenter(spec["entry"], runtime, precision, threads, None)
                loaded = time.perf_counter()
                segment(volume, out_path)
                done = time.perf_counter()
                wall = done - start
                # the eager segmenter is Segmenter.segment_file bound to a Segmenter: its window count, as deploy's
                report = {"seconds": {"load": loaded - start, "segment": done - loaded},
                          "windows": segment.__self__.last_windows}
            else:
                report = deploy_infer(spec["bundle"], volume, out_path, runtime, precision, threads)
                wall = report["wall_s"]
            if i >= int(spec["warmup"]):
                samples.append(wall * 1000.0)
                reports.append(report)
        if spec.get("dice_cases"):
            pred_dir = Path(spec["pred_dir"])
            pred_dir.mkdir(parents=True, exist_ok=True)
            kept = pred_dir / f"000_{Path(volume).name}"
            shutil.copyfile(out_path, kept)
            extra["pred_paths"] = [str(kept)]
    last = reports[-1]
    extra["load_ms"] = 1000.0 * float(last["seconds"]["load"])
    extra["segment_ms"] = 1000.0 * float(last["seconds"]["segment"])
    extra["windows"] = last.get("windows")
    extra["child_peak_rss_mb"] = max((r.get("peak_rss_mb") or 0.0) for r in reports)
    return timing_from_samples(samples), extra


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m benchmarks.row SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    result = measure_rows(spec["rows"]) if "rows" in spec else measure_row(spec)
    Path(args[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
