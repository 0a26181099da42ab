"""The benchmark report: CSV (one row per measurement), Markdown table, plots, machine info, MLflow.

The reader's question is "which model, on which runtime and precision, is fast enough here, and what
does it cost in Dice?"; the Markdown table answers it per workload, the Dice-vs-latency scatter shows the
Pareto front (nothing both faster and more accurate exists off it).
"""
from __future__ import annotations

import csv
import io
import math
import platform
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from data.atomic import atomic_path, write_json_atomic, write_text_atomic
from evaluation.pareto import pareto_front

# The columns a user reads, in order; the extra ones after them qualify the numbers.
CSV_COLUMNS = (
    "model",
    "runtime",
    "precision",
    "threads",
    "workload",
    "p50_ms",
    "p95_ms",
    "throughput",
    "peak_rss_mb",
    "size_mb",
    "gflops",
    "pct_of_peak",
    "speedup_vs_eager",
    "dice",
)
EXTRA_COLUMNS = ("nsd", "throughput_unit", "base_rss_mb", "runs", "input_shape", "note")
ALL_COLUMNS = CSV_COLUMNS + EXTRA_COLUMNS


class ReportError(ValueError):
    """Rows that cannot be reported (a missing column, an unknown workload)."""


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, the instruction sets the kernels may use (fewer under an ``ONEDNN_MAX_CPU_ISA``
    cap, which ``isa_cap`` names), and library versions."""
    from deploy.machine import cpu_info
    from export.bundle import library_versions  # the same versions a bundle records

    cpu = cpu_info()
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        mem_gb = round(psutil.virtual_memory().total / 1024**3, 1)
    except ImportError:  # pragma: no cover - psutil is a dependency
        physical, mem_gb = None, None
    return {
        "cpu_model": cpu["model"],
        "logical_cores": cpu["logical_cpus"],
        "physical_cores": physical,
        "usable_cores": cpu["usable_cpus"],
        "memory_gb": mem_gb,
        "cpu_features": sorted(f for f in cpu["flags"] if f in {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
                                                                 "amx_bf16", "amx_int8", "avx_vnni"}),
        "isa_cap": cpu["isa_cap"],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": library_versions(),
    }


def write_csv(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows with every column of ``ALL_COLUMNS`` (missing values empty), atomically.

    Args:
        rows: measurement rows; each must have at least the identifying columns.
        path: destination ``.csv``.
    """
    rows = list(rows)
    for row in rows:
        missing = [c for c in ("model", "runtime", "precision", "threads", "workload") if c not in row]
        if missing:
            raise ReportError(f"{path}: row {row} lacks columns {missing}")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(ALL_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _csv_value(row.get(c)) for c in ALL_COLUMNS})
    return write_text_atomic(path, buf.getvalue())


def read_csv(path: str | Path) -> list[dict]:
    """Read a benchmark CSV back (numbers as floats/ints, empty cells as None)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    numeric = {"threads", "runs"}
    out = []
    for row in rows:
        parsed: dict[str, Any] = {}
        for k, v in row.items():
            if v in ("", None):
                parsed[k] = None
            elif k in numeric:
                parsed[k] = int(float(v))
            else:
                try:
                    parsed[k] = float(v) if k not in ("model", "runtime", "precision", "workload", "throughput_unit", "input_shape", "note") else v
                except ValueError:
                    parsed[k] = v
        out.append(parsed)
    return out


def write_markdown(
    rows: Sequence[dict],
    path: str | Path,
    machine: dict,
    peaks: Sequence[dict],
    workloads: dict[str, str],
    cross_checks: Sequence[dict] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Write ``report.md``: machine, GEMM peaks, one table per workload, benchmark_app cross-check, notes.

    Args:
        rows: measurement rows (``CSV_COLUMNS`` keys).
        path: destination.
        machine: ``machine_info()``.
        peaks: measured GEMM peaks (``GemmPeak.as_dict()``).
        workloads: workload name → what it is (size, spacing, ROI).
        cross_checks: OpenVINO ``benchmark_app`` figures beside the harness's own.
        notes: extra lines (what Dice means here, what was skipped and why).
    """
    lines = ["# Benchmark report", ""]
    lines += [
        f"- CPU: {machine.get('cpu_model')} ({machine.get('usable_cores')} usable of "
        f"{machine.get('logical_cores')} logical cores; features {', '.join(machine.get('cpu_features', [])) or 'none'}"
        + (f"; capped to {machine['isa_cap']} by ONEDNN_MAX_CPU_ISA" if machine.get("isa_cap") else "") + ")",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items()),
        "- Peak memory is the peak RSS of a fresh process (interpreter and runtime libraries included; `base_rss_mb` "
        "in the CSV is the same process before the model was loaded). The patch and volume rows of one model × "
        "runtime × precision share that process, the patch first: the patch row's peak is its own, the volume "
        "row's at least the patch's.",
        "- `speedup_vs_eager` = p50 of the PyTorch-eager FP32 row of the same model, threads and workload "
        "divided by this row's p50; `pct_of_peak` = achieved GFLOP/s ÷ the GEMM peak of the row's "
        "precision (INT8 rows: the FP32 peak) at the same thread count.",
        "",
        "## Measured GEMM peak (torch.matmul, this run)",
        "",
        "| precision | threads | n | peak GFLOP/s | median GFLOP/s |",
        "|---|---|---|---|---|",
    ]
    for p in peaks:
        lines.append(f"| {p['precision']} | {p['threads']} | {p['size']} | {p['gflops']:.1f} | {p['median_gflops']:.1f} |")
    for workload, description in workloads.items():
        sel = [r for r in rows if r.get("workload") == workload]
        if not sel:
            continue
        lines += ["", f"## Workload `{workload}`: {description}", ""]
        header = ["model", "runtime", "precision", "threads", "p50 ms", "p95 ms", "throughput",
                  "peak RSS MB", "size MB", "GFLOPs", "% of peak", "× eager", "Dice", "NSD"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for r in sel:
            thr = _fmt(r.get("throughput"), 2)
            if thr != "—" and r.get("throughput_unit"):
                thr += f" {r['throughput_unit']}"
            cells = [
                str(r["model"]), str(r["runtime"]), str(r["precision"]), str(r["threads"]),
                _fmt(r.get("p50_ms"), 1), _fmt(r.get("p95_ms"), 1), thr, _fmt(r.get("peak_rss_mb"), 0),
                _fmt(r.get("size_mb"), 2), _fmt(r.get("gflops"), 2), _fmt(r.get("pct_of_peak"), 1),
                _fmt(r.get("speedup_vs_eager"), 2), _fmt(r.get("dice"), 3), _fmt(r.get("nsd"), 3),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if cross_checks:
        lines += ["", "## Cross-check with OpenVINO benchmark_app", "",
                  "| model | precision | threads | harness p50 ms | benchmark_app median ms | benchmark_app throughput FPS | command |",
                  "|---|---|---|---|---|---|---|"]
        for c in cross_checks:
            lines.append(
                f"| {c['model']} | {c['precision']} | {c['threads']} | {_fmt(c.get('harness_p50_ms'), 1)} | "
                f"{_fmt(c.get('median_ms'), 1)} | {_fmt(c.get('throughput_fps'), 2)} | `{c.get('command', '')}` |"
            )
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return write_text_atomic(path, "\n".join(lines) + "\n")


def plot_latency(rows: Sequence[dict], path: str | Path, workload: str) -> Path:
    """Horizontal bar per row of one workload: p50 latency, whisker to p95.

    Args:
        rows: measurement rows.
        path: destination PNG.
        workload: which workload's rows to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r.get("workload") == workload and _finite(r.get("p50_ms"))]
    if not sel:
        raise ReportError(f"{path}: no rows with a latency for workload {workload!r}")
    labels = [_row_label(r) for r in sel]
    p50 = [float(r["p50_ms"]) for r in sel]
    p95 = [float(r["p95_ms"]) for r in sel]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(sel) + 1.5))
    ax.barh(range(len(sel)), p50, xerr=[[0] * len(sel), [b - a for a, b in zip(p50, p95)]], color="#4C72B0", capsize=3)
    ax.set_yticks(range(len(sel)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("latency ms (bar p50, whisker p95)")
    ax.set_title(f"workload: {workload}")
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_dice_vs_latency(rows: Sequence[dict], path: str | Path, workload: str) -> Path:
    """Scatter of Dice against p50 latency for one workload, Pareto front drawn as a step line.

    Rows without a Dice (no labelled held-out cases) are listed in the title instead of plotted.

    Args:
        rows: measurement rows.
        path: destination PNG.
        workload: which workload's rows to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r.get("workload") == workload]
    pts = [(r.get("p50_ms"), r.get("dice")) for r in sel]
    fig, ax = plt.subplots(figsize=(7, 5))
    plotted = [(i, r) for i, r in enumerate(sel) if _finite(pts[i][0]) and _finite(pts[i][1])]
    for i, r in plotted:
        ax.scatter(float(r["p50_ms"]), float(r["dice"]), color="#4C72B0")
        ax.annotate(_row_label(r), (float(r["p50_ms"]), float(r["dice"])), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_front(pts)
    if front:
        ax.step([float(pts[i][0]) for i in front], [float(pts[i][1]) for i in front], where="post", color="#C44E52", label="Pareto front")
        ax.legend()
    missing = len(sel) - len(plotted)
    title = f"Dice vs latency ({workload})"
    if missing:
        title += f"\n{missing} row(s) without Dice not shown (no labelled held-out cases)"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("p50 latency ms")
    ax.set_ylabel("mean foreground Dice")
    fig.tight_layout()
    return _save_figure(fig, path)


def log_to_mlflow(out_dir: str | Path, rows: Sequence[dict]) -> bool:
    """Log the report folder and per-row p50/Dice metrics to the active MLflow run, if there is one.

    Args:
        out_dir: folder with the report files (logged under ``benchmarks/``).
        rows: measurement rows.

    Returns:
        whether anything was logged (False when no run is active).
    """
    import mlflow

    if mlflow.active_run() is None:
        return False
    metrics = {}
    for r in rows:
        key = re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", f"bench/{r['model']}/{r['runtime']}/{r['precision']}/t{r['threads']}/{r['workload']}")
        for col in ("p50_ms", "p95_ms", "peak_rss_mb", "speedup_vs_eager", "dice", "nsd"):
            if _finite(r.get(col)):
                metrics[f"{key}/{col}"] = float(r[col])
    if metrics:
        mlflow.log_metrics(metrics)
    mlflow.log_artifacts(str(out_dir), artifact_path="benchmarks")
    return True


def write_machine_json(path: str | Path, machine: dict, peaks: Sequence[dict], extra: dict | None = None) -> Path:
    """``machine.json``: machine info and the peaks measured in this run."""
    return write_json_atomic(path, {**machine, "gemm_peaks": list(peaks), **(extra or {})})


def _save_figure(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return Path(path)


def _row_label(r: dict) -> str:
    return f"{r['model']} {r['runtime']} {r['precision']} t{r['threads']}"


def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _fmt(x: Any, digits: int) -> str:
    return f"{float(x):.{digits}f}" if _finite(x) else "—"


def _csv_value(x: Any) -> Any:
    if x is None:
        return ""
    if isinstance(x, float):
        return "" if math.isnan(x) else repr(round(x, 6))
    return x
