"""Which case each student crop comes from: the share of crops drawn from labelled cases, constant or moving over
the run (``distill.labelled_fraction`` → ``distill.labelled_fraction_end``).

Under the demo's decaying λ (``distill.lambda_schedule: linear``) a crop of an unlabelled case carries only
``λ(step)·MSE``, which tends to 0 at the end of the run: a constant half of the crops from unlabelled cases means
that half of the last steps train on almost nothing. A share that rises as λ falls (0.5 → 1.0 over the run) spends
those steps on the labelled cases instead, while the early steps, where λ is high, still see the unlabelled ones.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class SamplingError(ValueError):
    """A labelled share that cannot be drawn; the message names the value."""


def check_share(name: str, value: float, allow_one: bool) -> float:
    f = float(value)
    ok = 0.0 < f <= 1.0 if allow_one else 0.0 < f < 1.0
    if not ok:
        raise SamplingError(f"distill.{name} must lie in (0, {'1]' if allow_one else '1)'}, got {value!r}")
    return f


class LabelledShareSampler(Sampler[int]):
    """An endless stream of case indices; labelled cases come first (indices ``0 .. labelled - 1``).

    Each draw picks a labelled case with probability ``share(step)`` (linear from ``start`` at step 0 to ``end`` at
    ``steps``), then a case uniformly within its group. ``step`` is set by the training loop's ``on_step`` before each
    batch is drawn, so a resumed run draws with the share of the step it resumes at. The draws use torch's global
    RNG, which ``training.loop.fit`` seeds; on resume they restart like the crops themselves (MONAI's DataLoader
    reseeds the global generator to its initial seed when the loader is rebuilt), so a resumed run is alike to an
    uninterrupted one, not identical. With ``num_workers > 0`` the workers prefetch, so a batch may be drawn with
    the share of a few steps earlier.

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
        self.step = 0

    def share(self, step: int) -> float:
        t = min(max(step / self.steps, 0.0), 1.0)
        return self.start + (self.end - self.start) * t

    def __iter__(self) -> Iterator[int]:
        while True:
            if float(torch.rand(())) < self.share(self.step):
                yield int(torch.randint(self.labelled, ()))
            else:
                yield self.labelled + int(torch.randint(self.unlabelled, ()))

    def __len__(self) -> int:  # one pass's worth of draws; the stream itself never ends
        return self.labelled + self.unlabelled
