"""Which rows a benchmark measures: every (model, runtime, precision, threads, workload) that exists, and why the
others are left out."""
from __future__ import annotations

from typing import Sequence

from benchmarks.models import ModelEntry
from benchmarks.runtimes import PRECISIONS, RUNTIMES, available


def plan_rows(entries: Sequence[ModelEntry], threads: Sequence[int], workloads: Sequence[str], bf16_native: bool,
              runtimes: Sequence[str] = RUNTIMES, precisions: Sequence[str] = PRECISIONS) -> list[dict]:
    """Every measurable (model, runtime, precision, threads, workload), in report order.

    Rows that cannot run (no file for that runtime, no native bf16, no bundle for a deployed volume) are
    left out here; ``skipped_rows`` says which and why.

    Args:
        entries: models.
        threads: thread counts.
        workloads: subset of ``WORKLOADS``.
        bf16_native: the CPU has native bf16.
        runtimes, precisions: subsets of ``RUNTIMES`` and ``PRECISIONS`` to measure.
    """
    rows = []
    for entry in entries:
        d = entry.as_dict()
        for workload in workloads:
            for runtime in (r for r in RUNTIMES if r in runtimes):
                for precision in (p for p in PRECISIONS if p in precisions):
                    if not available(d, runtime, precision, bf16_native):
                        continue
                    if workload in ("volume", "ct") and runtime != "pytorch" and not entry.bundle:
                        continue
                    for t in threads:
                        rows.append({"model": entry.name, "runtime": runtime, "precision": precision, "threads": int(t), "workload": workload})
    return rows


def skipped_rows(entries: Sequence[ModelEntry], bf16_native: bool) -> list[str]:
    """Human-readable reasons for the model × runtime × precision combinations not measured."""
    out = []
    for entry in entries:
        d = entry.as_dict()
        for runtime in RUNTIMES:
            for precision in PRECISIONS:
                if available(d, runtime, precision, bf16_native):
                    continue
                if precision == "bf16" and not bf16_native:
                    why = "the CPU has no native bf16"
                elif runtime == "pytorch" and precision == "int8":
                    continue  # eager INT8 is not a deployment path; not worth a line per model
                elif runtime == "pytorch":
                    why = "no eager model"
                elif runtime == "onnxruntime" and precision == "bf16":
                    continue  # ORT's CPU provider has no bf16 path
                else:
                    why = f"export wrote no {precision} model for {runtime}"
                out.append(f"{entry.name} {runtime} {precision}: {why}")
    return out


def process_groups(plans: Sequence[dict]) -> list[list[int]]:
    """Indices of ``plans`` measured in one process each: the patch and volume rows of one model × runtime ×
    precision × threads share a process, the patch first; a CT row has a process of its own.

    A fresh process per row cost the demo's benchmark 5-7 s of interpreter start and imports per PyTorch row (MONAI
    imports every one of its modules); sharing halves that. The patch row's peak RSS is still its own (measured
    before the volume's model is loaded); the volume row's is the process's, at least the patch's.
    """
    groups: dict[tuple, list[int]] = {}
    for i, plan in enumerate(plans):
        key = (plan["model"], plan["runtime"], plan["precision"], plan["threads"])
        key = key + ((i,) if plan["workload"] not in ("patch", "volume") else ())
        groups.setdefault(key, []).append(i)
    order = {"patch": 0, "volume": 1}
    return [sorted(g, key=lambda i: order.get(plans[i]["workload"], 2)) for g in groups.values()]
