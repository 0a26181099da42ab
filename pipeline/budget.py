"""``run.time_budget_minutes``: a wall-time promise kept on slower CPUs by leaving out students after the first.

``make demo`` promises a run of at most 30 minutes on a 2-core CPU, and the CPUs it meets differ by 2x and more
(docs/measurements.md: the same flow took 20 minutes on an AMD EPYC capped to AVX2 and about 40 by estimate on the
slowest AVX2-only EPYC measured). As AutoML tools do under a time limit, the pipeline trains what fits: the first
student of ``student.names`` always trains (the λ search is its), each later one only when the run, projected with it,
stays within the budget. Its step is measured here, on this CPU, before it trains (``probe_seconds_per_step``), and the
report names what was left out and why. ``null`` (the default) trains every student.

The projection, in seconds: ``elapsed · (1 + TAIL_FRACTION) + COST_FACTOR · s_per_step · steps`` (+ a λ = 0 comparison
still to train), where

- ``elapsed`` is this invocation's wall time so far (data, teacher, cache, λ search, the students before);
- ``TAIL_FRACTION`` is what the evaluation, export and benchmark of the students already trained cost against it:
  0.19 in ``make demo ISA=avx2`` on the AMD EPYC of 2026-12-07 (evaluation ~20 + export 35 + benchmark ~67 s after
  648 s), about 0.2 by estimate on the AVX2-only EPYC of 2026-12-02;
- ``COST_FACTOR`` is a student's whole cost against its bare steps: SwinUNETR-small in that run, 0.86 s/step x 300 =
  258 s bare, took 307 s to train, 43 s to export, ~45 s of benchmark rows and ~8 s of evaluation: 1.56x.

In that run the projection with the small student was 19.4 minutes after 10.8 (it trained; the run took 19.8). On
the AVX2-only EPYC, by estimate, it would be ~40.6 minutes with it and ~25.9 without (docs/measurements.md, "Export,
phantoms and benchmark processes cut, and a time budget for the demo").
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Mapping

TAIL_FRACTION = 0.2
COST_FACTOR = 1.5


@dataclass
class BudgetDecision:
    """Whether a student fits the time budget, and the figures that decided it."""

    name: str
    train: bool
    budget_minutes: float
    elapsed_minutes: float
    seconds_per_step: float
    steps: int
    projected_minutes: float  # the whole run with this student
    without_minutes: float  # the whole run without it

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def sentence(self) -> str:
        verdict = "trains" if self.train else "left out"
        return (f"{self.name} {verdict}: the run projected at {self.projected_minutes:.1f} min with it "
                f"({self.seconds_per_step:.2f} s/step measured here x {self.steps} steps, after "
                f"{self.elapsed_minutes:.1f} min), {self.without_minutes:.1f} without; budget "
                f"{self.budget_minutes:g} min (run.time_budget_minutes)")


def project(budget_minutes: float, elapsed_s: float, name: str, seconds_per_step: float, steps: int,
            pending_s: float = 0.0) -> BudgetDecision:
    """The decision for one student from measured figures.

    Args:
        budget_minutes: ``run.time_budget_minutes``.
        elapsed_s: wall seconds of this invocation so far.
        name: the student.
        seconds_per_step: its measured training step on this CPU.
        steps: its step budget.
        pending_s: training still due whatever is decided (a λ = 0 comparison that does not continue a trial).
    """
    without = elapsed_s * (1.0 + TAIL_FRACTION) + pending_s
    projected = without + COST_FACTOR * seconds_per_step * steps
    return BudgetDecision(name=name, train=projected <= 60.0 * budget_minutes, budget_minutes=float(budget_minutes),
                          elapsed_minutes=elapsed_s / 60.0, seconds_per_step=float(seconds_per_step), steps=int(steps),
                          projected_minutes=projected / 60.0, without_minutes=without / 60.0)


def probe_seconds_per_step(cfg: Mapping[str, Any], name: str, num_classes: int, steps: int = 3,
                           warmup: int = 1) -> float:
    """Median seconds of ``steps`` training steps of student ``name`` as the run trains it (ROI, batch, attention
    window, slab convolutions, channels-last; random data), after ``warmup`` untimed ones."""
    from benchmarks.train_step import measure_setting

    dcfg, arch = cfg["distill"], cfg["student"].get("arch") or {}
    setting = {"name": "run", "window_size": int(arch.get("window_size") or 7), "batch": int(dcfg["batch_size"]),
               "compile": False, "channels_last": bool(dcfg.get("channels_last")), "bf16": False,
               "fused_attention": False, "slab_conv": bool(dcfg.get("slab_conv"))}
    stepper = measure_setting(name, [int(s) for s in cfg["student"]["roi_size"]], setting, num_classes=num_classes)
    for _ in range(warmup):
        stepper["step"]()
    return float(statistics.median(stepper["step"]() for _ in range(steps)))

