"""Validation Dice against training minutes: how fast each model learns, on one plot.

The engine's history (``training.loop.fit``) records ``train_s``, the training seconds up to each validation
(validation itself excluded), so curves of models trained one after another share an honest time axis. Used
by the pipeline's report (teacher, KD students, λ = 0 student) and by ``distill.kd_regimes``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def curve_points(history: Sequence[Mapping[str, float]]) -> list[tuple[float, float]]:
    """``(minutes, validation Dice)`` of a history's validations that carry both (older runs lack ``train_s``)."""
    return [(float(h["train_s"]) / 60.0, float(h["dice"])) for h in history if "train_s" in h and "dice" in h]


def plot_dice_vs_minutes(series: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path,
                         title: str = "", dashed: Sequence[str] = ()) -> Path | None:
    """Write a PNG with one line per ``{label: history}``; returns the path, or None when nothing had points
    or matplotlib is missing (the figures stay in the JSON either way)."""
    curves = {label: curve_points(h) for label, h in series.items()}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from data.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in curves.items():
        ax.plot(*zip(*points), marker="o", ms=3, label=label, linestyle="--" if label in dashed else "-")
    ax.set_xlabel("training minutes (validation excluded)")
    ax.set_ylabel("validation mean foreground Dice")
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
