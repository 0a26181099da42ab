"""Does distillation pay, and where? λ = 0 against KD students at equal steps, per label regime, on the test split.

    python -m distill.kd_regimes [key=value ...] --config configs/demo.yaml --teacher runs/demo/teacher/teacher.pt \\
        --steps 400 [--variants lambda0 kd_pseudo ...] [--regimes few full]

(The key=value overrides come before the options: ``--variants`` and ``--regimes`` take every word after them.)

The scenario distillation is for (../shared/DESIGN.md, ``data.site``): the teacher was adapted on a labelled
corpus; the students' site has a few labelled scans and many unlabelled ones. Two regimes of the same site:

- ``few``: the site as configured (``data.site.labelled`` of its cases keep their label, the rest are scans);
- ``full``: every site case labelled (the labels the ``few`` regime withholds are given back).

Each variant trains the same student (``student.names[0]`` unless ``--student``) for the same steps and seed
with its own ``distill.*`` settings (``VARIANTS``), in ``<run>/regimes/<regime>/<variant>``; the run's
validation split picks its checkpoint, and the evaluation stage's code scores it once on the test split. The
result is ``<run>/regimes/regimes.json``, a Markdown table (``regimes.md``) and validation Dice against training
minutes for every run (``regimes_curves.png``). A finished (variant, steps) is not trained again; under a constant
learning rate and a constant λ a longer budget continues the variant's run from its ``last.pt`` (the rate and λ
are then those of a run trained for the longer budget from the start, and so are its crops: batch k is drawn from
the seed and k, ``training.batches``) and is recorded beside the shorter one; under a decaying rate or λ (which depend on the
budget) each budget trains from the start in its own folder.

The data, teacher and cache are the pipeline's stages of the same run folder, so a teacher given with
``--teacher`` is checked against the data like any other, and its cache is built once for both regimes.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

# name -> (λ, distill.* settings over the config). λ = 0 never sees the teacher (nor its pseudo-labels).
VARIANTS: dict[str, tuple[float, dict[str, Any]]] = {
    "lambda0": (0.0, {}),
    "kd": (0.5, {"pseudo_labels": False, "kd_weighting": "uniform"}),
    "kd_pseudo": (0.5, {"pseudo_labels": True, "kd_weighting": "uniform"}),
    "kd_pseudo_balanced": (0.5, {"pseudo_labels": True, "kd_weighting": "class_balanced"}),
    "kd_pseudo_l0.2": (0.2, {"pseudo_labels": True, "kd_weighting": "uniform"}),
    "kd_pseudo_l0.8": (0.8, {"pseudo_labels": True, "kd_weighting": "uniform"}),
    "kd_balanced": (0.5, {"pseudo_labels": False, "kd_weighting": "class_balanced"}),
    "kd_pseudo_balanced_half": (0.5, {"pseudo_labels": True, "kd_weighting": "class_balanced", "labelled_fraction": 0.5}),
    "kd_l1_balanced": (1.0, {"kd_weighting": "class_balanced", "labelled_fraction": 0.5}),
    # Labels only in DiceCE (no pseudo-labels), the teacher through the class-balanced MSE; λ constant or decaying.
    "kd_balanced_half": (0.5, {"pseudo_labels": False, "kd_weighting": "class_balanced", "labelled_fraction": 0.5}),
    "kd_balanced_half_linear": (0.5, {"pseudo_labels": False, "kd_weighting": "class_balanced",
                                      "labelled_fraction": 0.5, "lambda_schedule": "linear"}),
    "kd_half_linear": (0.5, {"pseudo_labels": True, "kd_weighting": "class_balanced", "labelled_fraction": 0.5,
                             "lambda_schedule": "linear"}),
    # The demo's loss until 2026-12-04: half of the crops from labelled cases all along (the seed tables of
    # docs/measurements.md before then); the demo's now is kd_l1_linear_share.
    "kd_l1_linear": (1.0, {"pseudo_labels": False, "kd_weighting": "class_balanced", "labelled_fraction": 0.5,
                           "labelled_fraction_end": None, "lambda_schedule": "linear"}),
    # The demo's loss with every case drawn alike (8 labelled of 40: a fifth of the crops labelled, not half), so more
    # crops carry the teacher's term only while λ is high (docs/measurements.md, "The full-label regime again").
    "kd_l1_linear_every_case": (1.0, {"pseudo_labels": False, "kd_weighting": "class_balanced",
                                      "labelled_fraction": None, "labelled_fraction_end": None,
                                      "lambda_schedule": "linear"}),
    # The demo's loss from 2026-12-04 to 12-06: the labelled share of the crops rises from 0.5 to 1 as λ falls to 0
    # (distill/sampling.py), so the late steps, where an unlabelled crop carries almost no loss, go to the labels.
    "kd_l1_linear_share": (1.0, {"pseudo_labels": False, "kd_weighting": "class_balanced", "labelled_fraction": 0.5,
                                 "labelled_fraction_end": 1.0, "lambda_schedule": "linear"}),
    # The demo's loss (since 2026-12-07): kd_l1_linear_share with the MSE on square roots of the probabilities
    # (distill/loss.py: a missed class's gradient does not fade like its probability).
    "kd_l1_linear_share_sqrt": (1.0, {"pseudo_labels": False, "kd_weighting": "class_balanced", "labelled_fraction": 0.5,
                                      "labelled_fraction_end": 1.0, "lambda_schedule": "linear",
                                      "kd_target": "sqrt_probs"}),
    # The demo's loss with the teacher's argmax as the label of unlabelled cases (validation 0.718 against 0.720).
    "kd_l1_linear_pseudo": (1.0, {"pseudo_labels": True, "kd_weighting": "class_balanced", "labelled_fraction": 0.5,
                                  "labelled_fraction_end": None, "lambda_schedule": "linear"}),
    # The same losses under a cosine decay to 0 at the run's last step (the demo's students use a constant rate).
    "lambda0_cosine": (0.0, {"schedule": "cosine"}),
    "kd_half_cosine": (0.5, {"pseudo_labels": True, "kd_weighting": "class_balanced", "labelled_fraction": 0.5,
                             "schedule": "cosine"}),
}
# Every variant but kd_l1_linear_share(_sqrt) was measured with a constant labelled share of crops, and every one but
# kd_l1_linear_share_sqrt (the demo's since 2026-12-07) with the MSE on probabilities; each keeps them whatever the
# config says (a variant's settings are its recipe, as measured).
for _name, (_lam, _settings) in VARIANTS.items():
    if _lam > 0 and _name != "kd_l1_linear_share":
        _settings.setdefault("labelled_fraction_end", None)
    if _lam > 0:
        _settings.setdefault("kd_target", "probs")
REGIMES = ("few", "full")


class RegimeError(ValueError):
    """A regime, variant or data set-up that cannot be run; the message names it."""


def full_label_data(data: Any) -> Any:
    """The same prepared data with every site case labelled (the ``full`` regime); the site's own unlabelled
    scans (``imagesTs``) stay unlabelled."""
    from data.dataset import load_dataset
    from data.prepare import case_item

    if data.site is None:
        raise RegimeError("the full-label regime needs data.site (the students' own data); without it the students "
                          "already learn from every labelled training case")
    site = load_dataset(data.site["root"])
    by_id = {"site_" + str(c["case_id"]): c for c in site.training}
    labelled = [case_item(by_id[c["case_id"]], True, "site_")
                for c in data.site_labelled + data.site_unlabelled if c["case_id"] in by_id]
    rest = [c for c in data.site_unlabelled if c["case_id"] not in by_id]
    site_info = {**data.site, "labelled": len(labelled), "unlabelled": len(rest), "labels_withheld": 0}
    return dataclasses.replace(data, site=site_info, site_labelled=labelled, site_unlabelled=rest)


def run_regimes(cfg: Mapping[str, Any], run_dir: str | Path, variants: Sequence[str], regimes: Sequence[str],
                steps: int, student: str | None = None, tracking_uri: str | None = None) -> dict:
    """Train and score every (regime, variant); returns and writes ``regimes.json``."""
    from distill.evaluate import evaluate_models
    from pipeline.pipeline import Pipeline
    from distill.train import budget_free, train_student

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise RegimeError(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    bad = [r for r in regimes if r not in REGIMES]
    if bad:
        raise RegimeError(f"unknown regime(s) {bad}; known: {list(REGIMES)}")
    pipeline = Pipeline(cfg, out_dir=run_dir, tracking_uri=tracking_uri)
    name = student or pipeline.cfg["student"]["names"][0]
    out_root = pipeline.run_dir / "regimes"
    results_path = out_root / "regimes.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": {}}
    with pipeline.tracking():
        data = pipeline.stage_data()
        needs_teacher = any(VARIANTS[v][0] > 0 for v in variants)
        teacher_ckpt = pipeline.stage_teacher() if needs_teacher else None
        datasets = {"few": data}
        if "full" in regimes:
            datasets["full"] = full_label_data(data)
        cache_dir = None
        if needs_teacher:
            # One cache for both regimes: it covers every site case (the full regime labels some of them).
            cache_dir = pipeline.stage_cache(teacher_ckpt)
        for regime in regimes:
            rdata = datasets[regime]
            for variant in variants:
                key = f"{regime}/{variant}@{steps}"
                if key in results["runs"]:
                    print(f"[regimes] {key}: done (test Dice {results['runs'][key]['test_dice']:.3f})")
                    continue
                lambda_kd, settings = VARIANTS[variant]
                vcfg = copy.deepcopy(pipeline.cfg)
                vcfg["distill"].update(settings)
                out = out_root / regime / variant
                if not budget_free(vcfg["distill"]):
                    # A decaying lr or λ depends on the budget: a shorter run is no prefix of a longer one.
                    out = out_root / regime / f"{variant}@{steps}"
                result = train_student(vcfg, pipeline.run_dir, name, lambda_kd, teacher_ckpt, cache_dir,
                                       out_dir=out, steps=steps, data=rdata)
                scores = evaluate_models({variant: {"kind": "student", "checkpoint": result.checkpoint}}, rdata, vcfg,
                                         out / "test", device=pipeline.device)[variant]
                summary = scores["summary"]
                results["runs"][key] = {
                    "regime": regime, "variant": variant, "student": name, "lambda_kd": lambda_kd, "settings": settings,
                    "labelled": result.labelled, "unlabelled": result.unlabelled,
                    "steps": steps, "train_minutes": round(result.wall_seconds / 60, 2), "seconds_per_step": result.seconds_per_step,
                    "best_val_dice": result.best_dice, "best_step": result.best_step, "split": scores["split"],
                    "test_cases": len(scores["case_ids"]), "test_dice": float(summary["mean"]["dice"]),
                    "test_dice_per_class": {k: float(v["dice"]) for k, v in summary["per_class"].items()},
                    "history": [{k: h[k] for k in ("step", "dice", "train_s") if k in h} for h in result.history],
                }
                print(f"[regimes] {key}: λ={lambda_kd} {settings} -> test Dice {results['runs'][key]['test_dice']:.3f} "
                      f"(best val {result.best_dice:.3f} at step {result.best_step}; {result.wall_seconds / 60:.1f} min)")
                _write(results, out_root)
    _write(results, out_root)
    return results


def _write(results: dict, out_root: Path) -> None:
    from data.atomic import write_json_atomic, write_text_atomic

    out_root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_root / "regimes.json", results)
    write_text_atomic(out_root / "regimes.md", regimes_markdown(results))
    _plot(results, out_root / "regimes_curves.png")


def regimes_markdown(results: Mapping[str, Any]) -> str:
    """One row per run: regime, cases, λ, settings, steps, minutes, best validation and test Dice."""
    lines = ["| regime | variant | labelled + unlabelled | λ | settings | steps | train min | best val Dice (step) "
             "| test Dice |", "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in results["runs"].values():
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "–"
        lines.append(f"| {r['regime']} | {r['variant']} | {r['labelled']} + {r['unlabelled']} | {r['lambda_kd']:g} | "
                     f"{settings} | {r['steps']} | {r['train_minutes']:.1f} | {r['best_val_dice']:.3f} ({r['best_step']}) | "
                     f"**{r['test_dice']:.3f}** ({r['test_cases']} {r['split']}) |")
    return "\n".join(lines) + "\n"


def _plot(results: Mapping[str, Any], path: Path) -> None:
    from distill.curves import plot_dice_vs_minutes

    runs = results["runs"]
    plot_dice_vs_minutes({f"{k} (test {r['test_dice']:.3f})": r["history"] for k, r in runs.items()}, path,
                         dashed=[f"{k} (test {r['test_dice']:.3f})" for k, r in runs.items() if r["regime"] == "full"])
