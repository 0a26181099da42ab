"""Feeding the training loop: cases preprocessed once and kept in memory, and an endless stream of crop batches.

The teacher (``teacher/train.py``) and the students (``distill/train.py``) train from the same two pieces.

Batch ``k`` of a run is a function of the run's seed and ``k`` alone (:class:`CropBatches`): which cases it holds
and every random transform applied to them are drawn from generators seeded with ``(seed, k)``, never from the
global RNG. So a run resumed at step ``k`` draws exactly the batches an uninterrupted run draws from step ``k`` on,
whatever the number of loader workers, and the training step's own random draws (dropout, click sampling) keep the
global stream that ``training.loop.fit`` checkpoints and restores.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch


class CaseDraw(Protocol):
    """Which cases batch ``step`` holds: ``count`` indices drawn with ``generator`` (seeded for that step)."""

    def draw(self, generator: torch.Generator, step: int, count: int) -> list[int]: ...


def preload(items: Sequence[Mapping[str, Any]], transforms: Callable) -> list[dict]:
    """Run the deterministic preprocessing (``data.transforms.load_transforms``) once per case and keep the
    results in memory."""
    from data.transforms import make_dataset

    dataset = make_dataset(list(items), transforms, cache="memory")
    return [dataset[i] for i in range(len(dataset))]


def step_seed(seed: int, *path: int) -> int:
    """A 32-bit seed for ``(seed, *path)`` (e.g. a step and a case slot), independent for every distinct path."""
    return int(np.random.SeedSequence([int(seed) % 2**63, *(int(p) for p in path)]).generate_state(1, np.uint32)[0])


class _Shuffled:
    """Every case once per pass, in a fresh order each pass (the pass's order seeded by ``(seed, pass)``); the
    cases left over at the end of a pass (fewer than a batch) are skipped, as ``drop_last`` would."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self.per_pass = max(n // batch_size, 1)
        self._orders: dict[int, list[int]] = {}

    def draw(self, generator: torch.Generator, step: int, count: int) -> list[int]:
        epoch, slot = divmod(step, self.per_pass)
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                step_seed(self.seed, epoch, 1))).tolist()}
        order = self._orders[epoch]
        return [order[(slot * count + i) % self.n] for i in range(count)]


class _Weighted:
    """Cases drawn with replacement in proportion to ``weights``."""

    def __init__(self, weights: Sequence[float]) -> None:
        self.weights = torch.as_tensor([float(w) for w in weights], dtype=torch.float64)

    def draw(self, generator: torch.Generator, step: int, count: int) -> list[int]:
        return torch.multinomial(self.weights, count, replacement=True, generator=generator).tolist()


class CropBatches(torch.utils.data.Dataset):
    """Batch ``k`` of a run, drawn from ``(seed, k)`` alone: a map-style dataset whose items are steps.

    ``start(seed, step)`` returns the endless stream from batch ``step`` on (``training.loop.fit`` calls it with the
    run's per-rank seed and the step it starts or resumes at). Each batch holds ``batch_size`` cases chosen by
    ``sampler.draw`` (a ``CaseDraw``; by default every case once per pass, shuffled; ``weights``: with replacement in
    proportion to them), each case's random transforms seeded by ``(seed, k, slot)``, collated by MONAI's
    ``list_data_collate`` (a case giving several crops adds them all).

    Args:
        dataset: a MONAI dataset whose ``transform`` holds the random part (a ``Randomizable`` chain).
        batch_size: cases per batch.
        num_workers: loader processes computing batches ahead (0: in this process).
        weights: one per case, to draw with replacement in proportion to them.
        sampler: draws the case indices instead (e.g. ``distill.sampling.LabelledShareSampler``).
    """

    def __init__(self, dataset: Any, batch_size: int, num_workers: int = 0,
                 weights: Sequence[float] | None = None, sampler: CaseDraw | None = None) -> None:
        if sampler is not None and weights is not None:
            raise ValueError("crop_batches: give weights or a sampler, not both")
        if len(dataset) == 0:
            raise ValueError("crop_batches: the dataset holds no case")
        if int(batch_size) < 1:
            raise ValueError(f"crop_batches: batch_size must be >= 1, got {batch_size!r}")
        self.dataset, self.batch_size, self.num_workers = dataset, int(batch_size), int(num_workers)
        self.weights, self.sampler = weights, sampler
        self.seed = 0
        self._draw: CaseDraw | None = None

    def _drawer(self) -> CaseDraw:
        if self._draw is None:
            if self.sampler is not None:
                self._draw = self.sampler
            elif self.weights is not None:
                self._draw = _Weighted(self.weights)
            else:
                self._draw = _Shuffled(len(self.dataset), self.batch_size, self.seed)
        return self._draw

    def __len__(self) -> int:  # the stream is endless; a DataLoader over steps never asks for more than it is given
        return 2**62

    def __getitem__(self, step: int) -> Any:
        from monai.data import list_data_collate
        from monai.data.utils import set_rnd

        generator = torch.Generator().manual_seed(step_seed(self.seed, step, 0))
        indices = self._drawer().draw(generator, int(step), self.batch_size)
        transform = getattr(self.dataset, "transform", None)
        items = []
        for slot, index in enumerate(indices):
            if transform is not None:
                set_rnd(transform, step_seed(self.seed, step, 2, slot))
            items.append(self.dataset[index])
        return list_data_collate(items)

    def start(self, seed: int, step: int = 0) -> Iterator[Any]:
        """The batches from ``step`` on, for a run seeded ``seed``."""
        self.seed, self._draw = int(seed), None
        if self.num_workers == 0:
            return (self[k] for k in itertools.count(int(step)))
        loader = torch.utils.data.DataLoader(
            self, batch_size=None, sampler=range(int(step), 2**62), num_workers=self.num_workers,
            collate_fn=_as_is,
            generator=torch.Generator().manual_seed(int(seed)))  # its base seed must not move the global RNG
        return iter(loader)

    def __iter__(self) -> Iterator[Any]:
        return self.start(self.seed, 0)


def _as_is(batch: Any) -> Any:
    return batch


def crop_batches(dataset: Any, batch_size: int, num_workers: int = 0,
                 weights: Sequence[float] | None = None, sampler: CaseDraw | None = None) -> CropBatches:
    """Endless batches of ``dataset``'s crops, batch ``k`` drawn from the run's seed and ``k`` alone
    (:class:`CropBatches`; ``training.loop.fit`` starts the stream at the step it starts or resumes at).

    Args:
        dataset: a MONAI dataset with the random crop transforms.
        batch_size: cases per batch.
        num_workers: loader processes.
        weights: one per case: draw with replacement in proportion to them.
        sampler: draws each batch's case indices instead of either (``distill.sampling.LabelledShareSampler``).
    """
    return CropBatches(dataset, batch_size, num_workers, weights, sampler)
