"""Tuning λ with Optuna, in process: endpoints first, pruning, resume to a target, MLflow, plots, Pareto front."""
import csv
import json

import optuna
import pytest
import torch

from configs import apply_overrides, load_config
from distill.tune import (
    TrialObjective,
    TuneError,
    TuneSettings,
    create_tuning_study,
    load_tuning_study,
    tune_lambda,
)
from tests.stand_in_teacher import ConvTeacher

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_config(phantoms, *extra):
    """Tiny trials: a small U-Net student on 32³ crops, 2 steps, validated after each."""
    return load_config("demo", [
        "data.site.source=null", "tune.pruner_warmup_steps=0",  # 2-step trials: prune from the first report
        f"data.source={phantoms}", "preprocess.spacing_mm=[6.0, 6.0, 6.0]", "run.device=cpu",
        "student.names=[unet_small]", "student.roi_size=[32, 32, 32]", "teacher.roi_size=[32, 32, 32]",
        "distill.batch_size=1", "distill.warmup_steps=1",
        "tune.trials=3", "tune.steps_per_trial=2", "tune.report_every=1", "tune.workers=1", *extra,
    ])


@pytest.fixture(scope="module")
def inputs(phantom_dataset, tmp_path_factory):
    """Prepared phantom data and a teacher cache, shared by the studies of this module."""
    from data.transforms import load_transforms
    from distill.cache import build_teacher_cache
    from data.prepare import prepare_data

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("tune_inputs")
    cfg = tiny_config(phantom_dataset)
    data = prepare_data(cfg, root / "data", progress=False)
    teacher = ConvTeacher(data.num_classes)
    torch.save(teacher.state_dict(), root / "teacher.pt")
    cache = build_teacher_cache(teacher, data.train + data.unlabelled, load_transforms(data.preprocess, keys=("image",)),
                                root / "cache", root / "teacher.pt", data.preprocess, [32, 32, 32], data.num_classes,
                                progress=False)
    return phantom_dataset, data, cache.directory


def test_study_measures_both_ends_of_lambda_tracks_every_trial_and_resumes_to_a_larger_target(inputs, tmp_path):
    from mlflow import MlflowClient

    from training.tracking import Tracker

    phantoms, data, cache_dir = inputs
    cfg = tiny_config(phantoms)
    tracker = Tracker(tmp_path, experiment="tune-test")
    with tracker.start_run("pipeline", nested=False) as pipeline_run:
        summary = tune_lambda(cfg, tmp_path, data, cache_dir, None, tracker, log=lambda _: None)

    study = optuna.load_study(study_name="demo-lambda", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert [t.user_attrs["lambda_kd"] for t in trials[:2]] == [0.0, 1.0], "λ = 0 and λ = 1 are always measured first"
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    for t in trials[:2]:  # the pruner's start-up trials run to the end and report at every validation
        assert t.state == optuna.trial.TrialState.COMPLETE and sorted(t.intermediate_values) == [1, 2]
        assert t.user_attrs["out_dir"].endswith(f"tune/trial_{t.number:03d}")
        assert (tmp_path / "tune" / f"trial_{t.number:03d}" / "student.pt").is_file()
    assert summary["endpoints"] == {"lambda_0": pytest.approx(trials[0].value), "lambda_1": pytest.approx(trials[1].value)}
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    assert summary["best_trial"] == best.number and summary["best_lambda"] == best.user_attrs["lambda_kd"]
    assert summary["best_checkpoint"] == best.user_attrs["checkpoint"]

    rows = list(csv.DictReader(open(tmp_path / "tune" / "trials.csv")))
    assert [int(r["number"]) for r in rows] == [0, 1, 2]
    for name in ("dice_vs_lambda.png", "history.png", "intermediate_values.png"):
        png = (tmp_path / "tune" / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert json.loads((tmp_path / "tune" / "summary.json").read_text())["best_trial"] == best.number

    client = MlflowClient(tracker.tracking_uri)
    runs = client.search_runs([tracker.experiment_id])
    tune_run = next(r for r in runs if r.info.run_name == "tune demo-lambda")
    assert tune_run.data.tags["mlflow.parentRunId"] == pipeline_run
    trial_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tune_run.info.run_id]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in trial_runs) == [0, 1, 2]
    for r in trial_runs:
        t = trials[int(r.data.tags["optuna.trial"])]
        assert float(r.data.params["lambda_kd"]) == pytest.approx(t.user_attrs["lambda_kd"])
        curve = client.get_metric_history(r.info.run_id, "val/dice")
        assert [m.step for m in curve] == sorted(t.intermediate_values)
    logged = {a.path for a in client.list_artifacts(tune_run.info.run_id, "tune")}
    assert {"tune/dice_vs_lambda.png", "tune/history.png", "tune/intermediate_values.png", "tune/trials.csv"} <= logged

    # A rerun finds the target met and trains nothing; a larger target continues the same study.
    again = tune_lambda(cfg, tmp_path, data, cache_dir, None, None, log=lambda _: None)
    assert again["trials_run_now"] == 0 and again["best_trial"] == best.number
    more = tune_lambda(cfg, tmp_path, data, cache_dir, None, None, trials=4, log=lambda _: None)
    assert more["trials_run_now"] == 1
    after = study.get_trials()
    assert [t.number for t in after] == [0, 1, 2, 3]
    assert [t.value for t in after[:3]] == [t.value for t in trials], "finished trials are kept as they were"


def test_a_trial_below_a_perfect_history_is_pruned_at_its_first_report(inputs, tmp_path):
    from training.checkpoint import load_checkpoint

    phantoms, data, cache_dir = inputs
    cfg = tiny_config(phantoms, "tune.pruner_startup_trials=1")
    study = create_tuning_study(cfg, tmp_path, trials=3)
    # A finished trial that scored Dice 1.0 at every step: the median pruner must stop anything below it.
    study.add_trial(optuna.trial.create_trial(
        params={"lambda_kd": 0.5}, distributions={"lambda_kd": optuna.distributions.FloatDistribution(0.0, 1.0)},
        value=1.0, intermediate_values={1: 1.0, 2: 1.0}, user_attrs={"lambda_kd": 0.5}))
    summary = tune_lambda(cfg, tmp_path, data, cache_dir, None, None, log=lambda _: None)

    trials = study.get_trials()
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert sorted(t.user_attrs["lambda_kd"] for t in pruned) == [0.0, 1.0]
    for t in pruned:
        assert list(t.intermediate_values) == [1], "stopped at its first validation"
        last = load_checkpoint(tmp_path / "tune" / f"trial_{t.number:03d}" / "last.pt")
        assert last["step"] == 1, "the engine saved last.pt before the trial was stopped"
    assert summary["trials"]["pruned"] == 2 and summary["best_lambda"] == 0.5
    assert summary["endpoints"]["lambda_0"] == pytest.approx(pruned[0].intermediate_values[1])


def test_optuna_drawn_plots_warn_nothing_and_leave_matplotlibs_style_as_it_was(tmp_path):
    import warnings

    import matplotlib

    from distill.tune_plots import plot_history, plot_intermediate_values

    lam = {"lambda_kd": optuna.distributions.FloatDistribution(0.0, 1.0)}
    study = optuna.create_study(direction="maximize")
    for value in (0.2, 0.5):
        study.add_trial(optuna.trial.create_trial(params={"lambda_kd": value}, distributions=lam, value=value,
                                                  intermediate_values={1: value / 2, 2: value}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params={"lambda_kd": 0.9},
                                              distributions=lam, intermediate_values={1: 0.1}))
    style = {k: v for k, v in matplotlib.rcParams.items() if not k.startswith("backend")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna's ExperimentalWarning is silenced inside, not left to the caller
        for plot, name in ((plot_history, "history.png"), (plot_intermediate_values, "intermediate_values.png")):
            assert plot(study, tmp_path / name, title="s").read_bytes().startswith(PNG_MAGIC)
    assert {k: v for k, v in matplotlib.rcParams.items() if not k.startswith("backend")} == style, \
        "Optuna's ggplot style is undone after its plots"
    assert matplotlib.get_backend().lower() == "agg"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask() without optimize(): no trial runs here
def test_log_space_runs_lambda_zero_exactly_and_samples_the_rest_log_uniformly(phantom_dataset, tmp_path):
    cfg = tiny_config(phantom_dataset, "tune.lambda_space=log", "tune.lambda_min=0.001", "tune.trials=5")
    study = create_tuning_study(cfg, tmp_path)
    objective = TrialObjective(cfg, tmp_path, data=None, cache_dir=None, teacher_ckpt=None, tracker=None, target=5)
    first, second = study.ask(), study.ask()
    assert objective.suggest(first)["lambda_kd"] == 0.0 and first.params["lambda_kd"] == 0.001
    assert objective.suggest(second)["lambda_kd"] == 1.0
    sampled = [objective.suggest(study.ask())["lambda_kd"] for _ in range(20)]
    assert all(0.001 <= lam <= 1.0 for lam in sampled)
    assert sum(lam < 0.03 for lam in sampled) >= 5, "log-uniform: about half the mass lies below 0.03"


def test_a_trial_that_trained_its_whole_budget_completes_even_below_the_pruners_bar(inputs, tmp_path):
    phantoms, data, cache_dir = inputs
    # One report per trial, at its last step: below a perfect history, yet nothing is left to save by stopping it.
    cfg = tiny_config(phantoms, "tune.pruner_startup_trials=1", "tune.report_every=2", "tune.trials=2")
    study = create_tuning_study(cfg, tmp_path, trials=2)
    study.add_trial(optuna.trial.create_trial(
        params={"lambda_kd": 0.5}, distributions={"lambda_kd": optuna.distributions.FloatDistribution(0.0, 1.0)},
        value=1.0, intermediate_values={2: 1.0}, user_attrs={"lambda_kd": 0.5}))
    summary = tune_lambda(cfg, tmp_path, data, cache_dir, None, None, log=lambda _: None)

    ran = [t for t in study.get_trials() if "out_dir" in t.user_attrs]
    assert [t.state for t in ran] == [optuna.trial.TrialState.COMPLETE]
    assert list(ran[0].intermediate_values) == [2] and summary["trials"]["pruned"] == 0


def test_bad_settings_and_a_changed_search_space_are_refused_by_name(phantom_dataset, tmp_path):
    cfg = tiny_config(phantom_dataset)
    for override, key in [("tune.lambda_space=linear", "tune.lambda_space"), ("tune.report_every=8", "tune.report_every"),
                          ("tune.pruner=sometimes", "tune.pruner"), ("tune.heartbeat_s=200", "tune.grace_s"),
                          ("tune.search_temperature=true distill.kd_target=logits", "distill.kd_target=probs"),
                          ("tune.objectives=[latency]", "tune.objectives")]:
        with pytest.raises(TuneError, match=key.replace(".", r"\.")):
            TuneSettings.from_config(apply_overrides(cfg, override.split()))
    with pytest.raises(TuneError, match="unknown keys"):
        TuneSettings.from_config({**cfg, "tune": {**cfg["tune"], "trails": 3}})

    create_tuning_study(cfg, tmp_path)
    with pytest.raises(TuneError, match="another search space.*steps_per_trial"):
        create_tuning_study(apply_overrides(cfg, ["tune.steps_per_trial=8"]), tmp_path)
    # A study made under another loss or crop schedule is not one to continue (its trials trained otherwise).
    with pytest.raises(TuneError, match=r"another search space \(distill\.labelled_fraction_end: study 1\.0 vs config None\)"):
        create_tuning_study(apply_overrides(cfg, ["distill.labelled_fraction_end=null"]), tmp_path)
    create_tuning_study(apply_overrides(cfg, ["distill.log_every=3"]), tmp_path)  # logging is not a trial setting
    with pytest.raises(TuneError, match="no study 'elsewhere'"):
        load_tuning_study(cfg, tmp_path, study_name="elsewhere")


@pytest.mark.slow
def test_dice_latency_study_writes_a_pareto_front_of_non_dominated_trials(inputs, tmp_path):
    from distill.pareto import dominates

    phantoms, data, cache_dir = inputs
    cfg = tiny_config(phantoms, "tune.objectives=[dice, latency]", "tune.students=[unet_small, basic_unet]",
                      "tune.trials=3", "tune.latency_repeats=3")
    summary = tune_lambda(cfg, tmp_path, data, cache_dir, None, None, log=lambda _: None)

    study = optuna.load_study(study_name="demo-pareto", storage=f"sqlite:///{tmp_path}/optuna.db")
    done = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3
    latency = {}
    for t in done:  # measured once per student size, the same number for every trial of that size
        latency.setdefault(t.params["student"], t.values[1])
        assert t.values[1] == latency[t.params["student"]] > 0
    for name, ms in latency.items():
        record = json.loads((tmp_path / "tune" / "latency" / f"{name}_32x32x32_2t.json").read_text())
        assert record["p50_ms"] == ms and record["runs"] == 3

    rows = [{**r, "dice": float(r["dice"]), "latency_ms": float(r["latency_ms"])}
            for r in csv.DictReader(open(tmp_path / "tune" / "pareto.csv"))]
    assert rows and summary["pareto"]
    for a in rows:
        assert not any(dominates(b, a) for b in rows), "no point of the front dominates another"
    front_numbers = {int(r["number"]) for r in rows}
    for t in done:
        if t.number not in front_numbers:
            point = {"dice": t.values[0], "latency_ms": t.values[1]}
            assert any(dominates(r, point) for r in rows), f"trial {t.number} is off the front but not dominated"
    assert (tmp_path / "tune" / "pareto.png").read_bytes().startswith(PNG_MAGIC)
    assert summary["best_dice"] == max(r["dice"] for r in rows)


@pytest.mark.slow
def test_two_workers_train_the_two_end_trials_side_by_side_in_two_processes(inputs, tmp_path):
    """tune.workers=2: a helper process takes one of the two enqueued trials while this process trains the other,
    each at half the threads; the study, the summary and MLflow read as a one-process study does."""
    import os

    from mlflow import MlflowClient

    from training.tracking import Tracker

    phantoms, data, cache_dir = inputs
    # Trials long enough (validation at each of 12 steps) that the second is asked for while the first trains.
    cfg = tiny_config(phantoms, "tune.workers=2", "tune.trials=2", "tune.steps_per_trial=12", "run.threads=2")
    tracker = Tracker(tmp_path, experiment="tune-workers")
    lines: list[str] = []
    with tracker.start_run("pipeline", nested=False):
        summary = tune_lambda(cfg, tmp_path, data, cache_dir, None, tracker, log=lines.append)
    assert torch.get_num_threads() == 2, "the caller's thread count is restored"

    study = optuna.load_study(study_name="demo-lambda", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert sorted(t.user_attrs["lambda_kd"] for t in trials) == [0.0, 1.0]
    pids = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials}
    assert len(pids) == 2 and str(os.getpid()) in pids, f"one trial here, one in the helper: {pids}"
    helper_log = (tmp_path / "tune" / "workers" / "worker_1.log").read_text()
    assert "worker done: 1 trial(s) run here" in helper_log, helper_log[-2000:]
    assert yaml_threads(tmp_path / "tune" / "workers" / "config.yaml") == 2, "the caller's config, unchanged"
    assert "; 1 torch thread(s)" in helper_log, "the helper's own share of the threads"
    assert not any("warning" in line for line in lines), lines
    relayed = [line for line in helper_log.splitlines() if line.startswith("[tune] trial ") and ": Dice " in line]
    assert [line for line in lines if line.endswith(" (helper worker 1)")] == [f"{r} (helper worker 1)" for r in relayed]
    assert len([line for line in lines if line.startswith("[tune] trial ") and ": Dice " in line]) == 2, \
        "both trials' Dice in the caller's log"

    assert summary["endpoints"]["lambda_0"] is not None and summary["endpoints"]["lambda_1"] is not None
    assert summary["trials_run_now"] == 1, "this process's own count"

    client = MlflowClient(tracker.tracking_uri)
    runs = client.search_runs([tracker.experiment_id])
    tune_runs = [r for r in runs if r.info.run_name == "tune demo-lambda"]
    assert len(tune_runs) == 1, "the helper reopens the caller's tuning run"
    trial_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tune_runs[0].info.run_id]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in trial_runs) == [0, 1]


def yaml_threads(path):
    import yaml

    return yaml.safe_load(path.read_text())["run"]["threads"]
