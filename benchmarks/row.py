"""One measurement row, run in a fresh process: ``python -m benchmarks.row SPEC.json OUT.json``.

A fresh process per row keeps rows independent (one runtime's thread pool or allocator does not
colour the next row) and makes its peak RSS that of this row alone.

Spec keys: ``entry`` (model entry dict), ``runtime``, ``precision``, ``threads``, ``workload``
(``"patch"`` or ``"volume"``), ``warmup``, ``repeats``; patch rows: ``roi_size``, ``batch``; volume rows:
``volume_path`` (NIfTI) and ``bundle`` (deploy bundle folder, for onnxruntime/openvino); optional
``dice_cases`` (list of ``[image, label]`` NIfTI paths) with ``labels`` (``{id: name}``) to score
after timing.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

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
        "dice" (when dice_cases given), "dice_per_case"}``.
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
                result.update(
                    _score(segment, spec["dice_cases"], spec["labels"], Path(tmp), spec.get("nsd_tolerance_mm", 2.0))
                )
    else:
        raise ValueError(f"unknown workload {spec['workload']!r} (patch | volume)")
    result["timing"] = timing.as_dict()
    result["base_rss_mb"] = base_rss
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def _score(segment: Callable, cases: list, labels: dict, tmp: Path, nsd_tolerance_mm: float) -> dict:
    """Mean foreground Dice of ``segment`` over labelled cases (``evaluation.metrics.summarize``)."""
    import nibabel as nib

    from evaluation.metrics import case_metrics, summarize

    names = {int(k): str(v) for k, v in labels.items()}
    rows, per_case = [], []
    for image_path, label_path in cases:
        out_path = tmp / f"pred_{Path(image_path).name}"
        segment(image_path, out_path)
        # both in canonical (RAS) orientation: the eager path writes its mask there
        pred_img = nib.as_closest_canonical(nib.load(str(out_path)))
        label_img = nib.as_closest_canonical(nib.load(str(label_path)))
        pred = np.asarray(pred_img.dataobj).astype(np.int64)
        label = np.asarray(label_img.dataobj).astype(np.int64)
        if pred.shape != label.shape:
            raise ValueError(f"{out_path}: predicted mask shape {pred.shape} differs from label {label_path} {label.shape}")
        spacing = [float(s) for s in label_img.header.get_zooms()[:3]]
        case_rows = case_metrics(pred, label, spacing, names, nsd_tolerance_mm)
        per_case.append(float(summarize(case_rows)["mean"]["dice"]))
        rows += [{**r, "case": str(image_path)} for r in case_rows]
    return {"dice": float(summarize(rows)["mean"]["dice"]), "dice_per_case": per_case}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m benchmarks.row SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    result = measure_row(spec)
    Path(args[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
