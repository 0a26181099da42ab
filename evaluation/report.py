"""Accuracy tables: the per case x class CSV a script reads, and the summary a person reads."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from data.atomic import write_text_atomic
from evaluation.metrics import METRIC_NAMES

_LEADING_COLUMNS = ("case", "class_id", "class_name", *METRIC_NAMES)


def write_metrics_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write metric rows (one per case and class) to a CSV, atomically.

    Columns: ``case`` (when the rows carry it), ``class_id``, ``class_name``, ``dice``, ``nsd``, ``hd95``,
    then any other keys in the order they first appear (e.g. ``model``, ``runtime``). NaN is written
    as ``nan`` so the file reads back with ``float()``.

    Args:
        rows: rows of :func:`evaluation.metrics.case_metrics`, usually with a ``"case"`` key added.
        path: destination ``.csv``.

    Returns:
        The path written.
    """
    if not rows:
        raise ValueError(f"{path}: no metric rows to write")
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    columns = [k for k in _LEADING_COLUMNS if k in keys] + [k for k in keys if k not in _LEADING_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k, "")) for k in columns})
    return write_text_atomic(path, buffer.getvalue())


def format_summary(summary: Mapping[str, Any], nsd_tolerance_mm: float | None = None) -> str:
    """A compact text table of :func:`evaluation.metrics.summarize`'s result.

    Args:
        summary: ``{"per_class": {name: {"dice", "nsd", "hd95"}}, "mean": {...}, "cases": n}``.
        nsd_tolerance_mm: shown in the NSD column header when given (an NSD means little without it).

    Returns:
        Lines ``class  Dice  NSD@tol  HD95 mm``, one per class, then the mean; NaN shown as ``-``.
    """
    try:
        per_class = summary["per_class"]
        mean = summary["mean"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"summary must hold 'per_class' and 'mean', got {summary!r}") from exc
    nsd_header = f"NSD@{nsd_tolerance_mm:g}mm" if nsd_tolerance_mm is not None else "NSD"
    width = max([len("class"), len("mean")] + [len(str(name)) for name in per_class])
    lines = [f"{'class':<{width}}  {'Dice':>6}  {nsd_header:>10}  {'HD95 mm':>8}"]
    for name, scores in [*per_class.items(), ("mean", mean)]:
        if name == "mean":
            lines.append("-" * len(lines[0]))
        lines.append(
            f"{str(name):<{width}}  {_fmt(scores['dice'], 3):>6}  {_fmt(scores['nsd'], 3):>10}  "
            f"{_fmt(scores['hd95'], 1):>8}"
        )
    if "cases" in summary:
        lines.append(f"({summary['cases']} cases)")
    return "\n".join(lines)


def _fmt(value: float, digits: int) -> str:
    return "-" if value is None or math.isnan(float(value)) else f"{float(value):.{digits}f}"


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value
