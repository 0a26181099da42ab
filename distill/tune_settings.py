"""The λ search's settings: the ``tune:`` section with its defaults, the search space and the study's name.
(``distill.tune`` runs the search; ``distill.tune_study`` opens its storage and study.)"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from optuna.trial import TrialState

from configs import config_hash
from configs.schema import DistillConfig, TuneConfig, defaults

LAMBDA_SPACES = ("uniform", "log")
PRUNERS = ("median", "hyperband", "none")
OBJECTIVES = (("dice",), ("dice", "latency"))
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Study user attributes written by the create step and read by every worker.
ATTR_SPACE, ATTR_TARGET, ATTR_CACHE, ATTR_TEACHER = "search_space", "target_trials", "cache_dir", "teacher_ckpt"

DEFAULTS: dict[str, Any] = defaults(TuneConfig)  # the keys and their defaults: configs/schema.py


class TuneError(ValueError):
    """A tuning setting, study or storage that cannot be used; the message names the key, study or URL."""


class SurplusTrialError(TuneError):
    """This trial would exceed the study's target count (two workers asked at the same moment)."""


@dataclass
class TuneSettings:
    """The ``tune:`` section of a config, checked (defaults in ``DEFAULTS``; docs/tuning.md explains each)."""

    enabled: bool
    trials: int
    steps_per_trial: int
    report_every: int
    lambda_space: str
    lambda_min: float
    search_temperature: bool
    temperature_range: list
    search_lr: bool
    lr_range: list
    pruner: str
    pruner_startup_trials: int
    pruner_warmup_steps: int
    storage: str | None
    study_name: str | None
    objectives: list
    students: list | None
    heartbeat_s: int
    grace_s: int
    max_retry: int
    max_consecutive_failures: int
    latency_repeats: int
    continue_trials: bool
    workers: int

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "TuneSettings":
        """Read and check ``cfg["tune"]`` (missing keys take ``DEFAULTS``).

        Args:
            cfg: the run config.
        """
        section = dict(cfg.get("tune") or {})
        unknown = sorted(set(section) - set(DEFAULTS))
        if unknown:
            raise TuneError(f"tune: unknown keys {unknown}; known: {sorted(DEFAULTS)}")
        s = cls(**{**DEFAULTS, **section})
        for key in ("trials", "steps_per_trial", "report_every", "heartbeat_s", "grace_s", "latency_repeats",
                    "max_consecutive_failures", "workers"):
            if not isinstance(getattr(s, key), int) or getattr(s, key) < 1:
                raise TuneError(f"tune.{key} must be an integer >= 1, got {getattr(s, key)!r}")
        for key in ("pruner_startup_trials", "pruner_warmup_steps", "max_retry"):
            if not isinstance(getattr(s, key), int) or getattr(s, key) < 0:
                raise TuneError(f"tune.{key} must be an integer >= 0, got {getattr(s, key)!r}")
        if s.report_every > s.steps_per_trial:
            raise TuneError(f"tune.report_every={s.report_every} exceeds tune.steps_per_trial={s.steps_per_trial}")
        if s.grace_s <= s.heartbeat_s:
            raise TuneError(f"tune.grace_s={s.grace_s} must exceed tune.heartbeat_s={s.heartbeat_s} "
                            "(a live trial would be declared stale between two heartbeats)")
        if s.lambda_space not in LAMBDA_SPACES:
            raise TuneError(f"tune.lambda_space must be one of {LAMBDA_SPACES}, got {s.lambda_space!r}")
        if not 0.0 < float(s.lambda_min) < 1.0:
            raise TuneError(f"tune.lambda_min must be in (0, 1), got {s.lambda_min!r}")
        s.lambda_min = float(s.lambda_min)
        if s.pruner not in PRUNERS:
            raise TuneError(f"tune.pruner must be one of {PRUNERS}, got {s.pruner!r}")
        if tuple(s.objectives) not in OBJECTIVES:
            raise TuneError(f"tune.objectives must be one of {[list(o) for o in OBJECTIVES]}, got {s.objectives!r}")
        s.objectives = list(s.objectives)
        for key in ("temperature_range", "lr_range"):
            lo_hi = getattr(s, key)
            if (not isinstance(lo_hi, (list, tuple)) or len(lo_hi) != 2
                    or not 0.0 < float(lo_hi[0]) < float(lo_hi[1])):
                raise TuneError(f"tune.{key} must be [low, high] with 0 < low < high, got {lo_hi!r}")
            setattr(s, key, [float(lo_hi[0]), float(lo_hi[1])])
        if s.search_temperature and str(cfg.get("distill", {}).get("kd_target", DistillConfig.kd_target)) == "logits":
            raise TuneError("tune.search_temperature=true needs distill.kd_target=probs or sqrt_probs "
                            "(the logit form of the KD loss has no temperature)")
        if s.students is not None and (not isinstance(s.students, (list, tuple)) or not s.students):
            raise TuneError(f"tune.students must be a non-empty list of student names or null, got {s.students!r}")
        return s

    @property
    def multi_objective(self) -> bool:
        return self.objectives == ["dice", "latency"]


def student_names(cfg: Mapping[str, Any], settings: TuneSettings) -> list[str]:
    """Students a study searches: ``tune.students``, else ``student.names`` (single objective: the first)."""
    names = list(settings.students or cfg["student"]["names"])
    return names if settings.multi_objective else names[:1]


def search_space(cfg: Mapping[str, Any], settings: TuneSettings) -> dict:
    """What makes two trials comparable; stored in the study and checked when it is loaded again."""
    space = {
        "objectives": settings.objectives,
        "lambda_space": settings.lambda_space,
        "lambda_min": settings.lambda_min if settings.lambda_space == "log" else None,
        "temperature_range": settings.temperature_range if settings.search_temperature else None,
        "lr_range": settings.lr_range if settings.search_lr else None,
        "students": student_names(cfg, settings),
        "steps_per_trial": settings.steps_per_trial,
        "report_every": settings.report_every,
        "roi_size": list(cfg["student"]["roi_size"]),
        # What else shapes a trial's student: the distill settings the search does not set and the architecture.
        # Without them a study made under another loss or crop schedule would be loaded, its completed trials
        # counted and continued as if they had been trained with this config.
        "distill": trial_settings(cfg, settings),
        "student_arch": cfg["student"].get("arch"),
    }
    return {**space, "hash": config_hash(space)}


# distill.* keys a trial does not take from the config (λ is searched; the baseline flag is the pipeline's), or that
# do not change what it learns (logging, loader workers).
_NOT_TRIAL_SETTINGS = ("lambda_kd", "baseline_lambda_zero", "log_every", "num_workers")


def trial_settings(cfg: Mapping[str, Any], settings: TuneSettings) -> dict:
    """The ``distill`` settings every trial of a study trains with (the searched temperature and lr excluded)."""
    searched = {"temperature"} if settings.search_temperature else set()
    searched |= {"lr"} if settings.search_lr else set()
    return {k: v for k, v in sorted(cfg["distill"].items()) if k not in _NOT_TRIAL_SETTINGS and k not in searched}


def default_study_name(cfg: Mapping[str, Any], settings: TuneSettings) -> str:
    return f"{cfg['run']['name']}-{'pareto' if settings.multi_objective else 'lambda'}"
