"""Experiment tracking on MLflow: a thin layer that knows our conventions, not a re-implementation.

- One tracking store per run folder: ``sqlite:///<run_dir>/mlflow.db`` (MLflow 3 refuses a plain file
  store), artifacts under ``<run_dir>/mlartifacts``.
- Only rank 0 writes; on other ranks, or when disabled, every method is a no-op (MLflow not imported).
- Runs nest (pipeline → teacher, students, Optuna trials) and can be reopened by a ``resume_key`` so a
  resumed training keeps appending to the run it started.
- The config is logged twice: flattened as params (searchable) and verbatim as ``config.yaml``.

Example::

    tracker = Tracker(run_dir)
    with tracker.start_run("teacher", resume_key="teacher"):
        tracker.log_config(cfg)
        fit(..., tracker=tracker)
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from configs import flatten
from training.distributed import is_main_process

# MLflow 3 logs asynchronously by default; records must be in the store when a run ends (tests, resume).
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in MLflow >= 2.x
RESUME_TAG = "sam3d.resume_key"
_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")


class TrackingError(ValueError):
    """Tracking was used wrongly (e.g. logging outside a run); the message says how."""


def default_tracking_uri(run_dir: str | Path) -> str:
    """``sqlite:///<absolute run_dir>/mlflow.db``."""
    return f"sqlite:///{(Path(run_dir).resolve() / 'mlflow.db').as_posix()}"


def metric_key(key: str) -> str:
    """An MLflow-legal metric or param key (letters, digits, ``_-. :/``); other characters become ``_``."""
    return _BAD_KEY_CHARS.sub("_", str(key))[:250]


def param_value(value: Any) -> str:
    """A param value as MLflow stores it: ``str(value)``, truncated to MLflow's length limit."""
    text = str(value)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


class Tracker:
    """MLflow tracking for one run folder; a no-op when disabled or not on rank 0.

    Args:
        run_dir: the run folder (holds ``mlflow.db`` and ``mlartifacts/`` unless ``tracking_uri`` is given).
        experiment: MLflow experiment name.
        enabled: False turns every call into a no-op.
        tracking_uri: another store, e.g. ``postgresql://...``; default :func:`default_tracking_uri`.
    """

    def __init__(
        self,
        run_dir: str | Path,
        experiment: str = "sam3d-distill",
        enabled: bool = True,
        tracking_uri: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.experiment = experiment
        self.tracking_uri = tracking_uri or default_tracking_uri(self.run_dir)
        self._enabled = bool(enabled)
        self._client = None
        self._experiment_id: str | None = None
        self._stack: list[str] = []

    @property
    def enabled(self) -> bool:
        """Asked at each call, so a tracker built before ``setup_distributed`` still stays off on rank > 0."""
        return self._enabled and is_main_process()

    @property
    def client(self):
        """The ``mlflow.MlflowClient`` (created on first use; creates the store and experiment)."""
        if self._client is None:
            from mlflow import MlflowClient

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
            found = self._client.get_experiment_by_name(self.experiment)
            if found is not None:
                self._experiment_id = found.experiment_id
            else:
                artifacts = (self.run_dir.resolve() / "mlartifacts").as_uri()
                self._experiment_id = self._client.create_experiment(self.experiment, artifact_location=artifacts)
        return self._client

    @property
    def experiment_id(self) -> str | None:
        if not self.enabled:
            return None
        self.client  # noqa: B018 - creates the experiment on first use
        return self._experiment_id

    @property
    def run_id(self) -> str | None:
        """The innermost active run, None outside any run or when disabled."""
        return self._stack[-1] if self._stack else None

    @contextlib.contextmanager
    def start_run(
        self, name: str, nested: bool = True, resume_key: str | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator[str | None]:
        """Open a run for the ``with`` block; yields its id (None when disabled).

        The run ends FINISHED, KILLED (Ctrl-C, Optuna pruning) or FAILED (any other exception, re-raised).

        Args:
            name: run name shown in the MLflow UI.
            nested: make it a child of the run currently open on this tracker.
            resume_key: reopen the newest run of this experiment tagged with this key instead of creating
                one (a resumed training keeps one run); a new run gets the tag.
            tags: extra tags.
        """
        if not self.enabled:
            yield None
            return
        client = self.client
        parent = self._stack[-1] if nested and self._stack else None
        run_id = self._find_resumable(resume_key) if resume_key else None
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
        else:
            run_tags = {metric_key(k): param_value(v) for k, v in (tags or {}).items()}
            if parent:
                run_tags["mlflow.parentRunId"] = parent
            if resume_key:
                run_tags[RESUME_TAG] = resume_key
            run_id = client.create_run(self._experiment_id, run_name=name, tags=run_tags).info.run_id
        self._stack.append(run_id)
        status = "FINISHED"
        try:
            yield run_id
        except BaseException as exc:
            status = "KILLED" if _is_interruption(exc) else "FAILED"
            raise
        finally:
            self._stack.pop()
            client.set_terminated(run_id, status=status)

    def _find_resumable(self, key: str) -> str | None:
        if "'" in key or "`" in key:
            raise TrackingError(f"resume_key {key!r} may not contain quotes")
        runs = self.client.search_runs(
            [self._experiment_id],
            filter_string=f"tags.`{RESUME_TAG}` = '{key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def _active(self) -> str:
        if not self._stack:
            raise TrackingError("log call outside a run: wrap it in `with tracker.start_run(name):`")
        return self._stack[-1]

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (nested mappings are flattened to dotted keys; values stringified and truncated).

        Args:
            params: name → value; re-logging an identical value is allowed, a different one is not (MLflow).
        """
        if not self.enabled:
            return
        from mlflow.entities import Param

        run_id = self._active()
        flat = flatten(params)
        self.client.log_batch(run_id, params=[Param(metric_key(k), param_value(v)) for k, v in flat.items()])

    def log_config(self, cfg: Mapping[str, Any], artifact_file: str = "config.yaml") -> None:
        """Log a run config: flattened as params, and verbatim as a YAML artifact.

        Args:
            cfg: the nested config dict.
            artifact_file: artifact name of the YAML copy.
        """
        if not self.enabled:
            return
        run_id = self._active()
        self.log_params(cfg)
        self.client.log_text(run_id, yaml.safe_dump(dict(cfg), sort_keys=False), artifact_file)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics at ``step``; non-finite values are skipped (MLflow rejects some of them).

        Args:
            metrics: name → number.
            step: training step (x axis in the UI).
        """
        if not self.enabled:
            return
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        run_id = self._active()

        now = get_current_time_millis()
        rows = [
            Metric(metric_key(k), float(v), now, int(step or 0))
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        if rows:
            self.client.log_batch(run_id, metrics=rows)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file (or folder) into the run's artifacts.

        Args:
            path: file or directory to copy.
            artifact_path: sub-folder inside the run's artifacts.
        """
        if not self.enabled:
            return
        run_id = self._active()
        path = Path(path)
        if not path.exists():
            raise TrackingError(f"artifact not found: {path}")
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as an artifact file (e.g. a Markdown report)."""
        if not self.enabled:
            return
        run_id = self._active()
        self.client.log_text(run_id, text, artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags on the active run."""
        if not self.enabled:
            return
        run_id = self._active()
        for k, v in tags.items():
            self.client.set_tag(run_id, metric_key(k), param_value(v))


def _is_interruption(exc: BaseException) -> bool:
    if isinstance(exc, KeyboardInterrupt):
        return True
    optuna = sys.modules.get("optuna")
    return optuna is not None and isinstance(exc, optuna.exceptions.TrialPruned)
