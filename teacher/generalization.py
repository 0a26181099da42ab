"""Dice of phantom-trained models (a teacher, and the students it taught) on freshly generated phantoms no stage saw.

The demo validates on few phantoms (5 at the default config), so its held-out Dice moves by about ±0.02 with
the draw of those cases. This writes ``--cases`` new phantoms from another dataset seed (same generator, same
size as the run's ``data`` section) and scores every model on all of them with the validation of training
(whole-volume sliding windows, mean foreground Dice, evaluation/validation.py); a student is scored after its own
postprocessing (``postprocess`` in student.pt, chosen on validation), as evaluation and deploy apply it::

    python -m teacher.generalization --teacher runs/demo/teacher/teacher.pt --cases 20 --seed 777
    python -m teacher.generalization --teacher T --student runs/demo/students/swinunetr_tiny/student.pt --student S2

Two runs whose validation or test splits differ (another corpus size draws other cases) can be compared on such a
set: it is a selection set, not a test split. Phantom case ``i`` of dataset seed ``s`` is drawn from
``(s, split, i)`` alone (data.phantom_dataset.case_rng), so the run's own seed would regenerate its training cases,
and the site's seed its students' cases: both are refused.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from configs.schema import DataConfig, EvaluationConfig, RunConfig, defaults

class GeneralizationError(ValueError):
    """A teacher or request this check cannot serve; the message names the file or value."""


def fresh_phantom_dice(model: torch.nn.Module, meta: Mapping[str, Any], cases: int, seed: int,
                       phantom_dir: str | Path, device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Generate ``cases`` phantoms with dataset seed ``seed`` in ``phantom_dir`` and score the model on them.

    Args:
        model: a loaded teacher (``teacher.checkpoint.load_teacher``) or student (``student.load_student``).
        meta: its metadata (``config``, ``preprocess``, ``labels``, ``roi_size``; ``num_classes`` or one per label;
            a student's ``postprocess``: its classes keep only their largest connected piece before scoring).
        cases: number of fresh phantoms (>= 1).
        seed: their dataset seed; must differ from the run's ``run.seed`` and its phantom site's ``phantom_seed``.
        phantom_dir: where the phantoms are written (reused when it already holds this seed's cases).
        device: where the teacher runs.
        progress: print a line per case.

    Returns:
        ``{"dice": mean over classes, "per_class": {name: Dice}, "per_case": [mean per case], "cases", "seed",
        "postprocess": [classes cleaned]}``.
    """
    from data.atomic import atomic_path
    from data.phantom_dataset import write_dataset
    from deploy.postprocess import spec_classes
    from evaluation.validation import validation_dice
    from data.transforms import load_transforms
    from training.batches import preload

    cfg = meta.get("config") or {}
    dcfg = cfg.get("data") or {}
    if str(dcfg.get("source", DataConfig.source)) != "phantoms":
        raise GeneralizationError(f"the teacher was trained on data.source={dcfg.get('source')!r}, not on phantoms; "
                                  "score it on that dataset's held-out cases instead")
    run_seed = int((cfg.get("run") or {}).get("seed", RunConfig.seed))
    if int(seed) == run_seed:
        raise GeneralizationError(f"--seed {seed} is the run's own data seed: its phantoms are the training cases")
    site = dcfg.get("site") or {}
    if str(site.get("source")) == "phantoms" and site.get("phantom_seed") is not None and int(seed) == int(site["phantom_seed"]):
        raise GeneralizationError(f"--seed {seed} is the site's phantom seed (data.site.phantom_seed): its phantoms are "
                                  "the students' training cases")
    if int(cases) < 1:
        raise GeneralizationError(f"--cases must be >= 1, got {cases}")
    size = tuple(int(s) for s in dcfg.get("phantom_size") or defaults(DataConfig)["phantom_size"])
    labels = {int(k): str(v) for k, v in meta["labels"].items()}
    num_classes = int(meta.get("num_classes", len(labels)))
    clean = spec_classes(meta.get("postprocess"), num_classes)

    root = Path(phantom_dir)
    manifest = root / "generalization.json"
    wanted = {"seed": int(seed), "cases": int(cases), "size": list(size)}
    if not (manifest.is_file() and json.loads(manifest.read_text()) == wanted):
        if progress:
            print(f"[generalization] writing {cases} phantoms (seed {seed}, {list(size)} voxels) to {root}")
        write_dataset(root, cases=int(cases), test_cases=0, seed=int(seed), size=size)
        with atomic_path(manifest) as tmp:
            Path(tmp).write_text(json.dumps(wanted))
    images = sorted((root / "imagesTr").glob("*.nii.gz"))[: int(cases)]
    items = [{"case_id": p.name.split(".")[0], "image": str(p), "label": str(root / "labelsTr" / p.name)} for p in images]

    device = torch.device(device)
    overlap = float(cfg.get("evaluation", {}).get("overlap", EvaluationConfig.overlap))
    per_case, per_class_rows = [], []
    for i, item in enumerate(items):
        case = preload([item], load_transforms(meta["preprocess"], keys=("image", "label")))
        scores = validation_dice(model, case, meta["roi_size"], num_classes, overlap, device, clean_classes=clean)
        per_case.append(scores["dice"])
        per_class_rows.append([scores[f"dice_{c}"] for c in range(1, num_classes)])
        if progress:
            print(f"[generalization] {i + 1}/{len(items)} {item['case_id']}: Dice {scores['dice']:.3f}", flush=True)
    per_class = np.nanmean(np.asarray(per_class_rows, dtype=float), axis=0)
    return {
        "dice": float(np.nanmean(per_class)),
        "per_class": {labels.get(c, str(c)): float(v) for c, v in zip(range(1, num_classes), per_class)},
        "per_case": [float(d) for d in per_case],
        "cases": len(items),
        "seed": int(seed),
        "postprocess": clean,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: print each model's line and optionally write ``{"seed", "cases", "models": {path: result}}``."""
    from data.atomic import atomic_path
    from student import load_student
    from teacher.checkpoint import load_teacher

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", action="append", default=[], help="teacher.pt trained on phantoms (repeatable)")
    parser.add_argument("--student", action="append", default=[], help="student.pt distilled on phantoms (repeatable)")
    parser.add_argument("--cases", type=int, default=20, help="fresh phantoms to score (default 20)")
    parser.add_argument("--seed", type=int, default=777, help="their dataset seed, not the run's (default 777)")
    parser.add_argument("--phantom-dir", default=None, help="keep the phantoms here (default: a temporary folder)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [("teacher", p) for p in args.teacher] + [("student", p) for p in args.student]
    if not models:
        raise SystemExit("teacher.generalization: give at least one --teacher or --student")
    for kind, path in models:
        if not Path(path).is_file():
            raise SystemExit(f"--{kind} {path}: no such file")
    results = {}
    with tempfile.TemporaryDirectory(prefix="phantoms-") as tmp:
        for kind, path in models:
            model, meta = (load_teacher if kind == "teacher" else load_student)(path, device=args.device)
            started = time.perf_counter()
            try:
                result = fresh_phantom_dice(model, meta, args.cases, args.seed, args.phantom_dir or tmp, args.device)
            except GeneralizationError as exc:
                raise SystemExit(f"teacher.generalization: {path}: {exc}") from exc
            result["kind"] = kind
            results[str(Path(path).resolve())] = result
            spread = float(np.std(result["per_case"])) if result["per_case"] else math.nan
            cleaned = f", largest piece kept for classes {result['postprocess']}" if result["postprocess"] else ""
            print(f"[generalization] {kind} {path}: mean foreground Dice {result['dice']:.4f} on {result['cases']} fresh "
                  f"phantoms (seed {args.seed}; per-case std {spread:.3f}{cleaned}), {time.perf_counter() - started:.0f} s")
            print("  " + ", ".join(f"{k} {v:.3f}" for k, v in result["per_class"].items()))
    out = {"seed": int(args.seed), "cases": int(args.cases), "models": results}
    if args.output:
        with atomic_path(args.output, suffix=".json") as tmp_path:
            Path(tmp_path).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
