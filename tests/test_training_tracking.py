"""MLflow tracking on a sqlite store in the run folder, queried back with MlflowClient."""
import pytest
import torch
import yaml

from training import Tracker, TrainSettings, fit
from training.tracking import MAX_PARAM_VALUE, TrackingError
from training_toy import TinySegNet, fresh_mlflow_store, loss_fn, make_val_fn, random_batches


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_training_run_records_config_params_metrics_and_artifacts(tmp_path):
    from mlflow import MlflowClient

    fresh_mlflow_store(tmp_path)
    cfg = {"run": {"name": "toy"}, "teacher": {"steps": 6, "lr": 0.01, "roi_size": [16, 16, 16]}, "note": "x" * 7000}
    tracker = Tracker(tmp_path)
    with tracker.start_run("pipeline") as parent_id:
        with tracker.start_run("teacher") as run_id:
            tracker.log_config(cfg)
            settings = TrainSettings.from_config(cfg["teacher"], val_every=3, log_every=2, progress=False)
            fit(TinySegNet(), loss_fn, random_batches(), settings, tmp_path / "teacher", val_fn=make_val_fn(), tracker=tracker)
            tracker.log_artifact(tmp_path / "teacher" / "best.pt", "checkpoints")

    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent_id
    assert run.data.params["teacher.lr"] == "0.01" and run.data.params["teacher.roi_size"] == "[16, 16, 16]"
    assert len(run.data.params["note"]) == MAX_PARAM_VALUE  # truncated, not refused
    assert [m.step for m in client.get_metric_history(run_id, "val/dice")] == [3, 6]
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4, 6]
    assert "train/lr" in run.data.metrics and "best/dice" in run.data.metrics

    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert {"config.yaml", "checkpoints/best.pt"} <= artifacts
    logged = yaml.safe_load(open(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))))
    assert logged == cfg
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").resolve().as_uri())


def test_resume_key_reopens_the_same_run_and_failures_are_marked(tmp_path):
    from mlflow import MlflowClient

    fresh_mlflow_store(tmp_path)
    tracker = Tracker(tmp_path)
    with pytest.raises(RuntimeError):
        with tracker.start_run("student", resume_key="student/tiny") as first:
            tracker.log_metrics({"val/dice": 0.5}, step=10)
            raise RuntimeError("killed")
    client = MlflowClient(tracker.tracking_uri)
    assert client.get_run(first).info.status == "FAILED"
    with tracker.start_run("student", resume_key="student/tiny") as second:
        tracker.log_metrics({"val/dice": 0.6}, step=20)
    assert second == first and client.get_run(first).info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(first, "val/dice")] == [0.5, 0.6]


def test_a_pruned_optuna_trial_ends_its_run_as_killed(tmp_path):
    import optuna
    from mlflow import MlflowClient

    fresh_mlflow_store(tmp_path)
    tracker = Tracker(tmp_path)
    with pytest.raises(optuna.TrialPruned):
        with tracker.start_run("trial-0") as run_id:
            raise optuna.TrialPruned("median pruner")
    assert MlflowClient(tracker.tracking_uri).get_run(run_id).info.status == "KILLED"


def test_disabled_tracker_writes_nothing_and_logging_outside_a_run_is_an_error(tmp_path):
    off = Tracker(tmp_path / "off", enabled=False)
    with off.start_run("x") as run_id:
        off.log_config({"a": 1})
        off.log_metrics({"loss": 1.0}, step=1)
    assert run_id is None and not (tmp_path / "off").exists()
    with pytest.raises(TrackingError, match="outside a run"):
        Tracker(tmp_path / "on").log_metrics({"loss": 1.0}, step=1)
