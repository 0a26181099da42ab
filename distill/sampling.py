"""Which case each student crop comes from: the share of crops drawn from labelled cases, constant or moving over
the run (``distill.labelled_fraction`` → ``distill.labelled_fraction_end``).

Under the demo's decaying λ (``distill.lambda_schedule: linear``) a crop of an unlabelled case carries only
``λ(step)·MSE``, which tends to 0 at the end of the run: a constant half of the crops from unlabelled cases means
that half of the last steps train on almost nothing. A share that rises as λ falls (0.5 → 1.0 over the run) spends
those steps on the labelled cases instead, while the early steps, where λ is high, still see the unlabelled ones.
"""
from __future__ import annotations

import torch


class SamplingError(ValueError):
    """A labelled share that cannot be drawn; the message names the value."""


def check_share(name: str, value: float, allow_one: bool) -> float:
    f = float(value)
    ok = 0.0 < f <= 1.0 if allow_one else 0.0 < f < 1.0
    if not ok:
        raise SamplingError(f"distill.{name} must lie in (0, {'1]' if allow_one else '1)'}, got {value!r}")
    return f


class LabelledShareSampler:
    """Which cases a batch holds; labelled cases come first (indices ``0 .. labelled - 1``).

    Each draw picks a labelled case with probability ``share(step)`` (linear from ``start`` at step 0 to ``end`` at
    ``steps``), then a case uniformly within its group. ``training.batches.CropBatches`` calls ``draw`` with the
    batch's step and a generator seeded for that step, so a resumed run draws what an uninterrupted one draws, and a
    loader worker computing a batch ahead draws it with its own step's share.

    Args:
        labelled: number of labelled cases (>= 1).
        unlabelled: number of unlabelled cases (>= 1).
        start: labelled share at step 0, in (0, 1).
        end: labelled share at the last step, in (0, 1].
        steps: the run's steps.
    """

    def __init__(self, labelled: int, unlabelled: int, start: float, end: float, steps: int) -> None:
        if labelled < 1 or unlabelled < 1:
            raise SamplingError(f"a moving labelled share needs labelled and unlabelled cases, got {labelled} + {unlabelled}")
        self.labelled, self.unlabelled = int(labelled), int(unlabelled)
        self.start = check_share("labelled_fraction", start, allow_one=False)
        self.end = check_share("labelled_fraction_end", end, allow_one=True)
        self.steps = max(int(steps), 1)

    def share(self, step: int) -> float:
        t = min(max(step / self.steps, 0.0), 1.0)
        return self.start + (self.end - self.start) * t

    def draw(self, generator: torch.Generator, step: int, count: int) -> list[int]:
        """``count`` case indices for batch ``step``, drawn with ``generator``."""
        share = self.share(step)
        out = []
        for _ in range(count):
            if float(torch.rand((), generator=generator)) < share:
                out.append(int(torch.randint(self.labelled, (), generator=generator)))
            else:
                out.append(self.labelled + int(torch.randint(self.unlabelled, (), generator=generator)))
        return out
