"""Held-out evaluation of the teacher and the students on the same test cases (scored once, for the report).

The cases are ``PreparedData.scoring_split()``: the test split, or the validation split of a run without
one (``data.test_fraction: 0``), in which case every figure is recorded as ``"split": "val"`` and the report
says it was measured on the cases that chose the checkpoints.

Every model predicts every validation case through the same sliding window
(``evaluation.sliding_window.predict_logits``) on the preprocessed grid (the spacing of the preprocessing
spec, where distances are measured), and is scored per class with ``evaluation.metrics.case_metrics``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from configs.schema import EvaluationConfig
from data.atomic import write_json_atomic
from data.prepare import PreparedData


def load_model(kind: str, checkpoint: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Rebuild a teacher or a student from its checkpoint, in eval mode on ``device``."""
    if kind == "teacher":
        from teacher.checkpoint import load_teacher

        return load_teacher(checkpoint, device=device)
    from student import load_student

    return load_student(checkpoint, device=device)


def evaluate_models(
    models: Mapping[str, Mapping[str, Any]],
    data: PreparedData,
    cfg: Mapping[str, Any],
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Score each model on the test split (``data.scoring_split()``) and write ``out_dir/metrics.json`` (+ ``per_case.csv``).

    Args:
        models: ``{display name: {"kind": "teacher"|"student", "checkpoint": path, ...}}``.
        data: prepared data (validation cases, labels, preprocessing spec).
        cfg: run config (``evaluation.overlap``, ``evaluation.nsd_tolerance_mm``, ROIs).
        out_dir: where results go.
        device: where models run.
        log: progress lines.

    Returns:
        ``{name: {"kind", "checkpoint", "params", "file_mb", "roi_size", "seconds", "split", "case_ids",
        "summary"}}`` with
        ``summary`` from ``evaluation.metrics.summarize`` (per-class and mean Dice/NSD/HD95).
    """
    from data.transforms import load_transforms
    from evaluation.metrics import case_metrics, summarize
    from deploy.postprocess import keep_largest_component, spec_classes
    from evaluation.sliding_window import predict_logits

    out_dir = Path(out_dir)
    device = torch.device(device)
    ecfg = cfg.get("evaluation", {})
    overlap = float(ecfg.get("overlap", EvaluationConfig.overlap))
    tolerance = float(ecfg.get("nsd_tolerance_mm", EvaluationConfig.nsd_tolerance_mm))
    spacing = [float(s) for s in data.preprocess["spacing_mm"]]
    load = load_transforms(data.preprocess, keys=("image", "label"))
    split, items = data.scoring_split()
    if split != "test":
        log(f"[evaluation] no test split (data.test_fraction is 0): scoring the {len(items)} validation cases, which "
            f"chose the checkpoints; these figures are optimistic")
    cases = [(c["case_id"], load(dict(c))) for c in items]
    names = {int(k): str(v) for k, v in data.labels.items()}

    results: dict[str, dict] = {}
    all_rows = []
    for name, spec in models.items():
        model, meta = load_model(str(spec["kind"]), spec["checkpoint"], device)
        roi = [int(s) for s in meta.get("roi_size") or cfg["teacher"]["roi_size"]]
        # A student's own postprocessing, chosen on validation (distill.train.choose_postprocess), as deploy applies it.
        clean = spec_classes(meta.get("postprocess"), data.num_classes, str(spec["checkpoint"]))
        start = time.perf_counter()
        rows = []
        for case_id, case in cases:
            logits = predict_logits(model, torch.as_tensor(case["image"]), roi, data.num_classes, overlap=overlap, device=device)
            logits = torch.as_tensor(logits).cpu().numpy()
            if clean:
                logits = keep_largest_component(logits, clean)
            pred = logits.argmax(0).astype(np.int16)
            label = torch.as_tensor(case["label"])[0].cpu().numpy().astype(np.int16)
            for row in case_metrics(pred, label, spacing, data.labels, nsd_tolerance_mm=tolerance):
                rows.append({"model": name, "case": case_id, **row})
        seconds = time.perf_counter() - start
        summary = summarize(rows)
        results[name] = {
            "kind": spec["kind"],
            "checkpoint": str(spec["checkpoint"]),
            "lambda_kd": spec.get("lambda_kd"),
            "params": int(sum(p.numel() for p in model.parameters())),
            "file_mb": round(Path(spec["checkpoint"]).stat().st_size / 2**20, 2),
            "roi_size": roi,
            "postprocess": {"largest_component": clean, "names": [names.get(c, str(c)) for c in clean]},
            "seconds": round(seconds, 2),
            "split": split,
            "case_ids": [case_id for case_id, _ in cases],
            "summary": summary,
        }
        all_rows += rows
        log(f"[evaluation] {name}: mean Dice {summary['mean']['dice']:.3f} on {summary['cases']} {split} cases ({seconds:.1f} s)")
        del model
    write_json_atomic(out_dir / "metrics.json", results)
    _write_rows(all_rows, out_dir / "per_case.csv")
    return results


def _write_rows(rows: list[dict], path: Path) -> None:
    """Per case × class table; ``evaluation.report.write_metrics_csv`` when it exists, else plain csv."""
    try:
        from evaluation.report import write_metrics_csv
    except ImportError:
        write_metrics_csv = None
    if write_metrics_csv is not None:
        write_metrics_csv(rows, path)
        return
    import csv
    import io

    from data.atomic import write_text_atomic

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())
