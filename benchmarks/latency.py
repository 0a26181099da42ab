"""Latency and accuracy of every model × runtime × precision × thread count, with the machine's peak.

    python -m benchmarks.latency --quick                       # untrained SwinUNETR-tiny, exported here
    python -m benchmarks.latency --run-dir runs/demo --threads 1,2
    python -m benchmarks.latency --bundle runs/demo/bundle/swinunetr_tiny/bundle --precisions fp32,int8

Rows: teacher (PyTorch eager) and every student on PyTorch eager, ONNX Runtime and OpenVINO, FP32,
bf16 where the CPU has it natively, INT8 where export wrote an INT8 model; two workloads (one ROI patch;
one whole CT volume end to end). Each model × runtime × precision × threads runs its patch and volume rows in a
fresh process, the patch first (``benchmarks.row``, ``benchmarks.plan.process_groups``); Dice and NSD of its
masks on held-out cases are scored here (``benchmarks.accuracy``). Output in
``--out``: ``benchmark.csv``, ``report.md``, ``latency_<workload>.png``, ``dice_vs_latency_<workload>.png``,
``machine.json``; logged to the active MLflow run, if any.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from configs.schema import BenchmarkConfig, defaults
from benchmarks import report
from benchmarks.accuracy import score_masks
from benchmarks.ct import CT_SEED, CT_SIZE, CT_SPACING_MM, clinical_phantom
from benchmarks.crosscheck import CrossCheckError, run_benchmark_app
from benchmarks.measure import MeasureError, run_module_in_subprocess
# model discovery and row planning are their own modules; these names stay importable from here
from benchmarks.models import (BenchmarkConfigError, ModelEntry, entries_from_run_dir, entry_from_bundle,  # noqa: F401
                               quick_entry, run_dir_cases)
from benchmarks.plan import plan_rows, process_groups, skipped_rows  # noqa: F401
from benchmarks.peak import cpu_supports_bf16, measure_peaks
from benchmarks.runtimes import PRECISIONS, RUNTIMES, model_files
from benchmarks.volume import resampled_shape, sliding_window_count

WORKLOADS = ("patch", "volume", "ct")


def run_benchmarks(
    entries: Sequence[ModelEntry] | None = None,
    *,
    run_dir: str | Path | None = None,
    bundles: Sequence[str | Path] = (),
    out_dir: str | Path = "runs/bench",
    threads: Sequence[int] = (2,),
    workloads: Sequence[str] = WORKLOADS,
    runtimes: Sequence[str] = RUNTIMES,
    precisions: Sequence[str] = PRECISIONS,
    quick: bool = False,
    warmup: int | None = None,
    repeats: int | None = None,
    volume_path: str | Path | None = None,
    dice_cases: Sequence[tuple[str, str]] | None = None,
    max_dice_cases: int | None = None,
    nsd_tolerance_mm: float = 2.0,
    cross_check: bool = True,
    log_mlflow: bool = True,
    peak_size: int | None = None,
    progress: bool = True,
    run_dir_bundles: bool = True,
) -> dict[str, Any]:
    """Measure every row, write the report and return it.

    Args:
        entries: models to benchmark; else taken from ``run_dir`` and ``bundles``; with none of the three,
            an untrained SwinUNETR-tiny is exported to a temporary bundle (Dice then empty).
        run_dir: pipeline run folder (teacher, bundles, test split).
        bundles: deploy bundle folders.
        out_dir: report folder.
        threads: thread counts, each measured for every row.
        workloads: ``patch``, ``volume`` and/or ``ct`` (clinical-size CT end to end, ``benchmarks.ct``).
        runtimes: subset of ``pytorch``, ``onnxruntime``, ``openvino``.
        precisions: subset of ``fp32``, ``bf16``, ``int8``.
        quick: few repeats and a small volume (a few minutes on 2 cores).
        warmup, repeats: untimed/timed calls per row (defaults: quick 1/3 patch, 1/2 volume; else 3/20, 1/5).
        volume_path: CT volume for the volume workload; else a phantom from ``data.phantom`` is written.
        dice_cases: ``(image, label)`` held-out cases; defaults to the run dir's test split.
        max_dice_cases: use at most this many held-out cases (the same ones for every row).
        nsd_tolerance_mm: NSD tolerance passed to the metrics (Dice does not depend on it).
        cross_check: run ``benchmark_app`` on one OpenVINO patch row.
        log_mlflow: log to the active MLflow run, if any.
        peak_size: GEMM matrix side (default 1024 quick, 2048 otherwise).
        progress: print one line per row.
        run_dir_bundles: measure every bundle found in ``run_dir``; ``False`` takes only its teacher and test
            cases from it, and the bundles measured are ``bundles`` alone (the pipeline's: this run's students,
            not one an earlier run with other ``student.names`` left in the folder).

    Returns:
        ``{"rows", "peaks", "machine", "cross_checks", "notes", "files": {name: path}}``.
    """
    threads = [int(t) for t in threads]
    if not threads or any(t < 1 for t in threads):
        raise BenchmarkConfigError(f"threads must be positive integers, got {threads}")
    for name, given, known_values in (("workloads", workloads, WORKLOADS), ("runtimes", runtimes, RUNTIMES),
                                      ("precisions", precisions, PRECISIONS)):
        bad = [v for v in given if v not in known_values]
        if bad or not given:
            raise BenchmarkConfigError(f"unknown or no {name} {list(given)}; known: {known_values}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_work_") as tmp:
        tmp = Path(tmp)
        entries = list(entries or [])
        dice_split = "given"
        if run_dir is not None:
            found, run_cases = entries_from_run_dir(run_dir)
            if not run_dir_bundles:
                wanted = {Path(b).resolve() for b in bundles}
                found = [e for e in found if not e.bundle or Path(e.bundle).resolve() in wanted]
            entries += found
            if dice_cases is None:
                dice_cases = run_cases
                dice_split = run_dir_cases(run_dir)[0] or "given"
                if dice_split == "val":
                    notes.append("The run has no test split: Dice is scored on validation cases, which chose the "
                                 "checkpoints and the INT8 settings; it is optimistic.")
        known = {Path(e.bundle).resolve() for e in entries if e.bundle}
        for b in bundles:  # the pipeline passes its bundles and the run dir that holds them: count each once
            if Path(b).resolve() not in known:
                entries.append(entry_from_bundle(b))
                known.add(Path(b).resolve())
        phantoms = None
        if not entries:
            phantoms = _phantom_dataset(tmp / "phantoms", quick)
            entries = [quick_entry(tmp / "quick", calibration=phantoms)]
            notes.append("No run dir or bundle given: an untrained SwinUNETR-tiny was exported to a temporary "
                         "bundle; its Dice is not measured (empty), its latencies are valid. Its OpenVINO INT8 model was "
                         "calibrated on 4 phantom crops and accepted without accuracy control (max_dice_drop=1); "
                         "no ONNX Runtime INT8 (export measured it 2.2x slower than FP32 on this model).")
        dice_cases = [tuple(map(str, c)) for c in (dice_cases or [])]
        if max_dice_cases is not None:
            dice_cases = dice_cases[: int(max_dice_cases)]
        if not dice_cases:
            notes.append("Dice is empty: no labelled held-out cases were given (a run dir's test split).")
        else:
            notes.append(f"Dice, NSD: mean foreground Dice and NSD (tolerance {nsd_tolerance_mm:g} mm) over the same "
                         f"{len(dice_cases)} held-out {'test ' if dice_split == 'test' else ''}case(s) for every row (whole-volume path, original grid); one "
                         f"score per model × runtime × precision, shown on each of its rows.")
            untrained = [e.name for e in entries if (e.torch or {}).get("kind") == "arch"]
            if untrained:
                notes.append(f"Eager rows of {untrained} use random weights (no checkpoint recorded): Dice not scored for them.")

        bf16_native = cpu_supports_bf16()
        _count_gflops(entries)
        peak_size = peak_size or (1024 if quick else 2048)
        peaks = measure_peaks(threads, size=peak_size, min_time_s=0.3 if quick else 1.0)
        if progress:
            for p in peaks.values():
                print(f"[bench] GEMM peak {p.precision} t{p.threads}: {p.gflops:.1f} GFLOP/s")

        volume_info: dict[str, Any] = {}
        if "volume" in workloads:
            if volume_path is None and phantoms is None:
                phantoms = _phantom_dataset(tmp / "volume", quick, cases=1)
            volume_path, volume_info = _volume(volume_path, phantoms)
        ct_info: dict[str, Any] = {}
        if "ct" in workloads:
            ct_image, ct_label = clinical_phantom(out_dir / "ct_phantom")
            _, ct_info = _volume(ct_image, None)
            ct_info["source"] = f"clinical-size phantom (data.phantom, seed {CT_SEED})"
            ct_info["description"] = (f"{ct_info['source']}, {CT_SIZE[0]}×{CT_SIZE[1]}×{CT_SIZE[2]} voxels at "
                                      f"{list(CT_SPACING_MM)} mm")
            ct_info["label"] = str(ct_label)
        warm_c, rep_c = (0, 1) if quick else (1, 3)
        warm_p, rep_p = (1, 3) if quick else (3, 20)
        warm_v, rep_v = (1, 2) if quick else (1, 5)
        if warmup is not None:
            warm_p = warm_v = int(warmup)
        if repeats is not None:
            rep_p = rep_v = int(repeats)

        by_name = {e.name: e for e in entries}
        dice_done: dict[tuple[str, str, str], dict] = {}
        plans = plan_rows(entries, threads, workloads, bf16_native, runtimes, precisions)
        specs: list[dict[str, Any]] = []
        for n, plan in enumerate(plans):
            entry = by_name[plan["model"]]
            spec: dict[str, Any] = {**plan, "entry": entry.as_dict()}
            if plan["workload"] == "patch":
                spec.update(roi_size=entry.roi_size, batch=1, warmup=warm_p, repeats=rep_p)
            elif plan["workload"] == "ct":
                spec.update(volume_path=ct_info["path"], bundle=entry.bundle, warmup=warm_c, repeats=rep_c)
                if (entry.torch or {}).get("kind") != "arch" or plan["runtime"] != "pytorch":
                    spec.update(dice_cases=[[ct_info["path"], ct_info["label"]]],
                                pred_dir=str(tmp / "pred" / f"row{n:03d}_ct"))
            else:
                spec.update(volume_path=str(volume_path), bundle=entry.bundle, warmup=warm_v, repeats=rep_v)
            specs.append(spec)
        results: dict[int, dict] = {}
        for group in process_groups(plans):
            group_started = time.perf_counter()
            for i in group:  # Dice once per model × runtime × precision: on its first volume row that runs
                plan, entry = plans[i], by_name[plans[i]["model"]]
                key = (plan["model"], plan["runtime"], plan["precision"])
                scorable = dice_cases and (entry.torch or {}).get("kind") != "arch" if plan["runtime"] == "pytorch" else dice_cases
                if plan["workload"] == "volume" and scorable and key not in dice_done:
                    specs[i].update(dice_cases=[list(c) for c in dice_cases],
                                    pred_dir=str(tmp / "pred" / f"row{i:03d}_{plan['threads']}"))
            try:
                outcome = run_module_in_subprocess("benchmarks.row", {"rows": [specs[i] for i in group]},
                                                   plans[group[0]]["threads"])["rows"]
            except MeasureError as exc:
                for i in group:
                    plan = plans[i]
                    notes.append(f"FAILED {plan['model']} {plan['runtime']} {plan['precision']} t{plan['threads']} "
                                 f"{plan['workload']}: {str(exc).splitlines()[-1][:300]}")
                    if progress:
                        print(f"[bench] {notes[-1]}")
                continue
            for i, result in zip(group, outcome):
                plan, entry = plans[i], by_name[plans[i]["model"]]
                if result.get("pred_paths") and plan["workload"] == "ct":
                    dice_done[(plan["model"], plan["runtime"], plan["precision"], "ct")] = score_masks(
                        result["pred_paths"], [(ct_info["path"], ct_info["label"])], entry.labels or {}, nsd_tolerance_mm,
                        surface=False)
                elif result.get("pred_paths"):
                    dice_done[(plan["model"], plan["runtime"], plan["precision"])] = score_masks(
                        result["pred_paths"], dice_cases, entry.labels or {}, nsd_tolerance_mm)
                results[i] = _row(plan, entry, result, ct_info if plan["workload"] == "ct" else volume_info)
                if progress:
                    r = results[i]
                    print(f"[bench] {r['model']} {r['runtime']} {r['precision']} t{r['threads']} {r['workload']}: "
                          f"p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, peak RSS {r['peak_rss_mb']:.0f} MB"
                          f"{', with Dice' if result.get('pred_paths') else ''}")
            if progress:
                print(f"[bench] ({len(group)} row{'s' if len(group) > 1 else ''} in one process: "
                      f"{time.perf_counter() - group_started:.1f} s)")
        rows: list[dict] = [results[i] for i in sorted(results)]
        for r in rows:
            key = (r["model"], r["runtime"], r["precision"]) + (("ct",) if r["workload"] == "ct" else ())
            scores = dice_done.get(key, {})
            r["dice"], r["nsd"] = scores.get("dice"), scores.get("nsd")
        _ratios(rows, {k: v for k, v in ((k, p.gflops) for k, p in peaks.items())})

        check_started = time.perf_counter()
        cross_checks = _cross_check(rows, entries, notes) if cross_check else []
        if progress and cross_checks:
            print(f"[bench] benchmark_app cross-check: {time.perf_counter() - check_started:.1f} s")
    notes += skipped_rows(entries, bf16_native)
    notes.append(f"Benchmark wall time: {time.perf_counter() - started:.0f} s.")
    workload_text = {"patch": "one ROI patch (batch 1, random input in [0, 1]); throughput in patches/s"}
    if "volume" in workloads:
        workload_text["volume"] = (
            f"one CT volume end to end (load, preprocess, sliding window, postprocess, save): {volume_info['description']}; "
            "throughput in volumes/min; GFLOPs = per-patch GFLOPs × windows")
    if "ct" in workloads:
        workload_text["ct"] = (
            f"a clinical-size CT end to end: {ct_info['description']}. Deployed rows: `python -m deploy.infer` in a "
            "fresh process, command to mask on disk (interpreter, bundle check and compile, gzip read, checks, "
            "resampling, windows, resampling back, write); PyTorch rows: model load + segment_file in-process (no "
            "interpreter start). Dice: of this CT's own mask against its label (not the test split; NSD not scored on "
            "52 M voxels); "
            "GFLOPs = per-patch GFLOPs × the windows the body box needs; throughput in volumes/min")
        notes.append("ct rows' Dice is that one CT's: the goal is the deployed rows within 0.5 Dice points of the "
                     "PyTorch FP32 row of the same model.")
    machine = report.machine_info()
    peak_dicts = [p.as_dict() for p in peaks.values()]
    files = {
        "csv": report.write_csv(rows, out_dir / "benchmark.csv"),
        "markdown": report.write_markdown(rows, out_dir / "report.md", machine, peak_dicts, workload_text, cross_checks, notes),
        "machine": report.write_machine_json(out_dir / "machine.json", machine, peak_dicts,
                                             {"volume": volume_info, "ct": ct_info, "cross_checks": cross_checks}),
    }
    for workload in workloads:
        if any(r["workload"] == workload for r in rows):
            files[f"latency_{workload}"] = report.plot_latency(rows, out_dir / f"latency_{workload}.png", workload)
            files[f"dice_vs_latency_{workload}"] = report.plot_dice_vs_latency(rows, out_dir / f"dice_vs_latency_{workload}.png", workload)
    if log_mlflow:
        report.log_to_mlflow(out_dir, rows)
    return {"rows": rows, "peaks": peak_dicts, "machine": machine, "cross_checks": cross_checks, "notes": notes,
            "files": {k: str(v) for k, v in files.items()}}


def config_kwargs(section: dict) -> dict[str, Any]:
    """``run_benchmarks`` keyword arguments from a config's ``benchmark:`` section.

    Args:
        section: e.g. ``cfg["benchmark"]`` of configs/demo.yaml (``enabled`` is the caller's business).
    """
    known = defaults(BenchmarkConfig)  # the keys and their defaults (configs/schema.py)
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise BenchmarkConfigError(f"benchmark section: unknown keys {unknown}; known: {sorted(known)}")
    s = {**known, **section}
    return {
        "quick": bool(s["quick"]),
        "threads": [int(t) for t in s["threads"]],
        "workloads": list(s["workloads"]),
        "runtimes": list(s["runtimes"] or RUNTIMES),
        "precisions": list(s["precisions"] or PRECISIONS),
        "max_dice_cases": s["max_dice_cases"],
        "cross_check": bool(s["cross_check"]),
        "volume_path": s["volume"],
    }


def _count_gflops(entries: Sequence[ModelEntry]) -> None:
    """Fill ``gflops`` (one patch) and ``param_mb`` from the eager model where one exists."""
    from benchmarks.runtimes import load_torch_model
    from student import describe

    for entry in entries:
        if entry.torch is None or (entry.gflops is not None and entry.param_mb is not None):
            continue
        model, _ = load_torch_model(entry.torch)
        if entry.gflops is None:
            # every model maps B x 1 x roi (docs/interfaces.md); the teacher's first conv is SAM's 3-channel one
            entry.gflops = describe(model, entry.roi_size, in_channels=1)["gflops"]
        if entry.param_mb is None:
            state = model.state_dict().values()
            entry.param_mb = sum(t.numel() * t.element_size() for t in state) / 1e6


def _phantom_dataset(root: Path, quick: bool, cases: int = 2) -> Path:
    """A phantom dataset (``data.phantom``): 96×96×48 voxels in quick mode, else 192×160×96."""
    from data.phantom_dataset import write_dataset

    size = (96, 96, 48) if quick else (192, 160, 96)
    return Path(write_dataset(root, cases=cases, test_cases=0, seed=0, size=size) or root)


def _volume(volume_path: str | Path | None, phantoms: Path | None) -> tuple[Path, dict]:
    """The volume of the volume workload (``volume_path``, else the first case of ``phantoms``) and its
    description (shape, spacing)."""
    import nibabel as nib

    if volume_path is None:
        candidates = sorted(Path(phantoms).glob("imagesTr/*.nii*"))
        if not candidates:
            raise BenchmarkConfigError(f"{phantoms}: data.phantom_dataset.write_dataset wrote no imagesTr volume")
        volume_path = candidates[0]
        source = "synthetic phantom (data.phantom)"
    else:
        if not Path(volume_path).is_file():
            raise BenchmarkConfigError(f"{volume_path}: volume for the volume workload not found")
        source = str(volume_path)
    img = nib.load(str(volume_path))
    shape = [int(s) for s in img.shape[:3]]
    spacing = [round(float(s), 3) for s in img.header.get_zooms()[:3]]
    info = {"path": str(volume_path), "shape": shape, "spacing_mm": spacing, "source": source,
            "description": f"{source}, {shape[0]}×{shape[1]}×{shape[2]} voxels at {spacing} mm"}
    return Path(volume_path), info


def _row(plan: dict, entry: ModelEntry, result: dict, volume_info: dict) -> dict:
    timing = result["timing"]
    files = model_files(entry.as_dict(), plan["runtime"], plan["precision"])
    size_mb = sum(f.stat().st_size for f in files if f.is_file()) / 1e6 if files else entry.param_mb
    gflops = entry.gflops
    if plan["workload"] == "patch":
        throughput, unit, shape = 1000.0 / timing["p50_ms"], "patches/s", "1x1x" + "x".join(map(str, entry.roi_size))
    elif plan["workload"] == "ct":
        throughput, unit = 60000.0 / timing["p50_ms"], "volumes/min"
        shape = "x".join(map(str, volume_info["shape"]))
        gflops = gflops * result["windows"] if gflops is not None and result.get("windows") else None
    else:
        throughput, unit = 60000.0 / timing["p50_ms"], "volumes/min"
        shape = "x".join(map(str, volume_info["shape"]))
        if gflops is not None and entry.preprocess:
            grid = resampled_shape(volume_info["shape"], volume_info["spacing_mm"], entry.preprocess["spacing_mm"])
            gflops = gflops * sliding_window_count(grid, entry.roi_size, entry.overlap)
    return {
        **plan,
        "p50_ms": timing["p50_ms"], "p95_ms": timing["p95_ms"], "throughput": throughput,
        "peak_rss_mb": result["peak_rss_mb"], "size_mb": size_mb, "gflops": gflops,
        "pct_of_peak": None, "speedup_vs_eager": None, "dice": None, "nsd": None,
        "throughput_unit": unit, "base_rss_mb": result["base_rss_mb"], "runs": timing["runs"],
        "input_shape": shape, "note": f"load {result['load_ms']:.0f} ms" + (
            f", segment {result['segment_ms']:.0f} ms, {result['windows'] or '?'} windows" if plan["workload"] == "ct" else ""),
        "windows": result.get("windows"),
    }


def _ratios(rows: list[dict], peaks: dict[tuple[str, int], float]) -> None:
    """Fill ``pct_of_peak`` and ``speedup_vs_eager`` in place."""
    eager = {(r["model"], r["threads"], r["workload"]): r["p50_ms"] for r in rows
             if r["runtime"] == "pytorch" and r["precision"] == "fp32"}
    for r in rows:
        # INT8 has no GEMM peak of its own here; it is read against the FP32 ceiling (stated in the report).
        peak = peaks.get(("bf16" if r["precision"] == "bf16" else "fp32", r["threads"]))
        if r["gflops"] is not None and peak:
            r["pct_of_peak"] = 100.0 * r["gflops"] / (r["p50_ms"] / 1000.0) / peak
        base = eager.get((r["model"], r["threads"], r["workload"]))
        r["speedup_vs_eager"] = base / r["p50_ms"] if base else None


def _cross_check(rows: list[dict], entries: Sequence[ModelEntry], notes: list[str]) -> list[dict]:
    """``benchmark_app`` on the first OpenVINO FP32 patch row."""
    row = next((r for r in rows if r["runtime"] == "openvino" and r["precision"] == "fp32" and r["workload"] == "patch"), None)
    if row is None:
        return []
    entry = next(e for e in entries if e.name == row["model"])
    model_path = model_files(entry.as_dict(), "openvino", "fp32")[0]
    try:
        figures = run_benchmark_app(model_path, [1, 1, *entry.roi_size], row["threads"], "fp32", niter=max(10, row["runs"]))
    except CrossCheckError as exc:
        notes.append(f"benchmark_app cross-check failed: {str(exc).splitlines()[0]}")
        return []
    return [{"model": row["model"], "precision": "fp32", "threads": row["threads"], "harness_p50_ms": row["p50_ms"], **figures}]


def _parse_threads(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise BenchmarkConfigError(f"--threads {text!r}: expected comma-separated integers like 1,2") from exc
    if not values or any(v < 1 for v in values):
        raise BenchmarkConfigError(f"--threads {text!r}: expected positive integers")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, small volume (minutes on 2 cores)")
    parser.add_argument("--run-dir", help="pipeline run folder (teacher, bundles, validation split)")
    parser.add_argument("--bundle", action="append", default=[], help="deploy bundle folder (repeatable)")
    parser.add_argument("--threads", default="2", help="comma-separated thread counts, e.g. 1,2")
    parser.add_argument("--workloads", default="patch,volume",
                        help="comma-separated subset of patch,volume,ct (ct: a 512x512x200 CT at 0.8x0.8x2.5 mm "
                             "end to end through deploy.infer)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="subset of " + ",".join(RUNTIMES))
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="subset of " + ",".join(PRECISIONS))
    parser.add_argument("--volume", help="NIfTI volume for the volume workload (default: a phantom)")
    parser.add_argument("--max-dice-cases", type=int, default=None, help="score at most this many held-out cases")
    parser.add_argument("--no-cross-check", action="store_true", help="skip the benchmark_app cross-check")
    parser.add_argument("--out", default="runs/bench", help="report folder")
    args = parser.parse_args(argv)
    try:
        result = run_benchmarks(
            run_dir=args.run_dir, bundles=args.bundle, out_dir=args.out, threads=_parse_threads(args.threads),
            workloads=[w.strip() for w in args.workloads.split(",") if w.strip()], quick=args.quick,
            runtimes=[r.strip() for r in args.runtimes.split(",") if r.strip()],
            precisions=[p.strip() for p in args.precisions.split(",") if p.strip()],
            volume_path=args.volume, max_dice_cases=args.max_dice_cases, cross_check=not args.no_cross_check,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[bench] {len(result['rows'])} rows → {result['files']['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
