"""The pipeline's closing report: does the teacher earn its cost?

Teacher, KD students and the λ = 0 student side by side on the same test cases (per-class Dice), the
split sizes, their sizes, the stage wall times, and where every artifact lives. Every Dice names its split
and case count: test figures are scored once; validation figures chose checkpoints and λ and are optimistic. ``build_report`` gathers plain data
(``report.json``); ``format_report`` renders it as Markdown (``report.md``, also printed).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence


def build_report(
    cfg: Mapping[str, Any],
    run_dir: str | Path,
    records: Mapping[str, Any],
    students: Sequence[Any],
    evaluation: Mapping[str, Mapping[str, Any]],
    bundles: Mapping[str, str],
    benchmark: Mapping[str, str] | None,
    wall_seconds: float,
    tune: Mapping[str, Any] | None = None,
    budget: Sequence[Mapping[str, Any]] = (),
) -> dict:
    """Collect the run's results into one JSON-able dict.

    Args:
        cfg: run config.
        run_dir: run folder.
        records: ``{stage: distill.stages.StageRecord}``.
        students: ``distill.train.StudentResult`` of every student.
        evaluation: output of ``distill.evaluate.evaluate_models``.
        bundles: ``{student: bundle folder}``.
        benchmark: benchmark artifacts, or None when skipped.
        wall_seconds: total wall time of this invocation.
        tune: the λ search's summary (best λ, Dice at λ = 0 and λ = 1), or None when it did not run.
        budget: ``run.time_budget_minutes``' decisions (``pipeline.budget.BudgetDecision.to_dict``), one per student
            after the first that was not already trained.
    """
    stages = {
        name: {"wall_seconds": round(float(r.wall_seconds), 2), "skipped": bool(r.skipped), "artifacts": dict(r.artifacts),
               "info": {k: v for k, v in r.info.items() if k != "history"}}
        for name, r in records.items()
    }
    models = {
        name: {
            "kind": m["kind"],
            "lambda_kd": m.get("lambda_kd"),
            "params": m["params"],
            "file_mb": m["file_mb"],
            "checkpoint": m["checkpoint"],
            "mean": m["summary"]["mean"],
            "per_class_dice": {c: v["dice"] for c, v in m["summary"]["per_class"].items()},
            "cases": m["summary"]["cases"],
            "split": m.get("split", "val"),
            # the classes whose largest connected piece alone is kept (chosen on validation), by name
            "postprocess": (m.get("postprocess") or {}).get("names", []),
        }
        for name, m in evaluation.items()
    }
    data_info = records["data"].info if "data" in records else {}
    splits = {k: int(data_info[k]) for k in ("train", "val", "test", "unlabelled") if k in data_info}
    data_warnings = list(data_info.get("warnings") or [])
    teacher_info = records["teacher"].info if "teacher" in records else {}
    teacher_training = None
    if teacher_info.get("source") == "trained" and teacher_info.get("steps"):
        teacher_training = {"steps": int(teacher_info["steps"]), "best_dice": teacher_info.get("best_dice"),
                            "best_dice_split": "val", "seconds_per_step": teacher_info.get("seconds_per_step"),
                            "train_minutes": round(float(teacher_info.get("train_seconds") or 0.0) / 60, 2)}
    from deploy.machine import cpu_info

    cpu = cpu_info()
    return {
        "run": str(cfg["run"]["name"]),
        "run_dir": str(run_dir),
        "wall_seconds": round(float(wall_seconds), 1),
        # Every time in the report is this machine's: its model, the instruction sets the kernels could use
        # (fewer under an ONEDNN_MAX_CPU_ISA cap, e.g. make demo ISA=avx2) and the threads.
        "machine": {"cpu_model": cpu["model"], "instruction_sets": cpu["flags"], "isa_cap": cpu["isa_cap"],
                    "usable_cpus": cpu["usable_cpus"], "threads": cfg["run"]["threads"]},
        "splits": splits,
        "data_warnings": data_warnings,
        "models": models,
        # best_dice of a student is its best validation Dice: the figure that chose its checkpoint.
        # The students' own data (data.site), None when they learn from the corpus's training split.
        "site": data_info.get("site"),
        # constant | linear: a KD student's λ is its starting value, falling over the run to lambda_end_ratio × λ when linear.
        "lambda_schedule": cfg["distill"]["lambda_schedule"],
        "lambda_end_ratio": float(cfg["distill"]["lambda_end_ratio"]),
        # The share of a KD student's crops drawn from labelled cases, at step 0 and (when it moves) at the last step.
        "labelled_fraction": cfg["distill"]["labelled_fraction"],
        "labelled_fraction_end": cfg["distill"]["labelled_fraction_end"],
        "teacher_training": teacher_training,
        "students": [{**{k: v for k, v in s.to_dict().items() if k != "history"}, "best_dice_split": "val",
                      "val_cases": splits.get("val"), "train_minutes": round(float(s.wall_seconds) / 60, 2)}
                     for s in students],
        "stages": stages,
        "bundles": dict(bundles),
        "benchmark": dict(benchmark) if benchmark else None,
        "tune": dict(tune) if tune else None,
        # run.time_budget_minutes: each later student's projected run, and the students it left out
        "time_budget": {"minutes": cfg["run"].get("time_budget_minutes"), "decisions": [dict(d) for d in budget],
                        "left_out": [d["name"] for d in budget if not d["train"]]},
        "mlflow": f"sqlite:///{Path(run_dir) / 'mlflow.db'}",
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_report(report: Mapping[str, Any]) -> str:
    """Markdown: per-class Dice table, model sizes, stage times, artifact locations."""
    models = report["models"]
    lines = [f"# sam3d-distill report: {report['run']}", ""]
    splits = report.get("splits") or {}
    if splits:
        lines += ["Cases: " + ", ".join(f"{splits[k]} {name}" for k, name in (
            ("train", "training"), ("val", "validation (chooses checkpoints, λ, INT8)"),
            ("test", "test (scored once, below)"), ("unlabelled", "unlabelled")) if k in splits), ""]
    site = report.get("site")
    if site:
        lines += [f"Students' own data (data.site, {site['source']}): {site['labelled']} labelled + {site['unlabelled']} "
                  f"unlabelled cases ({site.get('labels_withheld', 0)} of them with the label withheld); the teacher "
                  "learns from the training cases above, the students from these; the λ = 0 student sees the labelled "
                  "ones alone. Validation and test cases are the same for every model.", ""]
    if report.get("data_warnings"):
        lines += ["## Input warnings (data stage)", "", *[f"- {w}" for w in report["data_warnings"]], ""]
    if models:
        classes = list(next(iter(models.values()))["per_class_dice"])
        first = next(iter(models.values()))
        cases, split = first["cases"], first.get("split", "val")
        if split == "test":
            lines += [f"## Dice on {cases} test cases", ""]
        else:
            lines += [f"## Dice on {cases} validation cases (no test split: these cases chose the checkpoints, "
                      "so the figures are optimistic)", ""]
        lines.append("| class | " + " | ".join(models) + " |")
        lines.append("|---|" + "---:|" * len(models))
        for c in classes:
            lines.append(f"| {c} | " + " | ".join(_fmt(m["per_class_dice"].get(c)) for m in models.values()) + " |")
        for metric in ("dice", "nsd", "hd95"):
            label = {"dice": "**mean Dice**", "nsd": "mean NSD", "hd95": "mean HD95 (mm)"}[metric]
            digits = 1 if metric == "hd95" else 3
            lines.append(f"| {label} | " + " | ".join(_fmt(m["mean"].get(metric), digits) for m in models.values()) + " |")
        lines += ["", "## Models", "", "| model | λ | parameters | checkpoint MB |", "|---|---:|---:|---:|"]
        for name, m in models.items():
            lam = "–" if m["lambda_kd"] is None else f"{m['lambda_kd']:g}"
            lines.append(f"| {name} | {lam} | {m['params'] / 1e6:.2f} M | {m['file_mb']:.1f} |")
        cleaned = {name: m["postprocess"] for name, m in models.items() if m.get("postprocess")}
        if cleaned:
            lines += ["", "Postprocessing, chosen on the validation split (deploy/postprocess.py): only the largest "
                      "connected piece is kept of " + "; ".join(f"{name}: {', '.join(ids)}" for name, ids in cleaned.items())
                      + ". The test Dice above is after it, as deploy segments."]
    if report["students"]:
        val_cases = splits.get("val")
        val_note = f" ({val_cases} validation cases, chose the checkpoint)" if val_cases else " (chose the checkpoint)"
        lines += ["", "## Training", "", f"| model | λ | labelled + unlabelled cases | steps | minutes | best val Dice{val_note} "
                  "| s/step |", "|---|---:|---:|---:|---:|---:|---:|"]
        t = report.get("teacher_training")
        if t:
            lines.append(f"| teacher | – | {splits.get('train', '–')} + 0 | {t['steps']} | {_fmt(t['train_minutes'], 1)} | "
                         f"{_fmt(t['best_dice'])} | {_fmt(t['seconds_per_step'], 2)} |")
        for s in report["students"]:
            lines.append(f"| {s['name']} | {s['lambda_kd']:g} | {s['labelled']} + {s['unlabelled']} | {s['last_step']} | "
                         f"{_fmt(s['train_minutes'], 1)} | "
                         f"{_fmt(s['best_dice'])} | {_fmt(s['seconds_per_step'], 2)} |")
        if report.get("lambda_schedule") == "linear":
            ratio = float(report.get("lambda_end_ratio") or 0.0)
            end = "0" if ratio == 0 else f"{ratio:g} of itself (distill.lambda_end_ratio)"
            lines += ["", f"λ is each KD student's starting value: it falls linearly to {end} over the run "
                      "(distill.lambda_schedule: linear), imitation first and the labels at the end."]
        start, stop = report.get("labelled_fraction"), report.get("labelled_fraction_end")
        if not any(s["lambda_kd"] > 0 and s["unlabelled"] for s in report["students"]):
            start = None  # no KD student drew from unlabelled cases: the share does not apply
        if start is not None and stop is not None:
            lines += ["", f"A KD student draws {float(start):.0%} of its crops from labelled cases at step 0, rising "
                      f"linearly to {float(stop):.0%} at its last step (distill.labelled_fraction_end)."]
        elif start is not None:
            lines += ["", f"A KD student draws {float(start):.0%} of its crops from labelled cases "
                      "(distill.labelled_fraction)."]
        if report.get("curves"):
            lines += ["", f"Validation Dice against training minutes: {report['curves']}"]
    budget = report.get("time_budget") or {}
    if budget.get("decisions"):
        lines += ["", f"## Time budget ({budget['minutes']:g} min, run.time_budget_minutes)", ""]
        for d in budget["decisions"]:
            verdict = "trained" if d["train"] else "**left out**"
            lines.append(f"- {d['name']}: {verdict}. After {d['elapsed_minutes']:.1f} min the run was projected at "
                         f"{d['projected_minutes']:.1f} min with it ({d['seconds_per_step']:.2f} s per training step "
                         f"measured on this CPU × {d['steps']} steps, with its export and benchmark) and "
                         f"{d['without_minutes']:.1f} min without (pipeline/budget.py).")
        if budget.get("left_out"):
            lines.append(f"- To train {', '.join(budget['left_out'])} here anyway: run.time_budget_minutes=null "
                         "(make demo ARGS='run.time_budget_minutes=null', or make demo-full).")
    tune = report.get("tune")
    if tune:
        ends = tune.get("endpoints") or {}
        counts = tune.get("trials") or {}
        lines += ["", "## λ search (Optuna)", "",
                  f"Best λ = {tune['best_lambda']:.3g} (chosen on validation Dice {_fmt(tune.get('best_dice'))}); "
                  f"λ = 0: {_fmt(ends.get('lambda_0'))}; λ = 1: {_fmt(ends.get('lambda_1'))}; "
                  f"trials: {counts.get('complete', 0)} complete, {counts.get('pruned', 0)} pruned, "
                  f"{counts.get('failed', 0)} failed. The final students above train with the best λ; one whose "
                  "student, λ and settings match a completed trial continues that trial (docs/tuning.md)."]
    lines += ["", "## Stages", "", "| stage | wall s | | artifact |", "|---|---:|---|---|"]
    for name, st in report["stages"].items():
        arts = ", ".join(st["artifacts"].values())
        lines.append(f"| {name} | {st['wall_seconds']:.1f} | {'skipped (up to date)' if st['skipped'] else 'ran'} | {arts} |")
    lines += ["", f"Run folder: {report['run_dir']}  ", f"MLflow: {report['mlflow']}  ",
              f"Bundles: {', '.join(report['bundles'].values()) or 'none'}  ",
              f"Benchmark: {'none (skipped)' if not report['benchmark'] else ', '.join(report['benchmark'].values())}  ",
              f"Wall time of this invocation: {report['wall_seconds']:.0f} s" + _machine_line(report.get("machine")), ""]
    return "\n".join(lines)


def _machine_line(machine: Mapping[str, Any] | None) -> str:
    """`` on <CPU> (<instruction sets>[, capped to X], N threads)`` for the wall-time line; empty without one."""
    if not machine:
        return ""
    sets = ", ".join(machine.get("instruction_sets") or []) or "no listed instruction sets"
    cap = f"; capped to {machine['isa_cap']} by ONEDNN_MAX_CPU_ISA" if machine.get("isa_cap") else ""
    return f" on {machine.get('cpu_model')} ({sets}{cap}; {machine.get('threads')} threads)"
