"""The λ search's study: its storage (SQLite by default, any Optuna RDB URL), pruner and sampler, creating it
once and loading it in every worker, and counting its trials. (``distill.tune`` runs the search.)"""
from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import optuna
from optuna.trial import TrialState

from configs.schema import RunConfig

from distill.tune_settings import (ATTR_CACHE, ATTR_SPACE, ATTR_TARGET, ATTR_TEACHER, TuneError, TuneSettings,
                                   default_study_name, search_space, student_names)


def default_storage(run_dir: str | Path) -> str:
    """``sqlite:///<absolute run_dir>/optuna.db``."""
    return f"sqlite:///{(Path(run_dir).resolve() / 'optuna.db').as_posix()}"


def masked_url(url: str) -> str:
    """A storage URL with its password hidden, for logs and MLflow params."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL; nothing to hide
        return url


def open_storage(url: str, settings: TuneSettings) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats, so that a killed worker's trial is failed and re-queued.

    Args:
        url: SQLAlchemy URL (``sqlite:///...``, ``postgresql://user:pw@host:port/db``).
        settings: heartbeat interval, grace period and retry count.
    """
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    # A worker blocks rather than fails when another process holds the SQLite write lock.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=settings.heartbeat_s,
                grace_period=settings.grace_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                    max_retry=settings.max_retry, inherit_intermediate_values=True),
            )
        except Exception as exc:
            raise TuneError(f"cannot open Optuna storage {masked_url(url)}: {type(exc).__name__}: {exc}") from exc


def build_pruner(settings: TuneSettings) -> optuna.pruners.BasePruner:
    """Median (stop a trial below the median of earlier trials at the same step) or Hyperband."""
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup_trials,
                                           n_warmup_steps=settings.pruner_warmup_steps)
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=settings.report_every, max_resource=settings.steps_per_trial,
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def _sampler(seed: int | None) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed)


def _directions(settings: TuneSettings) -> list[str]:
    return ["maximize", "minimize"] if settings.multi_objective else ["maximize"]


def create_tuning_study(
    cfg: Mapping[str, Any],
    run_dir: str | Path,
    storage: str | None = None,
    study_name: str | None = None,
    trials: int | None = None,
    *,
    cache_dir: str | Path | None = None,
    teacher_ckpt: str | Path | None = None,
    tracker: Any = None,
) -> optuna.Study:
    """Create the study once (or load it), record its target and inputs, and enqueue λ = 0 and λ = 1.

    Run before the workers start. Loading an existing study checks that its search space is the one this
    config describes, so a changed config never silently mixes incomparable trials.

    Args:
        cfg: run config (``tune``, ``student``, ``run`` are read).
        run_dir: run folder (default SQLite storage, trial folders).
        storage: storage URL; default ``tune.storage`` or ``sqlite:///<run_dir>/optuna.db``.
        study_name: default ``tune.study_name`` or ``<run.name>-lambda`` (``-pareto`` when multi-objective).
        trials: target number of finished trials; default ``tune.trials``.
        cache_dir: teacher cache the workers read (recorded in the study).
        teacher_ckpt: teacher checkpoint (online mode; recorded in the study).
        tracker: a ``training.tracking.Tracker``; the MLflow tuning run is created here, once.
    """
    settings = TuneSettings.from_config(cfg)
    url = storage or settings.storage or default_storage(run_dir)
    name = study_name or settings.study_name or default_study_name(cfg, settings)
    study = optuna.create_study(storage=open_storage(url, settings), study_name=name, load_if_exists=True,
                                directions=_directions(settings), pruner=build_pruner(settings),
                                sampler=_sampler(int(cfg["run"].get("seed", RunConfig.seed))))
    space = search_space(cfg, settings)
    saved = study.user_attrs.get(ATTR_SPACE)
    if saved is not None and saved.get("hash") != space["hash"]:
        raise TuneError(f"study {name!r} in {masked_url(url)} was created for another search space "
                        f"({_space_diff(saved, space)}); use another --study name or storage (a pipeline run: "
                        f"tune.study_name=..., another run.name, or remove its optuna.db and tune/ folder)")
    if [d.name.lower() for d in study.directions] != _directions(settings):
        raise TuneError(f"study {name!r} in {masked_url(url)} optimises {[d.name for d in study.directions]}, "
                        f"the config asks for {settings.objectives}; use another --study name")
    if saved is None:
        study.set_user_attr(ATTR_SPACE, space)
        names = student_names(cfg, settings)
        low = settings.lambda_min if settings.lambda_space == "log" else 0.0
        for lam, exact in ((low, 0.0), (1.0, 1.0)):
            params: dict[str, Any] = {"lambda_kd": lam}
            if settings.multi_objective:
                params["student"] = names[0]
            study.enqueue_trial(params, user_attrs={"lambda_kd": exact})
    study.set_user_attr(ATTR_TARGET, int(trials or settings.trials))
    if cache_dir is not None:
        study.set_user_attr(ATTR_CACHE, str(Path(cache_dir).resolve()))
    if teacher_ckpt is not None:
        study.set_user_attr(ATTR_TEACHER, str(Path(teacher_ckpt).resolve()))
    if tracker is not None:
        with tuning_run(tracker, name):
            tracker.log_params({"study": name, "storage": masked_url(url), "target_trials": int(trials or settings.trials),
                                "search_space": json.dumps({k: v for k, v in space.items() if k != "hash"})})
    return study


def load_tuning_study(cfg: Mapping[str, Any], run_dir: str | Path, storage: str | None = None,
                      study_name: str | None = None, seed: int | None = None) -> optuna.Study:
    """Load a study made by :func:`create_tuning_study` (a worker's view of it).

    Args:
        cfg: run config.
        run_dir: run folder (for the default storage).
        storage: storage URL.
        study_name: study name.
        seed: sampler seed; None for workers, whose samplers must not all suggest the same λ.
    """
    settings = TuneSettings.from_config(cfg)
    url = storage or settings.storage or default_storage(run_dir)
    name = study_name or settings.study_name or default_study_name(cfg, settings)
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(url, settings), pruner=build_pruner(settings),
                                  sampler=_sampler(seed))
    except KeyError as exc:
        raise TuneError(f"no study {name!r} in {masked_url(url)}; create it first: "
                        f"python -m distill.tune --create --storage URL --study {name}") from exc
    saved = study.user_attrs.get(ATTR_SPACE)
    space = search_space(cfg, settings)
    if saved is None or saved.get("hash") != space["hash"]:
        raise TuneError(f"study {name!r} in {masked_url(url)} was created for another search space "
                        f"({_space_diff(saved or {}, space)}); workers must use the creator's config")
    return study


def _space_diff(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(saved) | set(now) if k != "hash" and saved.get(k) != now.get(k))
    parts = []
    for k in keys:
        a, b = saved.get(k), now.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):  # one level down: only the keys that differ
            parts += [f"{k}.{sub}: study {a.get(sub)!r} vs config {b.get(sub)!r}"
                      for sub in sorted(set(a) | set(b)) if a.get(sub) != b.get(sub)]
        else:
            parts.append(f"{k}: study {a!r} vs config {b!r}")
    return "; ".join(parts) or "unknown difference"


@contextlib.contextmanager
def tuning_run(tracker: Any, study_name: str) -> Iterator[None]:
    """The one MLflow run of a study (created by the first caller, reopened by every later one)."""
    with tracker.start_run(f"tune {study_name}", nested=True, resume_key=f"tune:{study_name}",
                           tags={"sam3d.stage": "tune", "optuna.study": study_name}):
        yield


@dataclass
class StudyCounts:
    """Trials of a study by state."""

    finished: int = 0
    running: int = 0
    waiting: int = 0
    failed: int = 0
    by_state: dict = field(default_factory=dict)


def count_trials(study: optuna.Study) -> StudyCounts:
    trials = study.get_trials(deepcopy=False)
    by_state = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    return StudyCounts(
        finished=by_state["COMPLETE"] + by_state["PRUNED"],
        running=by_state["RUNNING"],
        waiting=by_state["WAITING"],
        failed=by_state["FAIL"],
        by_state=by_state,
    )
