"""The Dice/latency Pareto front of a multi-objective tuning study, as a CSV table and a PNG plot.

A trial is on the front when no other completed trial is at least as accurate and at least as fast and
strictly better in one of the two. The front is computed from the rows (not from ``study.best_trials``)
so that the table and the plot use exactly the numbers shown beside them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from data.atomic import atomic_path
from evaluation.pareto import dominates as dominates_point
from evaluation.pareto import pareto_front as front_indices

PARETO_COLUMNS = ("number", "student", "lambda_kd", "temperature", "lr", "dice", "latency_ms", "checkpoint")


def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether trial row ``a`` is at least as good as ``b`` in Dice (higher) and latency (lower), and better in one."""
    return dominates_point((a["latency_ms"], a["dice"]), (b["latency_ms"], b["dice"]))


def pareto_front(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Non-dominated completed trials, fastest first (``evaluation.pareto``).

    Args:
        rows: ``distill.tune_plots.trial_rows`` of a study; rows need ``dice`` and ``latency_ms``.
    """
    done = [r for r in rows if r["state"] == "COMPLETE" and r["dice"] is not None and r["latency_ms"] is not None]
    return [done[i] for i in front_indices([(r["latency_ms"], r["dice"]) for r in done])]


def write_pareto_csv(front: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write the front as CSV (atomic), one row per trial (``PARETO_COLUMNS``).

    Args:
        front: from :func:`pareto_front`.
        path: destination ``.csv``.
    """
    from distill.tune_plots import write_trials_csv

    return write_trials_csv(front, path, columns=PARETO_COLUMNS)


def plot_pareto(rows: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]], path: str | Path,
                title: str = "") -> Path:
    """Latency (x) against Dice (y) of every completed trial by student, the front drawn as a staircase.

    Args:
        rows: every trial row.
        front: from :func:`pareto_front`.
        path: destination ``.png``.
        title: plot title (the study name).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["state"] == "COMPLETE" and r["dice"] is not None and r["latency_ms"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for i, student in enumerate(sorted({str(r["student"]) for r in done})):
        pts = [r for r in done if str(r["student"]) == student]
        ax.scatter([r["latency_ms"] for r in pts], [r["dice"] for r in pts], c=f"C{i}", label=student, alpha=0.8)
    if front:
        ax.step([r["latency_ms"] for r in front], [r["dice"] for r in front], where="post", color="k", lw=1,
                label="Pareto front")
        for r in front:
            ax.annotate(f"λ={r['lambda_kd']:.2g}", (r["latency_ms"], r["dice"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("CPU latency per ROI patch, ONNX Runtime p50 (ms)")
    ax.set_ylabel("validation Dice (mean foreground)")
    ax.set_title(f"Dice against latency {title}".strip())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    with atomic_path(path) as tmp:
        fig.tight_layout()
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
