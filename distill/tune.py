"""Optuna search for λ: pruned, resumable, tracked in MLflow, shared by any number of workers.

    python -m distill.tune --config configs/demo.yaml [--run-dir runs/demo] [--storage URL] [--study NAME]
                           [--trials N] [--create | --worker] [--tracking-uri URI] [--cache DIR] [key=value ...]

Each trial distils a student for ``tune.steps_per_trial`` steps at a suggested λ (optionally also the KD
temperature, the learning rate and, in multi-objective mode, the student size), reports the validation
Dice at every validation (``trial.report``) and is stopped early by a median or Hyperband pruner. The first
two trials are always λ = 0 (plain supervision) and λ = 1 (pure KD), so both ends of the range are measured.

Decisions (docs/tuning.md has the reasoning):
- λ = 0 on a log scale: ``tune.lambda_space: log`` samples λ log-uniformly on ``[tune.lambda_min, 1]``;
  λ = 0 is at −∞ there, so it is the enqueued first trial, shown to the sampler as ``lambda_min`` (the
  nearest point of the space) and trained with λ = 0 exactly. The λ a trial really used is always the
  trial's user attribute ``lambda_kd``; plots and summaries read that one.
- The result is the best λ, and the pipeline trains the final student with it for the full
  ``distill.steps``: trials are short and under-trained, so a trial's own student is not the deliverable.
  Its checkpoint is still reported (``best_checkpoint``).
- Storage: ``sqlite:///<run_dir>/optuna.db`` unless ``--storage``/``tune.storage`` names another (e.g.
  ``postgresql://``). The study is created with ``load_if_exists``; a rerun counts the finished (complete or
  pruned) trials toward ``tune.trials`` and runs only what is missing. Trials heartbeat into the storage; a
  trial whose process was killed goes stale after ``tune.grace_s`` seconds, is marked FAIL and re-queued
  with the same parameters (up to ``tune.max_retry`` times); the retry trains in the original trial's folder
  ``run_dir/tune/trial_<n>/`` and so resumes from its ``last.pt``. A trial that raises is recorded FAIL too.
- Several workers: ``--create`` creates the study (and the MLflow tuning run) once; every ``--worker``
  process, on this or another machine, then loads it and takes trials until the study holds ``tune.trials``
  finished ones (Optuna's ``MaxTrialsCallback``; a trial that two simultaneous asks made one too many is
  refused at its start and marked ``surplus``). Without either flag the command creates, works and then
  writes the summary and plots.
"""
from __future__ import annotations

import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from data.atomic import write_json_atomic
from data.prepare import PreparedData

# the settings and the study live in their own modules; these names are part of distill.tune's API too
from distill.tune_settings import (ATTR_CACHE, ATTR_TARGET, ATTR_TEACHER, FINISHED, SurplusTrialError,  # noqa: F401
                                   TuneError, TuneSettings, student_names)
from distill.tune_study import (count_trials, create_tuning_study, default_storage, load_tuning_study,  # noqa: F401
                                masked_url, tuning_run)


# Seconds between two looks of a worker waiting for trials running elsewhere (one storage read each).
WAIT_POLL_S = 2.0


class TrialObjective:
    """One trial: suggest, distil a student for the trial's step budget, report, prune, return Dice.

    Args:
        cfg: run config.
        run_dir: run folder; trials train in ``run_dir/tune/trial_<n>/``.
        data: prepared data.
        cache_dir: teacher cache (cached mode).
        teacher_ckpt: teacher checkpoint (online mode).
        tracker: MLflow tracker inside the tuning run, or None.
        target: the study's target number of finished trials.
        latency_ms: ``student name -> p50 ms`` (multi-objective mode).
        log: progress lines.
    """

    def __init__(self, cfg: Mapping[str, Any], run_dir: str | Path, data: PreparedData, cache_dir: str | Path | None,
                 teacher_ckpt: str | Path | None, tracker: Any, target: int,
                 latency_ms: Callable[[str], float] | None = None, log: Callable[[str], None] = print) -> None:
        self.cfg, self.run_dir, self.data = cfg, Path(run_dir), data
        self.cache_dir, self.teacher_ckpt, self.tracker = cache_dir, teacher_ckpt, tracker
        self.settings = TuneSettings.from_config(cfg)
        self.target, self.latency_ms, self.log = int(target), latency_ms, log
        self.students = student_names(cfg, self.settings)
        if self.settings.multi_objective and latency_ms is None:
            raise TuneError("tune.objectives [dice, latency] needs a latency function")

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's hyper-parameters as trained (λ = 0 for the enqueued endpoint of a log space)."""
        s = self.settings
        if s.lambda_space == "log":
            suggested = trial.suggest_float("lambda_kd", s.lambda_min, 1.0, log=True)
        else:
            suggested = trial.suggest_float("lambda_kd", 0.0, 1.0)
        exact = trial.user_attrs.get("lambda_kd")  # set on the enqueued endpoints and their retries
        params: dict[str, Any] = {"lambda_kd": float(suggested if exact is None else exact)}
        params["student"] = trial.suggest_categorical("student", self.students) if s.multi_objective else self.students[0]
        if s.search_temperature:
            params["temperature"] = trial.suggest_float("temperature", *s.temperature_range)
        if s.search_lr:
            params["lr"] = trial.suggest_float("lr", *s.lr_range, log=True)
        return params

    def trial_config(self, params: Mapping[str, Any]) -> dict:
        """The run config with the trial's λ, temperature, lr and validation interval."""
        distill = dict(self.cfg["distill"])
        distill["lambda_kd"] = params["lambda_kd"]
        distill["val_every"] = self.settings.report_every
        for key in ("temperature", "lr"):
            if key in params:
                distill[key] = params[key]
        return {**self.cfg, "distill": distill}

    def check_not_surplus(self, trial: optuna.Trial, trials: Sequence[optuna.trial.FrozenTrial]) -> None:
        """Refuse a trial that two workers' simultaneous asks made one too many.

        Kept beside Optuna's ``MaxTrialsCallback``, which stops a worker only after its trial ends: two workers
        that both see one trial missing both ask one, and nothing in Optuna refuses the second at its start.
        """
        # Trials ahead of this one: finished, or running/queued with a lower number (queued trials are
        # taken lowest number first, so a higher-numbered one would run after this one).
        ahead = sum(1 for t in trials if t.state in FINISHED or (
            t.number < trial.number and t.state in (TrialState.RUNNING, TrialState.WAITING)))
        if ahead >= self.target:
            trial.set_user_attr("surplus", True)
            raise SurplusTrialError(f"trial {trial.number}: the study already has {ahead} finished or earlier "
                                    f"running trials for a target of {self.target}")

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        from distill.train import train_student
        from training.tracking import Tracker

        trials = trial.study.get_trials(deepcopy=False)
        self.check_not_surplus(trial, trials)
        frozen = next(t for t in trials if t.number == trial.number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            origin = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        params = self.suggest(trial)
        for key, value in params.items():
            trial.set_user_attr(key, value)
        folder = origin if origin is not None else trial.number
        out_dir = self.run_dir / "tune" / f"trial_{folder:03d}"
        trial.set_user_attr("out_dir", str(out_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        multi = self.settings.multi_objective
        best = {"dice": -math.inf}

        def on_validation(step: int, metrics: Mapping[str, float]) -> None:
            dice = float(metrics["dice"])
            if dice > best["dice"]:
                best["dice"] = dice
                trial.set_user_attr("best_dice", dice)
            trial.set_user_attr("last_step", int(step))
            if multi:  # Optuna cannot prune multi-objective trials
                return
            trial.report(dice, int(step))
            if int(step) >= self.settings.steps_per_trial:  # its whole budget is trained: it completes
                return
            if trial.should_prune():
                raise optuna.TrialPruned(f"trial {trial.number}: Dice {dice:.4f} at step {step} is below the pruner's bar")

        tracker = self.tracker or Tracker(self.run_dir, enabled=False)
        study_name = trial.study.study_name
        lam, student = params["lambda_kd"], params["student"]
        self.log(f"[tune] trial {trial.number}: λ={lam:.4g} {student}"
                 + (f" (retry of trial {origin})" if origin is not None else "") + f" -> {out_dir}")
        tags = {"optuna.study": study_name, "optuna.trial": str(trial.number)}
        if origin is not None:
            tags["optuna.retry_of"] = str(origin)
        with tracker.start_run(f"trial {trial.number} λ={lam:.3g}", nested=True,
                               resume_key=f"tune:{study_name}:trial:{trial.number}", tags=tags):
            tracker.log_params({"trial": trial.number, **params, "out_dir": str(out_dir)})
            uses_teacher = lam > 0
            try:
                result = train_student(
                    self.trial_config(params), self.run_dir, student, lam,
                    teacher_ckpt=self.teacher_ckpt if uses_teacher else None,
                    cache_dir=self.cache_dir if uses_teacher else None,
                    tracker=tracker, on_validation=on_validation, out_dir=out_dir,
                    steps=self.settings.steps_per_trial, data=self.data, progress=False,
                )
            except KeyboardInterrupt:
                _requeue_interrupted(trial, self.log)
                raise
            trial.set_user_attr("best_dice", float(result.best_dice))
            trial.set_user_attr("checkpoint", result.checkpoint)
            trial.set_user_attr("seconds_per_step", float(result.seconds_per_step))
            outcome = {"tune/dice": float(result.best_dice)}
            if multi:
                latency = float(self.latency_ms(student))
                trial.set_user_attr("latency_ms", latency)
                outcome["tune/latency_ms"] = latency
            tracker.log_metrics(outcome, step=result.last_step)
        self.log(f"[tune] trial {trial.number}: Dice {result.best_dice:.4f}"
                 + (f", latency {outcome['tune/latency_ms']:.1f} ms" if multi else ""))
        return (float(result.best_dice), outcome["tune/latency_ms"]) if multi else float(result.best_dice)


def _requeue_interrupted(trial: optuna.Trial, log: Callable[[str], None]) -> None:
    """Ctrl-C: Optuna records the trial FAIL and would never run it again, so a rerun would sample new λ values
    in place of an interrupted λ = 0 or λ = 1. Queue a copy now, as a dead worker's trial is queued (same
    parameters, its curve, its folder, so it resumes from ``last.pt``); a user's interrupt is not counted
    against ``tune.max_retry``."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=None, inherit_intermediate_values=True)(trial.study, frozen)
    log(f"[tune] trial {trial.number} interrupted; queued again, a rerun resumes it from its last checkpoint")


def run_worker(
    cfg: Mapping[str, Any],
    run_dir: str | Path,
    data: PreparedData,
    cache_dir: str | Path | None,
    teacher_ckpt: str | Path | None,
    tracker: Any = None,
    storage: str | None = None,
    study_name: str | None = None,
    *,
    study: optuna.Study | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Take trials of an existing study until it holds its target number of finished trials.

    Any number of workers may run this at once on the same storage. A worker waits (polling every
    ``tune.heartbeat_s``) while the remaining trials are running elsewhere, so that it can take over a trial
    whose worker died (failed by heartbeat and re-queued).

    Args:
        cfg: run config (the creator's).
        run_dir: run folder (trial folders, default storage).
        data: prepared data.
        cache_dir: teacher cache folder (cached mode, λ > 0).
        teacher_ckpt: teacher checkpoint (online mode, λ > 0).
        tracker: MLflow tracker, or None.
        storage: storage URL (when ``study`` is not given).
        study_name: study name (when ``study`` is not given).
        study: an already loaded study.
        log: progress lines.

    Returns:
        The number of trials this worker ran (failed ones included).
    """
    settings = TuneSettings.from_config(cfg)
    study = study or load_tuning_study(cfg, run_dir, storage, study_name)
    target = int(study.user_attrs.get(ATTR_TARGET, settings.trials))
    latency = None
    if settings.multi_objective:
        from distill.tune_latency import StudentLatency

        latency = StudentLatency(Path(run_dir) / "tune" / "latency", data.num_classes, cfg["student"]["roi_size"],
                                 threads=int(cfg["run"].get("threads") or 1), repeats=settings.latency_repeats,
                                 options=cfg["student"].get("arch"))
    objective = TrialObjective(cfg, run_dir, data, cache_dir, teacher_ckpt, tracker, target, latency, log)
    failures = _FailureWatch(study.study_name, settings.max_consecutive_failures, log)
    callbacks = [
        failures,
        # Optuna's own stop: the study (all workers, any storage) holds `target` finished trials ...
        MaxTrialsCallback(target, states=FINISHED),
        # ... or the trials it lacks are all running elsewhere: wait below, where a dead one can be taken over
        MaxTrialsCallback(target, states=(*FINISHED, TrialState.RUNNING)),
    ]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    while True:
        # MaxTrialsCallback only looks after a trial ends, so the check before the first one (a rerun of a
        # finished study trains nothing) and the wait for trials running elsewhere stay here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        counts = count_trials(study)
        if counts.finished >= target:
            break
        if counts.finished + counts.running >= target:
            # The rest is in other hands: look again soon (a finished study ends this worker within
            # WAIT_POLL_S), and take over a trial whose worker died once its heartbeat is stale.
            time.sleep(min(settings.heartbeat_s, WAIT_POLL_S))
            continue
        study.optimize(objective, catch=(Exception,), callbacks=callbacks, gc_after_trial=True)
    return failures.ran


class _FailureWatch:
    """An ``optimize`` callback: counts a worker's trials and stops the worker after ``limit`` failures in a row.

    Optuna has none: with ``catch`` it records a failed trial and goes on, so a broken setup would fail trials
    for ever. A surplus trial (:meth:`TrialObjective.check_not_surplus`) is not a failure and breaks no run.
    """

    def __init__(self, study_name: str, limit: int, log: Callable[[str], None]) -> None:
        self.study_name, self.limit, self.log = study_name, int(limit), log
        self.ran, self.in_a_row = 0, 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.ran += 1
        if trial.state != TrialState.FAIL:
            self.in_a_row = 0
            return
        if trial.user_attrs.get("surplus"):
            return
        self.in_a_row += 1
        reason = trial.system_attrs.get("fail_reason", "see the log above")
        self.log(f"[tune] trial {trial.number} failed: {reason}")
        if self.in_a_row >= self.limit:
            raise TuneError(f"study {self.study_name!r}: {self.in_a_row} trials in a row failed; last: {reason}")


def tune_lambda(
    cfg: Mapping[str, Any],
    run_dir: str | Path,
    data: PreparedData,
    cache_dir: str | Path | None,
    teacher_ckpt: str | Path | None,
    tracker: Any,
    storage: str | None = None,
    *,
    study_name: str | None = None,
    trials: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """The pipeline's tuning stage: create (or resume) the study, run trials to the target, summarise.

    Args:
        cfg: run config.
        run_dir: run folder; writes ``optuna.db`` (default storage), ``tune/trial_<n>/`` and ``tune/summary.json``,
            ``tune/trials.csv``, ``tune/dice_vs_lambda.png``, ``tune/history.png``, ``tune/intermediate_values.png``
            (single objective; ``tune/pareto.csv|png`` in multi-objective mode).
        data: prepared data.
        cache_dir: teacher cache (cached mode).
        teacher_ckpt: teacher checkpoint (online mode).
        tracker: MLflow tracker (the tuning run nests under its open run), or None.
        storage: storage URL; default ``tune.storage`` or SQLite in ``run_dir``.
        study_name: default ``tune.study_name`` or ``<run.name>-lambda``.
        trials: target finished trials; default ``tune.trials``.
        log: progress lines.

    Returns:
        The summary (:func:`summarize_study`): ``best_lambda``, ``best_dice``, ``best_trial``, ``best_params``,
        ``best_checkpoint``, ``endpoints`` (Dice at λ = 0 and λ = 1), trial counts, artifact paths, and in
        multi-objective mode the Pareto front.
    """
    study = create_tuning_study(cfg, run_dir, storage, study_name, trials, cache_dir=cache_dir,
                                teacher_ckpt=teacher_ckpt)
    tracker = tracker if tracker is not None else _disabled_tracker(run_dir)
    settings = TuneSettings.from_config(cfg)
    with tuning_run(tracker, study.study_name):
        helpers = _helpers_wanted(study, settings, log)
        if helpers:
            ran = _work_beside_helpers(cfg, run_dir, data, cache_dir, teacher_ckpt, tracker, study, helpers,
                                       storage or settings.storage or default_storage(run_dir), settings, log)
        else:
            ran = run_worker(cfg, run_dir, data, cache_dir, teacher_ckpt, tracker, study=study, log=log)
        summary = summarize_study(study, run_dir, tracker)
    summary["trials_run_now"] = ran
    log(f"[tune] study {study.study_name}: best λ={summary['best_lambda']:.4g} (trial {summary['best_trial']}, "
        f"Dice {summary['best_dice']:.4f}); λ=0: {_fmt(summary['endpoints']['lambda_0'])}, "
        f"λ=1: {_fmt(summary['endpoints']['lambda_1'])}")
    return summary


def _helpers_wanted(study: optuna.Study, settings: TuneSettings, log: Callable[[str], None]) -> int:
    """How many helper processes ``tune.workers`` asks for here: one fewer than the workers, and no more than
    the trials the study still lacks need; none under torchrun (its ranks already share the machine)."""
    if settings.workers <= 1:
        return 0
    from training.distributed import get_world_size

    if get_world_size() > 1:
        log(f"[tune] tune.workers={settings.workers} ignored under torchrun: trials run one at a time on all ranks")
        return 0
    target = int(study.user_attrs.get(ATTR_TARGET, settings.trials))
    return max(0, min(settings.workers, target - count_trials(study).finished) - 1)


def _work_beside_helpers(cfg: Mapping[str, Any], run_dir: str | Path, data: PreparedData, cache_dir: str | Path | None,
                         teacher_ckpt: str | Path | None, tracker: Any, study: optuna.Study, helpers: int,
                         storage: str, settings: TuneSettings, log: Callable[[str], None]) -> int:
    """Run this process's worker loop while ``helpers`` helper processes work on the same study
    (``distill.tune_local``); every worker, this one included, gets ``threads // tune.workers`` threads."""
    import torch

    from distill.tune_local import LocalWorkers, worker_threads

    previous = torch.get_num_threads()
    each = worker_threads(int(cfg["run"].get("threads") or previous), settings.workers)
    data_file = Path(run_dir) / "tune" / "workers" / "data.json"
    data.save(data_file)
    workers = LocalWorkers(cfg, Path(run_dir), storage, study.study_name, helpers, each, data_file,
                           Path(cache_dir) if cache_dir is not None else None,
                           tracker.tracking_uri if tracker.enabled else None, tracker.experiment, log)
    try:  # the helpers are stopped if this process fails or is interrupted, even while they start
        workers.start()
        torch.set_num_threads(each)
        ran = run_worker(cfg, run_dir, data, cache_dir, teacher_ckpt, tracker, study=study, log=log)
    except BaseException:
        workers.stop()
        raise
    finally:
        torch.set_num_threads(previous)
    for problem in workers.join():
        log(f"[tune] warning: {problem}")
    return ran


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _disabled_tracker(run_dir: str | Path) -> Any:
    from training.tracking import Tracker

    return Tracker(run_dir, enabled=False)


def summarize_study(study: optuna.Study, run_dir: str | Path, tracker: Any = None) -> dict:
    """Tables, plots and the best trial of a study; written under ``run_dir/tune/`` and logged to MLflow.

    Args:
        study: the study.
        run_dir: run folder.
        tracker: MLflow tracker inside the tuning run, or None.
    """
    from distill.tune_plots import (plot_dice_vs_lambda, plot_history, plot_intermediate_values, trial_rows,
                                    write_trials_csv)

    out = Path(run_dir) / "tune"
    rows = trial_rows(study)
    multi = len(study.directions) == 2
    scored = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED") and r["dice"] is not None]
    if not any(r["state"] == "COMPLETE" for r in scored):
        raise TuneError(f"study {study.study_name!r} has no completed trial to summarise "
                        f"({count_trials(study).by_state})")
    artifacts = {
        "trials_csv": write_trials_csv(rows, out / "trials.csv"),
        "dice_vs_lambda": plot_dice_vs_lambda(rows, out / "dice_vs_lambda.png", title=study.study_name),
        "history": plot_history(study, out / "history.png", title=study.study_name),
    }
    pareto: list[dict] = []
    if not multi:  # multi-objective trials report no intermediate values
        artifacts["intermediate_values"] = plot_intermediate_values(study, out / "intermediate_values.png",
                                                                    title=study.study_name)
    if multi:
        from distill.pareto import pareto_front, plot_pareto, write_pareto_csv

        pareto = pareto_front(rows)
        artifacts["pareto_csv"] = write_pareto_csv(pareto, out / "pareto.csv")
        artifacts["pareto_png"] = plot_pareto(rows, pareto, out / "pareto.png", title=study.study_name)
        best = max(pareto, key=lambda r: r["dice"])  # the most accurate point of the front
    else:
        best = max((r for r in scored if r["state"] == "COMPLETE"), key=lambda r: r["dice"])

    def endpoint(lam: float) -> float | None:
        found = [r["dice"] for r in scored if r["lambda_kd"] == lam]
        return max(found) if found else None

    counts = count_trials(study)
    summary = {
        "study": study.study_name,
        "objectives": ["dice", "latency"] if multi else ["dice"],
        "best_trial": best["number"],
        "best_lambda": best["lambda_kd"],
        "best_dice": best["dice"],
        "best_params": {k: best[k] for k in ("lambda_kd", "student", "temperature", "lr") if best.get(k) is not None},
        "best_checkpoint": best["checkpoint"],
        "endpoints": {"lambda_0": endpoint(0.0), "lambda_1": endpoint(1.0)},
        "final": ("the final students train with best_params for distill.steps; one whose student, λ and settings "
                  "match a completed trial continues that trial's checkpoint (docs/tuning.md)"),
        "complete_trials": [{k: r[k] for k in ("number", "student", "lambda_kd", "temperature", "lr", "dice",
                                               "last_step", "out_dir")} for r in rows if r["state"] == "COMPLETE"],
        "trials": {"complete": counts.by_state["COMPLETE"], "pruned": counts.by_state["PRUNED"],
                   "failed": counts.failed, "running": counts.running, "waiting": counts.waiting},
        "artifacts": {k: str(v) for k, v in artifacts.items()},
        "pareto": pareto,
    }
    artifacts["summary"] = write_json_atomic(out / "summary.json", summary)
    if tracker is not None:
        tracker.log_metrics({"tune/best_dice": best["dice"], "tune/best_lambda": best["lambda_kd"],
                             "tune/complete": counts.by_state["COMPLETE"], "tune/pruned": counts.by_state["PRUNED"],
                             "tune/failed": counts.failed})
        for path in artifacts.values():
            tracker.log_artifact(path, "tune")
    return summary


if __name__ == "__main__":  # the command line is commands.tune (the command layer)
    from commands.tune import main

    main(sys.argv[1:])
