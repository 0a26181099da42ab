"""Tables and plots of a tuning study: every trial as a row, Dice against λ, the optimisation history and every
trial's reported Dice.

The history and the reported Dice are Optuna's own plots (``optuna.visualization.matplotlib``). Dice against λ
is drawn here, because Optuna's slice plot lacks what it shows (see :func:`plot_dice_vs_lambda`). In the table
and that plot a trial's Dice is its objective value when it completed, and the best Dice it reported before it
was stopped when it was pruned (drawn hollow). Failed trials are listed in the table only.
"""
from __future__ import annotations

import contextlib
import csv
import math
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import optuna

from data.atomic import atomic_path

COLUMNS = ("number", "state", "lambda_kd", "student", "temperature", "lr", "dice", "latency_ms", "last_step",
           "retry_of", "worker", "checkpoint", "out_dir")


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One dict per trial (``COLUMNS``), in trial order; ``lambda_kd`` is the λ the trial trained with.

    Args:
        study: a study made by ``distill.tune``.
    """
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        dice = None
        if t.state == optuna.trial.TrialState.COMPLETE and t.values:
            dice = float(t.values[0])
        elif t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values:
            dice = float(max(t.intermediate_values.values()))
        lam = attrs.get("lambda_kd", t.params.get("lambda_kd"))
        latency = attrs.get("latency_ms")
        if latency is None and t.values and len(t.values) == 2:
            latency = t.values[1]
        rows.append({
            "number": t.number,
            "state": t.state.name,
            "lambda_kd": None if lam is None else float(lam),
            "student": attrs.get("student", t.params.get("student")),
            "temperature": attrs.get("temperature"),
            "lr": attrs.get("lr"),
            "dice": dice,
            "latency_ms": None if latency is None else float(latency),
            "last_step": attrs.get("last_step"),
            "retry_of": t.system_attrs.get("failed_trial"),
            "worker": attrs.get("worker"),
            "checkpoint": attrs.get("checkpoint"),
            "out_dir": attrs.get("out_dir"),
        })
    return rows


def write_trials_csv(rows: Sequence[dict[str, Any]], path: str | Path, columns: Sequence[str] = COLUMNS) -> Path:
    """Write trial rows as CSV (atomic); missing values are empty cells.

    Args:
        rows: from :func:`trial_rows` (or a subset of them, such as the Pareto front).
        path: destination ``.csv``.
        columns: the columns, in order; other keys are left out.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return Path(path)


def _scored(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["state"] in ("COMPLETE", "PRUNED") and r["dice"] is not None
            and r["lambda_kd"] is not None and math.isfinite(r["dice"])]


def plot_dice_vs_lambda(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Validation Dice of every scored trial against its λ; pruned trials hollow, the best one starred.

    Ours, not Optuna's ``plot_slice``: that one plots the sampler's parameter (λ = ``lambda_min`` for the enqueued
    λ = 0 trial of a log space, where the λ trained is the user attribute) and completed trials only; this one
    plots the λ trained, pruned trials' best reported Dice, and one colour per student size.

    Args:
        rows: from :func:`trial_rows`.
        path: destination ``.png``.
        title: plot title (the study name).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = _scored(rows)
    students = sorted({str(r["student"]) for r in scored})
    colours = {s: f"C{i}" for i, s in enumerate(students)}
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for student in students:
        for state, face in (("COMPLETE", None), ("PRUNED", "none")):
            pts = [r for r in scored if r["state"] == state and str(r["student"]) == student]
            if pts:
                ax.scatter([r["lambda_kd"] for r in pts], [r["dice"] for r in pts], s=40, edgecolors=colours[student],
                           facecolors=face or colours[student], marker="o",
                           label=f"{student} {'complete' if state == 'COMPLETE' else 'pruned (best reported)'}")
    complete = [r for r in scored if r["state"] == "COMPLETE"]
    if complete:
        best = max(complete, key=lambda r: r["dice"])
        ax.scatter([best["lambda_kd"]], [best["dice"]], marker="*", s=220, c="gold", edgecolors="k", zorder=3,
                   label=f"best: λ={best['lambda_kd']:.3g}, Dice {best['dice']:.3f}")
    ax.set_xlabel("λ (weight of the KD term)")
    ax.set_ylabel("validation Dice (mean foreground)")
    ax.set_xlim(-0.03, 1.03)
    ax.set_title(f"Dice against λ {title}".strip())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_history(study: optuna.Study, path: str | Path, title: str = "") -> Path:
    """Optuna's optimisation history: each completed trial's Dice in trial order, and the best so far.

    Pruned trials have no objective value and are left out here; ``plot_intermediate_values`` draws them.
    In a Dice-latency study the Dice of each trial is drawn without a best-so-far line (Optuna draws none for
    a chosen target; the best trials there are the Pareto front, ``distill.pareto``).

    Args:
        study: the study.
        path: destination ``.png``.
        title: plot title (the study name).
    """
    from optuna.visualization.matplotlib import plot_optimization_history

    multi = len(study.directions) > 1
    with _optuna_plot():
        ax = plot_optimization_history(study, target=(lambda t: t.values[0]) if multi else None, target_name="Dice")
        ax.set_ylabel("validation Dice (mean foreground)")
        ax.set_title(f"Optimisation history {title}".strip())
        ax.legend(fontsize=8, loc="best")  # two entries: inside the axes rather than Optuna's place beside them
        return _save(ax.figure, path, tight=True)


def plot_intermediate_values(study: optuna.Study, path: str | Path, title: str = "") -> Path:
    """Optuna's intermediate values: every trial's validation Dice at each report, so a pruned trial's curve ends
    where the pruner stopped it. Single-objective studies only (multi-objective trials report nothing).

    Args:
        study: the study.
        path: destination ``.png``.
        title: plot title (the study name).
    """
    from optuna.visualization.matplotlib import plot_intermediate_values as optuna_plot

    with _optuna_plot():
        ax = optuna_plot(study)
        ax.set_xlabel("step")
        ax.set_ylabel("validation Dice (mean foreground)")
        ax.set_title(f"Dice at each validation {title}".strip())
        return _save(ax.figure, path, tight=True)


@contextlib.contextmanager
def _optuna_plot() -> Iterator[Any]:
    """Agg backend; Optuna's ExperimentalWarning silenced here only; the ggplot style its plots switch on
    (``plt.style.use``, global) undone on exit, so later figures in the process keep the defaults."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings(), plt.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield plt


def _save(fig: Any, path: str | Path, tight: bool = False) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.tight_layout()
        # Optuna's plots put their legend outside the axes: a tight bounding box keeps it in the image
        fig.savefig(tmp, format="png", bbox_inches="tight" if tight else None)
    plt.close(fig)
    return Path(path)
