"""``python -m distill.tune``: the λ search as a command (create a study, run workers, or both), with the data,
teacher and cache stages it needs run by the pipeline."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import optuna

from commands.args import add_run_arguments, run_config
from data.prepare import PreparedData
from distill import tune
from distill.tune_local import READY_ENV
from distill.tune import (ATTR_CACHE, ATTR_TARGET, ATTR_TEACHER, TuneError, count_trials, create_tuning_study,
                          default_storage, load_tuning_study, masked_url, run_worker, tune_lambda, tuning_run)


def _prepared_inputs(args: argparse.Namespace, cfg: dict, run_dir: Path,
                     study: optuna.Study | None = None) -> tuple[PreparedData, Path | None, Path | None]:
    """Data, teacher cache and teacher for a worker: from ``--cache`` / the study / the run folder on disk."""
    data = PreparedData.load(args.data or run_dir / "data" / "data.json")
    attrs = study.user_attrs if study is not None else {}
    cache = args.cache or attrs.get(ATTR_CACHE)
    teacher = attrs.get(ATTR_TEACHER)
    if cache is not None and not Path(cache).is_dir():
        raise TuneError(f"teacher cache {cache} is not a folder on this machine (share the run folder, or pass --cache)")
    return data, Path(cache) if cache else None, Path(teacher) if teacher else None


def main(argv: Sequence[str] | None = None) -> dict | int | None:
    """Command line (see the module docstring)."""
    from configs import apply_overrides
    from training.tracking import Tracker

    parser = argparse.ArgumentParser(prog="python -m distill.tune", description=tune.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=None, help="run folder (default runs/<run.name>)")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///<run dir>/optuna.db)")
    parser.add_argument("--study", default=None, help="study name (default <run.name>-lambda)")
    parser.add_argument("--trials", type=int, default=None, help="target finished trials (default tune.trials)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--create", action="store_true", help="prepare inputs and create the study, then exit")
    mode.add_argument("--worker", action="store_true", help="work on an existing study until it reaches its target")
    parser.add_argument("--cache", default=None,
                        help="use this teacher cache and the run folder's data.json instead of running the data, "
                             "teacher and cache stages")
    parser.add_argument("--data", default=None, help="prepared data (default <run dir>/data/data.json)")
    add_run_arguments(parser, teacher=False, example="tune.steps_per_trial=20", tracking_default="sqlite:///<run dir>/mlflow.db")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of this process (default run.threads; tune.workers' helpers get a share)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default run.name, as the pipeline's)")
    parser.add_argument("--no-tracking", action="store_true",
                        help="record nothing in MLflow (a helper of a caller whose tracking is off: tune.workers)")
    args = parser.parse_args(argv)

    cfg = run_config(args)
    if args.storage:
        cfg = apply_overrides(cfg, [f"tune.storage={args.storage}"], strict=False)
    run_dir = Path(args.run_dir or Path("runs") / str(cfg["run"]["name"])).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)  # the default SQLite storage lives in it ("unable to open" otherwise)
    import torch

    threads = args.threads or cfg["run"]["threads"]
    if threads:
        torch.set_num_threads(int(threads))
    tracker = Tracker(run_dir, experiment=args.experiment or str(cfg["run"]["name"]), enabled=not args.no_tracking,
                      tracking_uri=args.tracking_uri)
    print(f"[tune] config {args.config} {' '.join(args.overrides)}; run folder {run_dir}; "
          f"{torch.get_num_threads()} torch thread(s)")

    if args.worker:
        study = load_tuning_study(cfg, run_dir, args.storage, args.study)
        if args.trials:
            study.set_user_attr(ATTR_TARGET, int(args.trials))
        data, cache_dir, teacher_ckpt = _prepared_inputs(args, cfg, run_dir, study)
        ready = os.environ.get(READY_ENV)  # a caller that started this worker waits for it (distill.tune_local)
        if ready:
            Path(ready).touch()
        with tuning_run(tracker, study.study_name):
            ran = run_worker(cfg, run_dir, data, cache_dir, teacher_ckpt, tracker, study=study)
        print(f"[tune] worker done: {ran} trial(s) run here; study {study.study_name}: {count_trials(study).by_state}")
        return ran

    with _inputs_stage(args, cfg, run_dir) as (data, cache_dir, teacher_ckpt, pipeline_tracker):
        tracker = pipeline_tracker or tracker
        if args.create:
            study = create_tuning_study(cfg, run_dir, args.storage, args.study, args.trials, cache_dir=cache_dir,
                                        teacher_ckpt=teacher_ckpt, tracker=tracker)
            url = args.storage or cfg["tune"].get("storage") or default_storage(run_dir)
            print(f"[tune] study {study.study_name} ready in {masked_url(url)} "
                  f"(target {study.user_attrs[ATTR_TARGET]} trials); start workers with --worker")
            return None
        summary = tune_lambda(cfg, run_dir, data, cache_dir, teacher_ckpt, tracker, args.storage,
                              study_name=args.study, trials=args.trials)
    print(json.dumps({k: v for k, v in summary.items() if k != "pareto"}, indent=2, default=str))
    return summary


@contextlib.contextmanager
def _inputs_stage(args: argparse.Namespace, cfg: dict, run_dir: Path) -> Iterator[tuple]:
    """Data, teacher cache and teacher: read from ``--cache`` and the run folder, or made by the pipeline stages."""
    if args.cache:
        data, cache_dir, teacher_ckpt = _prepared_inputs(args, cfg, run_dir)
        yield data, cache_dir, teacher_ckpt, None
        return
    from pipeline import Pipeline

    pipeline = Pipeline(cfg, out_dir=run_dir, tracking_uri=args.tracking_uri)
    with pipeline.tracking():
        data = pipeline.stage_data()
        teacher_ckpt = pipeline.stage_teacher()
        cache_dir = pipeline.stage_cache(teacher_ckpt) if cfg["distill"]["mode"] == "cached" else None
        yield data, cache_dir, teacher_ckpt, pipeline.tracker
