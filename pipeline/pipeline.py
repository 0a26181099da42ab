"""The end-to-end pipeline: data → teacher → teacher cache → students → evaluation → export → benchmark.

``distill/run.py`` (``commands/run.py``) is its command line; the per-stage commands (``python -m
teacher.train``, ``distill.train``, ``distill.tune``) run the stages they need through it (``commands/``). Each stage writes its artifact under ``runs/<run.name>/`` and is
skipped when that artifact exists for the same inputs (``distill.stages.run_stage``), so a second run, or
a run restarted after a kill, only does what is missing. One MLflow experiment per pipeline (named after
``run.name``), a parent run with one nested run per stage, the config logged verbatim.

Layout::

    runs/<name>/data/ teacher/ cache/ students/<name>/ students/<name>_lambda0/ evaluation/ bundle/<name>/
               mlflow.db mlartifacts/ report.json report.md
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from configs import ConfigError, config_hash, resolve_config
from data.atomic import atomic_path, write_json_atomic, write_text_atomic
from data.prepare import PreparedData, prepare_data
from distill.stages import StageRecord, run_stage
from distill.train import StudentResult, train_student
from pipeline.budget import BudgetDecision, probe_seconds_per_step, project
from training.distributed import resolve_device
from training.distributed import barrier, is_main_process


class PipelineError(ValueError):
    """A pipeline setting or missing piece that stops the run; the message names the key or module."""


class Pipeline:
    """One pipeline run folder and its stages.

    Args:
        cfg: the run config.
        out_dir: run folder; default ``runs/<run.name>``.
        tracking_uri: MLflow store; default ``sqlite:///<run folder>/mlflow.db``.
        log: where progress lines go.
    """

    def __init__(self, cfg: Mapping[str, Any], out_dir: str | Path | None = None, tracking_uri: str | None = None,
                 log: Callable[[str], None] = print) -> None:
        from training.distributed import setup_distributed
        from training.tracking import Tracker

        # Resolved against configs/schema.py (every key present, at its default where cfg lacks it) and a copy:
        # the tuning stage writes the λ it found into this run's config, never the caller's.
        self.cfg = resolve_config(cfg)
        student_budgets(self.cfg)  # a bad per-student budget fails here, before any stage
        run = self.cfg["run"]
        setup_distributed(device="cpu" if str(run["device"]) == "cpu" else None)
        self.run_dir = Path(out_dir or Path("runs") / str(run["name"])).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.tracker = Tracker(self.run_dir, experiment=str(run["name"]), tracking_uri=tracking_uri)
        self.records: dict[str, StageRecord] = {}
        self.data: PreparedData | None = None
        # run.time_budget_minutes (pipeline/budget.py): when run() started (None outside it: no budget applies),
        # and its decision on each student after the first
        self.started: float | None = None
        self.budget_decisions: list[BudgetDecision] = []
        self.device = resolve_device(str(run["device"]))
        threads = run["threads"]
        if threads:
            torch.set_num_threads(int(threads))

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """The pipeline's parent MLflow run, with the resolved config logged verbatim (``config.yaml``, also
        written to the run folder)."""
        with self.tracker.start_run(f"pipeline {self.cfg['run']['name']}", nested=False, resume_key="pipeline"):
            text = _yaml(self.cfg)
            if is_main_process():
                write_text_atomic(self.run_dir / "config.yaml", text)
            self.tracker.log_text(text, "config.yaml")
            self.tracker.set_tags({"config_hash": config_hash(self.cfg)})
            yield

    def _stage(self, name: str, directory: Path, inputs: Mapping[str, Any],
               body: Callable[[Path], tuple[dict[str, str], dict]], all_ranks: bool = False) -> StageRecord:
        with self.tracker.start_run(name, nested=True, resume_key=f"stage:{name}"):
            record = run_stage(name, directory, inputs, body, log=self.log, all_ranks=all_ranks)
            self.tracker.log_metrics({"wall_seconds": record.wall_seconds, "skipped": float(record.skipped)})
        self.records[name] = record
        return record

    # -- data ---------------------------------------------------------------------------------------------
    def stage_data(self) -> PreparedData:
        """Phantoms (or ``data.source``), checks, split, intensity statistics, preprocessing spec."""
        inputs = {"data": self.cfg["data"], "preprocess": self.cfg["preprocess"], "seed": self.cfg["run"]["seed"]}

        def body(directory: Path) -> tuple[dict[str, str], dict]:
            prepared = prepare_data(self.cfg, directory)
            return {"data": str(directory / "data.json")}, {
                "train": len(prepared.train), "val": len(prepared.val), "test": len(prepared.test),
                "unlabelled": len(prepared.unlabelled), "warnings": list(prepared.warnings), "site": prepared.site}

        record = self._stage("data", self.run_dir / "data", inputs, body)
        self.data = PreparedData.load(record.artifacts["data"])
        return self.data

    # -- teacher ------------------------------------------------------------------------------------------
    def stage_teacher(self) -> Path:
        """Load ``teacher.checkpoint_file`` when given, else train the teacher (``teacher.train``).

        A given teacher must fit the prepared data (``teacher.compat.check_teacher_fits``): the same labels
        (ids and names) and class count, ROI (``teacher.roi_size``) and preprocessing spec; only a
        preprocessing mismatch may be let through, by ``teacher.allow_preprocess_mismatch: true``, and is
        then warned about on every run (also when the stage is up to date).
        """
        data = self._need_data()
        given = self.cfg["teacher"]["checkpoint_file"]
        allow = self.cfg["teacher"]["allow_preprocess_mismatch"]
        if given:
            path = Path(str(given)).expanduser().resolve()
            if not path.is_file():
                raise PipelineError(f"teacher.checkpoint_file={given!r}: file not found")
            # The data and the settings the check compares against are inputs too: new data re-checks the teacher.
            inputs = {"checkpoint_file": str(path), "mtime": path.stat().st_mtime, "size": path.stat().st_size,
                      "data": self.records["data"].artifact_hashes["data"],
                      "roi_size": self.cfg["teacher"]["roi_size"], "allow_preprocess_mismatch": allow}

            def body(directory: Path) -> tuple[dict[str, str], dict]:
                from teacher.checkpoint import load_teacher

                _, meta = load_teacher(path)
                allowed = self._check_teacher(meta, path, self.cfg["teacher"]["roi_size"])
                return {"teacher": str(path)}, {"source": "checkpoint_file", "preprocess_mismatch": allowed}
        else:
            # allow_preprocess_mismatch concerns a given teacher only: it never retrains one.
            # The corpus, not the whole data artifact: a change to the students' site (data.site) keeps the teacher.
            inputs = {"teacher": {k: v for k, v in self.cfg["teacher"].items()
                                  if k not in ("checkpoint_file", "allow_preprocess_mismatch")},
                      "corpus": data.corpus_fingerprint(), "seed": self.cfg["run"]["seed"]}

            def body(directory: Path) -> tuple[dict[str, str], dict]:
                if importlib.util.find_spec("teacher.train") is None:
                    raise PipelineError("teacher training (teacher/train.py) is not available here; "
                                        "give a trained teacher with teacher.checkpoint_file=/path/teacher.pt")
                from teacher.train import train_teacher

                result = train_teacher(self.cfg, self.run_dir, data=data, tracker=self.tracker, out_dir=directory)
                ckpt = Path(getattr(result, "checkpoint", directory / "teacher.pt"))
                if not ckpt.is_file():
                    raise PipelineError(f"teacher training finished without writing {ckpt}")
                return {"teacher": str(ckpt)}, {
                    "source": "trained", "best_dice": float(getattr(result, "best_metric", float("nan"))),
                    "steps": int(getattr(result, "last_step", 0)), "seconds_per_step": getattr(result, "seconds_per_step", None),
                    "train_seconds": getattr(result, "wall_seconds", None),
                    "history": [{k: h[k] for k in ("step", "train_s", "dice") if k in h}
                                for h in getattr(result, "history", [])]}

        record = self._stage("teacher", self.run_dir / "teacher", inputs, body, all_ranks=not given)
        for line in record.info.get("preprocess_mismatch") or []:
            self.log(f"[teacher] WARNING: teacher.allow_preprocess_mismatch=true lets {record.artifacts['teacher']} "
                     f"teach with another preprocessing: {line}")
        return Path(record.artifacts["teacher"])

    # -- teacher cache ------------------------------------------------------------------------------------
    def stage_cache(self, teacher_ckpt: Path) -> Path:
        """Teacher logits for every training case (labelled and unlabelled), stored once.

        The inputs hold the sha256 of every case's image file (hashed once per run, and handed to the build
        so it does not hash them again): an edited image reruns the stage instead of skipping it as up to date
        (``distill.stages`` clears the folder of a stage whose inputs changed, so the cache is then rebuilt).
        """
        from distill.cache import SOURCE_HASH_KEY, build_teacher_cache, cache_key, file_sha256

        data = self._need_data()
        dcfg = self.cfg["distill"]
        roi = [int(s) for s in self.cfg["teacher"]["roi_size"]]
        overlap = float(self.cfg["evaluation"]["overlap"])
        downsample = int(dcfg["cache_downsample"])
        key = cache_key(file_sha256(teacher_ckpt), data.preprocess, roi, overlap, downsample)  # + the body crop
        cases = [{**c, SOURCE_HASH_KEY: file_sha256(c["image"])} for c in sum(data.student_cases(), [])]
        inputs = {"key": key, "cases": sorted(c["case_id"] for c in cases),
                  "images": {c["case_id"]: c[SOURCE_HASH_KEY] for c in cases}}

        def body(directory: Path) -> tuple[dict[str, str], dict]:
            from data.transforms import load_transforms
            from teacher.checkpoint import load_teacher

            teacher, meta = load_teacher(teacher_ckpt, device=self.device)
            self._check_teacher(meta, teacher_ckpt, roi)  # whoever passed teacher_ckpt, it must fit the data it labels
            load_labelled = load_transforms(data.preprocess, keys=("image",))
            cache = build_teacher_cache(teacher, cases, load_labelled, directory, teacher_ckpt, data.preprocess,
                                        roi, data.num_classes, overlap=overlap, downsample=downsample, device=self.device)
            seconds = sum(e["seconds"] for e in cache.entries.values())
            return {"cache": str(cache.directory)}, {"bytes": cache.size_bytes(), "cases": len(cache.entries),
                                                      "teacher_seconds": round(seconds, 2)}

        record = self._stage("cache", self.run_dir / "cache", inputs, body)
        return Path(record.artifacts["cache"])

    # -- λ search -----------------------------------------------------------------------------------------
    def stage_tune(self, teacher_ckpt: Path | None, cache_dir: Path | None) -> dict:
        """Optuna search over λ (``distill.tune``); the final students then train with the best λ.

        The study lives in ``tune.storage`` (default ``runs/<name>/optuna.db``) and resumes on its own, so an
        interrupted search continues; the stage record only makes a finished search skip at once.
        """
        from distill.tune import tune_lambda

        data = self._need_data()
        inputs = {"tune": self.cfg["tune"], "student": self.cfg["student"],
                  "distill": {k: v for k, v in self.cfg["distill"].items() if k not in ("lambda_kd", "baseline_lambda_zero")},
                  "data": self.records["data"].artifact_hashes["data"],
                  "cache": self.records["cache"].inputs_hash if "cache" in self.records else None,
                  "teacher": self.records["teacher"].artifact_hashes["teacher"] if "teacher" in self.records else None}

        def body(directory: Path) -> tuple[dict[str, str], dict]:
            summary = tune_lambda(self.cfg, self.run_dir, data, cache_dir, teacher_ckpt, self.tracker, log=self.log)
            write_json_atomic(directory / "summary.json", summary)
            return {"summary": str(directory / "summary.json")}, {
                "best_lambda": float(summary["best_lambda"]), "best_dice": summary.get("best_dice"),
                "best_trial": summary.get("best_trial"),
                "best_params": summary.get("best_params", {}), "endpoints": summary.get("endpoints"),
                "trials": summary.get("trials"), "complete_trials": summary.get("complete_trials", [])}

        record = self._stage("tune", self.run_dir / "tune_stage", inputs, body, all_ranks=True)
        self.cfg["distill"]["lambda_kd"] = float(record.info["best_lambda"])
        searched = {k: v for k, v in (record.info.get("best_params") or {}).items() if k in ("temperature", "lr")}
        self.cfg["distill"].update(searched)  # a searched temperature or lr goes with the best λ
        self.log(f"[tune] students train with the best λ = {self.cfg['distill']['lambda_kd']:.4g}"
                 + "".join(f", {k} = {v:.4g}" for k, v in searched.items()))
        return dict(record.info)

    def trial_to_continue(self, name: str, lambda_kd: float, steps: int | None = None) -> dict | None:
        """The completed tuning trial a final student can continue instead of starting over, or None.

        A trial qualifies when it trained the same student with the same λ (and temperature and lr) and is a
        prefix of the final run: it trained the full budget, or fewer steps under a constant schedule and a
        constant λ (the learning rate and λ then do not depend on the budget; ``distill.lambda_schedule: linear``
        decays λ over the budget). The student then resumes from the trial's checkpoint
        as from a killed run of its own; the engine's resume check still refuses it if any setting differs.
        """
        from distill.train import budget_free
        from distill.tune import TuneSettings

        settings = TuneSettings.from_config(self.cfg)
        if "tune" not in self.records or not settings.continue_trials:
            return None
        dcfg = self.cfg["distill"]
        budget = int(steps if steps is not None else dcfg["steps"])
        trial_steps = settings.steps_per_trial
        if not (trial_steps == budget or (trial_steps < budget and budget_free(dcfg))):
            return None
        for trial in self._complete_trials():
            same = (trial.get("student") == name and float(trial["lambda_kd"]) == float(lambda_kd)
                    and all(trial.get(k) is None or float(trial[k]) == float(dcfg[k]) for k in ("temperature", "lr")))
            if same and trial.get("out_dir") and (Path(trial["out_dir"]) / "last.pt").is_file():
                return trial
        return None

    def _complete_trials(self) -> list[dict]:
        """The completed trials of this run's λ search (``distill.tune.summarize_study``), [] without one."""
        record = self.records.get("tune")
        return list(record.info.get("complete_trials", [])) if record is not None else []

    # -- students -----------------------------------------------------------------------------------------
    def stage_students(self, teacher_ckpt: Path | None, cache_dir: Path | None) -> list[StudentResult]:
        """Each of ``student.names`` at ``distill.lambda_kd``, then one comparison student of the first name.

        A student trains ``student.steps[name]`` steps where given, else ``distill.steps``; the comparison
        student trains as many as the first name.

        The comparison (``distill.baseline_lambda_zero``) is the λ = 0 baseline when the students distil;
        when the λ search found λ = 0 best, it is the best completed KD trial (λ > 0) instead, continued like
        any other matching trial, so the report still sets a KD student beside the label-trained one.

        Under ``run.time_budget_minutes`` (pipeline/budget.py) a student after the first that would take the run
        past the budget is left out (``self.budget_decisions`` says which and why); the first always trains.
        """
        lambda_kd = float(self.cfg["distill"]["lambda_kd"])
        first = self.cfg["student"]["names"][0]
        comparison = None
        if self.cfg["distill"]["baseline_lambda_zero"]:
            if lambda_kd > 0:
                comparison = (first, 0.0)
            else:
                kd = [t for t in self._complete_trials()
                      if t.get("student") == first and float(t["lambda_kd"]) > 0 and t.get("dice") is not None]
                if kd:
                    best_kd = max(kd, key=lambda t: t["dice"])
                    self.log(f"[students] λ = 0 won the search; the best KD trial (λ = {best_kd['lambda_kd']:.4g}, "
                             f"trial {best_kd['number']}) is the comparison student")
                    comparison = (first, float(best_kd["lambda_kd"]))
        self.budget_decisions = []
        results = []
        for name in self.cfg["student"]["names"]:
            if results and not self._fits_budget(name, lambda_kd, results[0], comparison):
                continue
            results.append(self.stage_student(name, lambda_kd, teacher_ckpt, cache_dir))
        if comparison is not None:
            results.append(self.stage_student(*comparison, teacher_ckpt, cache_dir))
        return results

    def named_students(self, students: list[StudentResult]) -> list[StudentResult]:
        """The deliverables among ``stage_students``' results: the students of ``student.names`` it trained, not the
        comparison student appended after them."""
        trained = len(self.cfg["student"]["names"]) - sum(not d.train for d in self.budget_decisions)
        return students[:trained]

    def _fits_budget(self, name: str, lambda_kd: float, first: StudentResult,
                     comparison: tuple[str, float] | None) -> bool:
        """Whether student ``name`` (not the first) trains under ``run.time_budget_minutes``; logs the decision."""
        budget = self.cfg["run"].get("time_budget_minutes")
        if budget is None or self.started is None:
            return True
        elapsed = time.perf_counter() - self.started
        budgets, default_steps = student_budgets(self.cfg), int(self.cfg["distill"]["steps"])
        if self._student_up_to_date(name, lambda_kd, budgets.get(name)):
            return True  # trained by an earlier invocation: costs nothing now
        pending = 0.0
        if comparison is not None:
            other, other_lambda = comparison
            *_, trial = self._student_inputs(other, other_lambda, budgets.get(other))
            if trial is None and not self._student_up_to_date(other, other_lambda, budgets.get(other)):
                pending = float(first.seconds_per_step or 0.0) * (budgets.get(other) or default_steps)
        self.log(f"[students] timing {name}'s training step on this CPU for the time budget ({budget:g} min)")
        seconds = probe_seconds_per_step(self.cfg, name, max(int(k) for k in self._need_data().labels) + 1)
        decision = project(float(budget), elapsed, name, seconds, budgets.get(name) or default_steps, pending_s=pending)
        self.budget_decisions.append(decision)
        self.log(f"[students] {decision.sentence()}")
        return decision.train

    def _student_inputs(self, name: str, lambda_kd: float, steps: int | None) -> tuple[str, Path, dict, dict | None]:
        """A student stage's folder name, folder and inputs (what makes it up to date), and the completed tuning
        trial it continues (``trial_to_continue``), if any."""
        folder = name if lambda_kd > 0 else f"{name}_lambda0"
        uses_teacher = lambda_kd > 0
        inputs = {
            "name": name, "lambda_kd": lambda_kd, "steps": steps,
            "student": self.cfg["student"]["roi_size"], "arch": self.cfg["student"]["arch"],
            "distill": {k: v for k, v in self.cfg["distill"].items() if k not in ("lambda_kd", "baseline_lambda_zero")},
            "data": self.records["data"].artifact_hashes["data"],
            "use_unlabeled": self.cfg["data"]["use_unlabeled"],
            "teacher": self.records["teacher"].artifact_hashes["teacher"] if uses_teacher else None,
            "cache": self.records["cache"].inputs_hash if uses_teacher and "cache" in self.records else None,
            "seed": self.cfg["run"]["seed"],
        }
        trial = self.trial_to_continue(name, lambda_kd, steps)
        inputs["continues_trial"] = None if trial is None else {k: trial[k] for k in ("number", "out_dir", "last_step")}
        return folder, self.run_dir / "students" / folder, inputs, trial

    def _student_up_to_date(self, name: str, lambda_kd: float, steps: int | None) -> bool:
        from distill.stages import stage_up_to_date

        _, directory, inputs, _ = self._student_inputs(name, lambda_kd, steps)
        return stage_up_to_date(directory, inputs)

    def stage_student(self, name: str, lambda_kd: float, teacher_ckpt: Path | None, cache_dir: Path | None,
                      steps: int | None = None) -> StudentResult:
        """Train (or find up to date) one student, for ``steps`` steps; ``None``: the student's budget
        (``student.steps[name]``, else ``distill.steps``), so that every command trains the same student."""
        if steps is None:
            steps = student_budgets(self.cfg).get(name)
        data = self._need_data()
        folder, directory, inputs, trial = self._student_inputs(name, lambda_kd, steps)
        uses_teacher = lambda_kd > 0

        def body(out: Path) -> tuple[dict[str, str], dict]:
            if trial is not None:
                self._start_from_trial(trial, out)
            result = train_student(self.cfg, self.run_dir, name, lambda_kd, teacher_ckpt if uses_teacher else None,
                                   cache_dir if uses_teacher else None, self.tracker, out_dir=out, steps=steps, data=data)
            barrier()  # rank 0 writes student.pt after fit; the record must not be read before
            return {"student": result.checkpoint}, result.to_dict()

        record = self._stage(f"student {folder}", directory, inputs, body, all_ranks=True)
        return StudentResult(**record.info)

    def _start_from_trial(self, trial: Mapping[str, Any], out: Path) -> None:
        """Copy a tuning trial's checkpoints into a student folder that has none (the trial stays intact)."""
        source = Path(trial["out_dir"])
        if is_main_process() and not (out / "last.pt").is_file():
            out.mkdir(parents=True, exist_ok=True)
            for file in ("best.pt", "last.pt"):  # last.pt last: its presence marks a complete copy
                if (source / file).is_file():
                    with atomic_path(out / file) as tmp:
                        shutil.copyfile(source / file, tmp)
            self.log(f"[student] continues tuning trial {trial['number']} ({source}, {trial['last_step']} steps "
                     f"trained, Dice {trial['dice']:.4f}) instead of starting over")
        barrier()

    # -- evaluation ---------------------------------------------------------------------------------------
    def stage_evaluation(self, teacher_ckpt: Path | None, students: list[StudentResult]) -> dict:
        """Teacher and every student on the same test cases (scored once, here): per-class Dice, NSD, HD95."""
        from distill.evaluate import evaluate_models

        data = self._need_data()
        models = {}
        if teacher_ckpt is not None:
            models["teacher"] = {"kind": "teacher", "checkpoint": str(teacher_ckpt)}
        for s in students:
            label = s.name if s.lambda_kd > 0 else f"{s.name} (λ=0)"
            models[label] = {"kind": "student", "checkpoint": s.checkpoint, "lambda_kd": s.lambda_kd}
        inputs = {"models": {k: self._hash_of(v["checkpoint"]) for k, v in models.items()},
                  "evaluation": self.cfg["evaluation"], "data": self.records["data"].artifact_hashes["data"],
                  "teacher_roi": self.cfg["teacher"]["roi_size"]}

        def body(directory: Path) -> tuple[dict[str, str], dict]:
            results = evaluate_models(models, data, self.cfg, directory, device=self.device, log=self.log)
            for label, summary in results.items():
                self.tracker.log_metrics({f"{label}.mean_dice": summary["summary"]["mean"]["dice"]})
            return {"metrics": str(directory / "metrics.json")}, {}

        record = self._stage("evaluation", self.run_dir / "evaluation", inputs, body)
        import json

        return json.loads(Path(record.artifacts["metrics"]).read_text())

    # -- export -------------------------------------------------------------------------------------------
    def stage_export(self, students: list[StudentResult]) -> dict[str, str]:
        """A deployment bundle per final student (``export.build_bundle``), when export/ is available."""
        if not self.cfg["export"]["enabled"]:
            self.log("[export] disabled (export.enabled=false)")
            return {}
        try:
            build_bundle = importlib.import_module("export").build_bundle
        except (ImportError, AttributeError):
            self.log("[export] export.build_bundle is not available; skipped")
            return {}
        ecfg = self.cfg["export"]
        data = self._need_data()
        bundles = {}
        for s in students:
            inputs = {"student": self._hash_of(s.checkpoint), "export": ecfg}

            def body(directory: Path, s: StudentResult = s) -> tuple[dict[str, str], dict]:
                # Calibration crops come from training cases only, the INT8 accuracy check from validation cases
                # (it chooses the INT8 settings), both through the training preprocessing; the test cases stay
                # unseen until the benchmark scores them.
                bundle = build_bundle(s.checkpoint, directory / "bundle", calibration=data.train,
                                      validation=data.val,
                                      int8=bool(ecfg["int8"]), max_dice_drop=float(ecfg["max_dice_drop"]),
                                      calibration_crops=int(ecfg["calibration_crops"]),
                                      max_restore_iterations=ecfg["max_restore_iterations"],
                                      min_fp32_dice=float(ecfg["min_fp32_dice"]),
                                      dynamic_batch=bool(ecfg["dynamic_batch"]),
                                      fp32_modules=ecfg["int8_fp32_modules"],
                                      onnxruntime_int8=bool(ecfg["onnxruntime_int8"]),
                                      overlap=float(self.cfg["evaluation"]["overlap"]),
                                      threads=int(self.cfg["run"]["threads"] or 2),
                                      seed=int(self.cfg["run"]["seed"]), log=self.log)
                return {"bundle": str(bundle)}, {}

            record = self._stage(f"export {s.name}", self.run_dir / "bundle" / s.name, inputs, body)
            bundles[s.name] = record.artifacts["bundle"]
        return bundles

    # -- benchmark ----------------------------------------------------------------------------------------
    def stage_benchmark(self, bundles: Mapping[str, str]) -> dict | None:
        """Latency and accuracy of every bundle × runtime × precision × threads (``benchmarks.run_benchmarks``)."""
        if not self.cfg["benchmark"]["enabled"] or not bundles:
            self.log("[benchmark] disabled or no bundle to benchmark; skipped")
            return None
        if importlib.util.find_spec("benchmarks") is None or not hasattr(importlib.import_module("benchmarks"), "run_benchmarks"):
            self.log("[benchmark] benchmarks.run_benchmarks is not available; skipped")
            return None
        from benchmarks import run_benchmarks
        from benchmarks.latency import config_kwargs

        bcfg = {k: v for k, v in self.cfg["benchmark"].items()}
        inputs = {"bundles": {k: self._hash_of(v) for k, v in bundles.items()}, "benchmark": bcfg,
                  "data": self.records["data"].artifact_hashes["data"]}

        def body(directory: Path) -> tuple[dict[str, str], dict]:
            # This run's bundles only: the folder may hold one of a student an earlier run trained and this one
            # does not (make demo, then make demo ARGS='student.names=[swinunetr_tiny]').
            out = run_benchmarks(run_dir=self.run_dir, bundles=list(bundles.values()), out_dir=directory,
                                 run_dir_bundles=False,
                                 nsd_tolerance_mm=float(self.cfg["evaluation"]["nsd_tolerance_mm"]),
                                 **config_kwargs(bcfg))
            return dict(out.get("files", {})), {"rows": len(out.get("rows", [])), "notes": out.get("notes", [])}

        return self._stage("benchmark", self.run_dir / "benchmarks", inputs, body).artifacts

    # -- everything ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        """All stages in order, then ``report.json`` and ``report.md``; returns the report."""
        from distill.report import build_report, format_report

        self.started = time.perf_counter()
        with self.tracking():
            self.stage_data()
            tuning = bool(self.cfg["tune"]["enabled"])
            needs_teacher = float(self.cfg["distill"]["lambda_kd"]) > 0 or tuning
            teacher_ckpt = self.stage_teacher() if needs_teacher else None
            cache_dir = None
            if needs_teacher and self.cfg["distill"]["mode"] == "cached":
                cache_dir = self.stage_cache(teacher_ckpt)
            tune = self.stage_tune(teacher_ckpt, cache_dir) if tuning else None
            students = self.stage_students(teacher_ckpt, cache_dir)
            evaluation = self.stage_evaluation(teacher_ckpt, students)
            # The deliverables are the students of student.names at the chosen λ (even when the search found
            # λ = 0 best); the λ = 0 baseline appended after them is for comparison only.
            bundles = self.stage_export(self.named_students(students))
            benchmark = self.stage_benchmark(bundles)
            report = build_report(self.cfg, self.run_dir, self.records, students, evaluation, bundles, benchmark,
                                  wall_seconds=time.perf_counter() - self.started, tune=tune,
                                  budget=[d.to_dict() for d in self.budget_decisions])
            if is_main_process():
                report["curves"] = self._plot_curves(students)
            text = format_report(report)
            if is_main_process():
                write_json_atomic(self.run_dir / "report.json", report)
                write_text_atomic(self.run_dir / "report.md", text)
            self.tracker.log_text(text, "report.md")
        if is_main_process():
            self.log(text)
        return report

    def _plot_curves(self, students: list[StudentResult]) -> str | None:
        """``dice_vs_minutes.png``: validation Dice against training minutes of the teacher and every student."""
        from distill.curves import plot_dice_vs_minutes

        series = {}
        teacher_info = self.records["teacher"].info if "teacher" in self.records else {}
        if teacher_info.get("history"):
            series["teacher"] = teacher_info["history"]
        dcfg = self.cfg["distill"]
        for s in students:
            end = s.lambda_kd * float(dcfg["lambda_end_ratio"])
            lam = f"{s.lambda_kd:g}" + (f" → {end:g}" if s.lambda_kd > 0 and dcfg["lambda_schedule"] == "linear" else "")
            series[f"{s.name} (λ={lam}, {s.labelled}+{s.unlabelled} cases)"] = s.history
        path = plot_dice_vs_minutes(series, self.run_dir / "dice_vs_minutes.png",
                                    title=f"{self.cfg['run']['name']}: validation Dice ({len(self._need_data().val)} cases)")
        return str(path) if path else None

    def _check_teacher(self, meta: Mapping[str, Any], path: str | Path, roi_size: Any) -> list[str]:
        """``teacher.compat.check_teacher_fits`` against this run's data and settings, as a ``PipelineError``;
        returns the preprocessing differences that ``teacher.allow_preprocess_mismatch`` let through."""
        from teacher.compat import TeacherMismatchError, check_teacher_fits

        data = self._need_data()
        try:
            return check_teacher_fits(meta, data.labels, data.preprocess, roi_size, source=path,
                                      allow_preprocess_mismatch=self.cfg["teacher"]["allow_preprocess_mismatch"])
        except TeacherMismatchError as exc:
            raise PipelineError(str(exc)) from exc

    def _need_data(self) -> PreparedData:
        if self.data is None:
            raise PipelineError("the data stage has not run yet (call stage_data first)")
        return self.data

    def _hash_of(self, path: str | Path) -> str:
        from distill.stages import artifact_hash

        return artifact_hash(path)


def student_budgets(cfg: Mapping[str, Any]) -> dict[str, int]:
    """``student.steps`` checked: ``{name: steps}`` for the students of ``student.names`` given a budget.

    Like ``student.arch``, one setting serves every run of a preset: the budget of a known student the run does
    not train is ignored (``student.names=[swinunetr_tiny]`` on the demo, whose small student has one), a name
    no student has is refused (a typo), and so is a budget that is not a positive whole number, naming the key
    ``student.steps.<name>``.
    """
    from student import STUDENTS

    budgets = cfg["student"].get("steps") or {}
    names = list(cfg["student"]["names"])
    out = {}
    for name, steps in budgets.items():
        if name not in STUDENTS:
            near = difflib.get_close_matches(str(name), sorted(STUDENTS), n=1)
            raise ConfigError(f"student.steps.{name}: no student is called {name!r}"
                              + (f" (did you mean {near[0]!r}?)" if near else f" (known: {sorted(STUDENTS)})"))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ConfigError(f"student.steps.{name}: expected a positive number of steps, got {steps!r}")
        if name in names:
            out[str(name)] = int(steps)
    return out


def _yaml(cfg: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(cfg), sort_keys=False)
