"""Cached against online distillation, measured in one run: time per step and per epoch, and the cache's size.

    python -m distill.mode_cost --run runs/demo [--student swinunetr_tiny] [--steps 12] [--lambda 0.5]

On a finished pipeline run (its ``data/``, teacher checkpoint and ``cache/``), the same student is
trained twice for the same number of steps from the same seed into a temporary folder: once reading the
teacher's cached logits (``distill.mode: cached``), once running the teacher on every crop
(``distill.mode: online``). Both use the same batch, crops and loss, so the ratio of their mean step times
is the cost of the teacher forward per step against reading and upsampling its stored targets. An epoch
here is one pass over the labelled training cases (``ceil(cases / batch)`` steps) in both modes; the
cached mode's one-off cost (running the teacher over every case once, from the cache manifest) is shown
beside it with the number of epochs after which it has paid for itself.

Size: the cache's bytes on disk against the same logits stored as float32 at full resolution.
Writes ``<run>/mode_cost.json`` (atomically) and prints a short table.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from data.atomic import write_json_atomic
from distill.stages import stage_artifact


class ModeCostError(ValueError):
    """A run folder that lacks what the comparison needs; the message names the file."""


def _find_cache(run: Path) -> Path:
    """The pipeline's cache folder (``<run>/cache/<key>``, from the stage record when there is one)."""
    recorded = stage_artifact(run / "cache", "cache")
    if recorded is not None and (recorded / "manifest.json").is_file():
        return recorded
    found = sorted(p.parent for p in (run / "cache").glob("*/manifest.json"))
    if len(found) != 1:
        raise ModeCostError(f"{run / 'cache'}: expected one teacher cache (a */manifest.json), found {len(found)}; "
                            "run the pipeline's cache stage first")
    return found[0]


def _run_config(run: Path) -> dict[str, Any]:
    """The run's config as a trained student recorded it (teacher.pt's when no student has finished)."""
    import torch

    for path in [*sorted((run / "students").glob("*/student.pt")), run / "teacher" / "teacher.pt"]:
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=False)["config"]
    raise ModeCostError(f"{run}: no students/*/student.pt or teacher/teacher.pt holding the run config")


def measure_modes(run: str | Path, student: str | None = None, steps: int = 12, lambda_kd: float | None = None,
                  threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``student`` ``steps`` steps in cached and in online mode on a finished run; return the figures.

    Args:
        run: pipeline run folder.
        student: student name (default: the run config's first ``student.names``).
        steps: training steps per mode (the first step includes one-off set-up and is part of the mean).
        lambda_kd: λ (default: the run config's ``distill.lambda_kd``, 0.5 if that is 0).
        threads: torch threads (default: the run config's ``run.threads``).
        progress: progress bars of the two short trainings.
    """
    from data.prepare import PreparedData
    from distill.cache import TeacherCache
    from distill.train import train_student

    run = Path(run).resolve()
    data_json = run / "data" / "data.json"
    teacher_pt = stage_artifact(run / "teacher", "teacher") or run / "teacher" / "teacher.pt"
    for path in (data_json, teacher_pt):
        if not path.is_file():
            raise ModeCostError(f"{path}: missing; run `python distill/run.py` for this run folder first")
    if steps < 2:
        raise ModeCostError(f"--steps must be at least 2, got {steps}")
    data = PreparedData.load(data_json)
    cache_dir = _find_cache(run)
    cache = TeacherCache(cache_dir)
    import torch

    cfg = _run_config(run)
    torch.set_num_threads(int(threads or cfg.get("run", {}).get("threads") or torch.get_num_threads()))
    name = student or cfg["student"]["names"][0]
    lam = float(lambda_kd if lambda_kd is not None else (cfg["distill"].get("lambda_kd") or 0.5))
    if lam <= 0:
        raise ModeCostError(f"--lambda must be > 0 (λ = 0 uses no teacher), got {lam}")
    # No validation inside the timed steps: one at the end (fit needs a best checkpoint), excluded from s/step.
    cfg["distill"] = {**cfg["distill"], "val_every": steps}
    cfg["data"] = {**cfg["data"], "use_unlabeled": False}  # the same labelled cases in both modes
    figures: dict[str, Any] = {"run": str(run), "student": name, "lambda_kd": lam, "steps": steps,
                               "batch_size": int(cfg["distill"]["batch_size"]), "roi_size": cfg["student"]["roi_size"],
                               "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="mode_cost_") as tmp:
        for mode in ("cached", "online"):
            cfg["distill"]["mode"] = mode
            result = train_student(cfg, run, name, lam, teacher_pt, cache_dir if mode == "cached" else None,
                                   out_dir=Path(tmp) / mode, steps=steps, data=data, progress=progress)
            figures[f"{mode}_s_per_step"] = result.seconds_per_step
    steps_per_epoch = math.ceil(len(data.student_cases()[0]) / figures["batch_size"])  # the labelled student cases
    for mode in ("cached", "online"):
        figures[f"{mode}_s_per_epoch"] = figures[f"{mode}_s_per_step"] * steps_per_epoch
    figures["steps_per_epoch"] = steps_per_epoch
    figures["online_over_cached"] = figures["online_s_per_step"] / figures["cached_s_per_step"]
    build_s = sum(float(e.get("seconds", 0.0)) for e in cache.entries.values())
    saved_per_epoch = figures["online_s_per_epoch"] - figures["cached_s_per_epoch"]
    figures["cache_build_s"] = build_s
    figures["cache_pays_off_after_epochs"] = build_s / saved_per_epoch if saved_per_epoch > 0 else None
    k = cache.num_classes
    full_fp32 = sum(4 * k * math.prod(int(s) for s in e["shape"]) for e in cache.entries.values())
    figures.update(cache_dir=str(cache_dir), cache_cases=len(cache.entries), cache_bytes=cache.size_bytes(),
                   full_res_fp32_bytes=full_fp32, size_ratio=full_fp32 / max(cache.size_bytes(), 1),
                   storage=cache.manifest.get("storage"))
    write_json_atomic(run / "mode_cost.json", figures)
    return figures


def format_mode_cost(f: dict[str, Any]) -> str:
    """The figures as a few readable lines."""
    pays = f["cache_pays_off_after_epochs"]
    return "\n".join([
        f"{f['student']} λ={f['lambda_kd']:g}, batch {f['batch_size']} of {f['roi_size']}, {f['steps']} steps per mode, "
        f"{f['threads']} threads:",
        f"  cached : {f['cached_s_per_step']:.3f} s/step, {f['cached_s_per_epoch']:.1f} s/epoch ({f['steps_per_epoch']} steps)",
        f"  online : {f['online_s_per_step']:.3f} s/step, {f['online_s_per_epoch']:.1f} s/epoch",
        f"  online / cached = {f['online_over_cached']:.2f}x per step; building the cache took {f['cache_build_s']:.1f} s "
        + (f"(paid back after {pays:.1f} epochs)" if pays is not None else "(never paid back at these step times)"),
        f"  cache {f['cache_bytes'] / 1e6:.2f} MB for {f['cache_cases']} cases vs {f['full_res_fp32_bytes'] / 1e6:.1f} MB "
        f"as float32 at full resolution ({f['size_ratio']:.1f}x smaller)",
    ])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished pipeline run folder (runs/<name>)")
    parser.add_argument("--student", default=None)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lambda", dest="lambda_kd", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the run's run.threads)")
    args = parser.parse_args(argv)
    try:
        figures = measure_modes(args.run, args.student, args.steps, args.lambda_kd, args.threads)
    except ModeCostError as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(format_mode_cost(figures))
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
