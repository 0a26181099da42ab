"""The whole pipeline on phantoms: every stage, the report, MLflow, and skipping what is up to date."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def overrides(phantom_dataset):
    return [
        f"data.source={phantom_dataset}", "preprocess.spacing_mm=[6.0, 6.0, 6.0]", "run.device=cpu",
        # The students' site (data.site): 3 phantoms of their own, 1 of them labelled.
        "data.site.phantom_cases=3", "data.site.labelled=1", "data.phantom_size=[64,64,32]",
        "student.names=[unet_small]", "student.roi_size=[64, 32, 32]", "teacher.roi_size=[32, 32, 32]",
        "distill.steps=2", "distill.val_every=2", "distill.batch_size=1", "distill.warmup_steps=1",
        "export.enabled=false", "benchmark.enabled=false", "tune.enabled=false",
    ]


def write_teacher(path, phantom_dataset):
    """A tiny untrained teacher checkpoint in the docs/interfaces.md format (teacher training is its own stage)."""
    from configs import load_config
    from data.dataset import load_dataset
    from data.stats import preprocess_spec
    from teacher.build import build_teacher
    from teacher.checkpoint import save_teacher

    cfg = load_config("demo", ["teacher.roi_size=[32, 32, 32]", "preprocess.spacing_mm=[6.0, 6.0, 6.0]"])
    labels = load_dataset(phantom_dataset).labels
    torch.manual_seed(0)
    model = build_teacher(cfg["teacher"], max(labels) + 1)
    save_teacher(path, model, {"labels": labels, "preprocess": preprocess_spec(cfg["preprocess"]), "step": 0,
                               "best_dice": 0.0, "config": cfg})
    return path


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_skips_what_is_up_to_date(phantom_dataset, tmp_path):
    from distill.run import main
    from mlflow import MlflowClient

    torch.set_num_threads(2)
    teacher = write_teacher(tmp_path / "teacher.pt", phantom_dataset)
    run_dir = tmp_path / "run"
    args = ["--out", str(run_dir), "--teacher", str(teacher), *overrides(phantom_dataset)]
    report = main(args)

    # Teacher, KD student and λ = 0 student side by side on the same held-out cases.
    assert set(report["models"]) == {"teacher", "unet_small", "unet_small (λ=0)"}
    cases = {m["cases"] for m in report["models"].values()}
    assert cases == {1}
    organs = {name for cid, name in json.loads((run_dir / "data" / "data.json").read_text())["labels"].items() if cid != "0"}
    assert len(organs) >= 7
    # Nothing here trains long enough to learn (an untrained teacher, 2-step students): the figures are checked.
    # Each is the Dice of the model's checkpoint on the scoring split (test, else validation), and a student's
    # best_dice (the figure that chose its checkpoint) its Dice on the validation split, recomputed from the files.
    from data.prepare import PreparedData
    from student import load_student
    from teacher.checkpoint import load_teacher
    from tests.recompute import recomputed_scores

    data = PreparedData.load(run_dir / "data" / "data.json")
    students = {s["name"] + (" (λ=0)" if s["lambda_kd"] == 0 else ""): s for s in report["students"]}
    for name, model in report["models"].items():
        assert set(model["per_class_dice"]) == organs
        assert model["params"] > 0
        network, meta = (load_teacher if model["kind"] == "teacher" else load_student)(model["checkpoint"])
        # A student's own postprocessing (chosen on validation) applies to its test figures, as in deploy.
        clean = (meta.get("postprocess") or {}).get("largest_component", [])
        if name != "teacher":
            assert set(meta["postprocess"]["validation"]) == {str(c) for c in data.labels if int(c)}, name
        expected = recomputed_scores(network, meta["roi_size"], data, data.scoring_split()[1], clean)
        assert model["mean"]["dice"] == pytest.approx(expected["mean"]["dice"], abs=1e-6), name
        per_class = {c: v["dice"] for c, v in expected["per_class"].items()}
        assert model["per_class_dice"] == pytest.approx(per_class, abs=1e-6), name
        if name != "teacher":
            assert model["checkpoint"] == students[name]["checkpoint"]
            validated = recomputed_scores(network, meta["roi_size"], data, data.val)
            assert students[name]["best_dice"] == pytest.approx(validated["mean"]["dice"], abs=1e-6), name
    for folder in ("data/data.json", "students/unet_small/student.pt", "students/unet_small_lambda0/student.pt",
                   "evaluation/metrics.json", "report.md", "report.json", "mlflow.db"):
        assert (run_dir / folder).exists(), folder
    cache_manifest = next((run_dir / "cache").glob("*/manifest.json"))
    labelled, unlabelled = data.student_cases()  # the students' site: 1 labelled + 2 unlabelled phantoms
    assert (len(labelled), len(unlabelled)) == (1, 2) and data.site["labels_withheld"] == 2
    cached = len(labelled) + len(unlabelled)
    assert len(json.loads(cache_manifest.read_text())["entries"]) == cached
    text = (run_dir / "report.md").read_text()
    assert "mean Dice" in text and "unet_small (λ=0)" in text
    # The report says what each student learnt from: the KD student the site's 1 + 2 cases, λ = 0 the labelled one.
    assert report["site"]["labelled"] == 1 and report["site"]["unlabelled"] == 2
    learnt = {(s["lambda_kd"] > 0): (s["labelled"], s["unlabelled"]) for s in report["students"]}
    assert learnt == {True: (1, 2), False: (1, 0)}
    assert all(s["train_minutes"] == pytest.approx(s["wall_seconds"] / 60, abs=0.01) for s in report["students"])
    # Each student's postprocessing (chosen on validation) is named under its test Dice; the teacher has none.
    assert report["models"]["teacher"]["postprocess"] == []
    for name, model in report["models"].items():
        assert (f"{name}: {', '.join(model['postprocess'])}" in text) == bool(model["postprocess"]), name
    assert "| unet_small | 1 | 1 + 2 | 2 |" in text and "Students' own data (data.site, phantoms): 1 labelled + 2" in text
    # The demo's λ falls from its starting value to 0 over the run, and the report says so.
    assert report["lambda_schedule"] == "linear" and "falls linearly to 0 over the run" in text
    assert (report["labelled_fraction"], report["labelled_fraction_end"]) == (0.5, 1.0)
    assert "50% of its crops from labelled cases at step 0, rising linearly to 100% at its last step" in text
    assert Path(report["curves"]).is_file() and report["curves"] in text
    # The wall time names the machine it was measured on: CPU, the instruction sets the kernels could use, threads.
    from deploy.machine import cpu_info

    cpu = cpu_info()
    assert report["machine"]["instruction_sets"] == cpu["flags"] and report["machine"]["isa_cap"] == cpu["isa_cap"]
    assert f"s on {cpu['model']} ({', '.join(cpu['flags']) or 'no listed instruction sets'}" in text

    # Cached against online distillation on this run: both modes train, the figures are consistent.
    from distill.mode_cost import measure_modes

    cost = measure_modes(run_dir, steps=2, progress=False)
    assert cost["student"] == "unet_small" and cost["cached_s_per_step"] > 0 and cost["online_s_per_step"] > 0
    assert cost["online_over_cached"] == pytest.approx(cost["online_s_per_step"] / cost["cached_s_per_step"])
    assert cost["cache_cases"] == cached and cost["size_ratio"] > 1  # fp16 at half resolution vs float32
    assert json.loads((run_dir / "mode_cost.json").read_text())["steps"] == 2

    # One experiment named after the run, a parent run and nested stage runs, the config verbatim.
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("demo")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert {"data", "teacher", "cache", "student unet_small", "student unet_small_lambda0", "evaluation"} <= children
    assert "config.yaml" in [a.path for a in client.list_artifacts(parent[0].info.run_id)]

    # As a script (sys.path[0] = distill/), a second run finds every stage up to date.
    done = subprocess.run([sys.executable, str(ROOT / "distill" / "run.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    again = json.loads((run_dir / "report.json").read_text())
    assert all(stage["skipped"] for stage in again["stages"].values()), again["stages"]

    # A changed evaluation setting reruns the evaluation only.
    third = main(args + ["evaluation.nsd_tolerance_mm=6.0"])
    ran = {name for name, stage in third["stages"].items() if not stage["skipped"]}
    assert ran == {"evaluation"}

    # A budget of the student's own (student.steps) retrains it and its λ = 0 comparison, at that budget.
    fourth = main(args + ["evaluation.nsd_tolerance_mm=6.0", "student.steps={unet_small: 3}"])
    ran = {name for name, stage in fourth["stages"].items() if not stage["skipped"]}
    assert ran == {"student unet_small", "student unet_small_lambda0", "evaluation"}
    assert [s["last_step"] for s in fourth["students"]] == [3, 3]

    # run.time_budget_minutes (pipeline/budget.py): a student after the first that would take the run past the budget
    # is left out, and the report says so; with time enough it trains, and the first student never waits for it.
    two = args + ["evaluation.nsd_tolerance_mm=6.0", "student.steps={unet_small: 3}",
                  "student.names=[unet_small, basic_unet]"]
    fifth = main(two + ["run.time_budget_minutes=0.001"])
    assert fifth["time_budget"]["left_out"] == ["basic_unet"]
    assert [d["name"] for d in fifth["time_budget"]["decisions"]] == ["basic_unet"]
    assert fifth["time_budget"]["decisions"][0]["seconds_per_step"] > 0
    assert {name for name, stage in fifth["stages"].items() if not stage["skipped"]} == set()
    assert set(fifth["models"]) == {"teacher", "unet_small", "unet_small (λ=0)"}
    assert "- basic_unet: **left out**" in (run_dir / "report.md").read_text()
    sixth = main(two + ["run.time_budget_minutes=600"])
    assert sixth["time_budget"]["left_out"] == [] and sixth["time_budget"]["decisions"][0]["train"]
    ran = {name for name, stage in sixth["stages"].items() if not stage["skipped"]}
    assert ran == {"student basic_unet", "evaluation"}
    assert set(sixth["models"]) == {"teacher", "unet_small", "basic_unet", "unet_small (λ=0)"}


@pytest.mark.slow
def test_pipeline_tunes_lambda_then_trains_the_student_with_the_best_lambda(phantom_dataset, tmp_path):
    from distill.run import main

    torch.set_num_threads(2)
    teacher = write_teacher(tmp_path / "teacher.pt", phantom_dataset)
    run_dir = tmp_path / "run"
    tuned = [o for o in overrides(phantom_dataset) if not o.startswith("tune.")] + [
        "tune.enabled=true", "tune.trials=2", "tune.steps_per_trial=2", "tune.report_every=2",
        "distill.steps=4", "distill.schedule=constant", "distill.lambda_schedule=constant"]
    report = main(["--out", str(run_dir), "--teacher", str(teacher), *tuned])

    # The two enqueued trials measure both ends of the range; the student then trains with the winner.
    tune = report["tune"]
    assert tune["best_lambda"] in (0.0, 1.0)
    assert set(tune["endpoints"]) == {"lambda_0", "lambda_1"}
    # The comparison student is the other end: the λ = 0 baseline, or the best KD trial when λ = 0 won.
    assert [s["lambda_kd"] for s in report["students"]] == [tune["best_lambda"], 1.0 - tune["best_lambda"]]
    assert (run_dir / "optuna.db").is_file() and (run_dir / "tune_stage" / "summary.json").is_file()
    # The demo's tune.workers=2: a helper process joined the study (distill/tune_local.py) and ended cleanly.
    assert "worker done:" in (run_dir / "tune" / "workers" / "worker_1.log").read_text()
    assert "λ search (Optuna)" in (run_dir / "report.md").read_text()

    # Under a constant schedule the final student continues the best trial (steps 2 -> 4) instead of
    # starting over; the trial's own checkpoint is left as the study recorded it.
    from training.checkpoint import load_checkpoint

    best = next(t for t in tune["complete_trials"] if t["number"] == tune["best_trial"])
    student = load_checkpoint(Path(report["students"][0]["out_dir"]) / "last.pt")
    history = student["train_state"]["history"]
    assert [h["step"] for h in history] == [2, 4]
    assert history[0]["dice"] == pytest.approx(best["dice"])
    assert load_checkpoint(Path(best["out_dir"]) / "last.pt")["step"] == 2
    assert [s["last_step"] for s in report["students"]] == [4, 4]
    assert {"unet_small", "unet_small (λ=0)"} <= set(report["models"])


@pytest.mark.slow
def test_kd_regimes_trains_each_variant_per_regime_scores_the_test_split_and_skips_what_is_done(phantom_dataset, tmp_path):
    """distill.kd_regimes on the pipeline's stages: λ = 0 and KD in the few-label and the full-label regime of the
    same site, each scored on the test split; a second call trains nothing."""
    from configs import load_config
    from pipeline.kd_regimes import run_regimes

    torch.set_num_threads(2)
    teacher = write_teacher(tmp_path / "teacher.pt", phantom_dataset)
    cfg = load_config("demo", [o for o in overrides(phantom_dataset) if not o.startswith("distill.steps")]
                      + [f"teacher.checkpoint_file={teacher}"])
    results = run_regimes(cfg, tmp_path / "run", ["lambda0", "kd_pseudo"], ["few", "full"], steps=2, student="unet_small")
    runs = results["runs"]
    assert set(runs) == {"few/lambda0@2", "few/kd_pseudo@2", "full/lambda0@2", "full/kd_pseudo@2"}
    # The site holds 3 phantoms, 1 labelled: λ = 0 learns from it alone, KD from all three; all of them labelled in full.
    assert [(runs[k]["labelled"], runs[k]["unlabelled"]) for k in sorted(runs)] == [(1, 2), (1, 0), (3, 0), (3, 0)]
    assert all(r["split"] == "test" and r["test_cases"] == 1 and r["steps"] == 2 for r in runs.values())
    # The demo's lr and λ decay over the budget, so each budget trains in a folder of its own.
    assert (cfg["distill"]["schedule"], cfg["distill"]["lambda_schedule"]) == ("cosine", "linear")
    metrics = json.loads((tmp_path / "run" / "regimes" / "few" / "kd_pseudo@2" / "test" / "metrics.json").read_text())
    assert runs["few/kd_pseudo@2"]["test_dice"] == pytest.approx(metrics["kd_pseudo"]["summary"]["mean"]["dice"])
    out = tmp_path / "run" / "regimes"
    assert (out / "regimes.md").read_text().count("\n") == 2 + len(runs) and (out / "regimes_curves.png").is_file()
    before = {p: p.stat().st_mtime for p in out.rglob("student.pt")}
    again = run_regimes(cfg, tmp_path / "run", ["lambda0", "kd_pseudo"], ["few", "full"], steps=2, student="unet_small")
    assert again["runs"] == runs and {p: p.stat().st_mtime for p in out.rglob("student.pt")} == before
