"""Feeding the training loop: cases preprocessed once and kept in memory, and an endless stream of crop batches.

The teacher (``teacher/train.py``) and the students (``distill/train.py``) train from the same two pieces.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence


def preload(items: Sequence[Mapping[str, Any]], transforms: Callable) -> list[dict]:
    """Run the deterministic preprocessing (``data.transforms.load_transforms``) once per case and keep the
    results in memory."""
    from data.transforms import make_dataset

    dataset = make_dataset(list(items), transforms, cache="memory")
    return [dataset[i] for i in range(len(dataset))]


def crop_batches(dataset: Any, batch_size: int, num_workers: int = 0,
                 weights: Sequence[float] | None = None, sampler: Any = None) -> Iterator[dict]:
    """Endless stream of collated crop batches, reshuffled each pass.

    The loader is built lazily, inside ``fit``, so its shuffling and MONAI's transform seeds come from the
    global RNG that ``fit`` seeds per rank (``seed + rank``) and restores on resume. With ``weights`` (one per
    case) cases are drawn with replacement in proportion to them instead of once per pass; a given ``sampler``
    (e.g. ``distill.sampling.LabelledShareSampler``) draws the case indices instead of either.
    """
    from monai.data import DataLoader, list_data_collate
    from torch.utils.data import WeightedRandomSampler

    if sampler is not None and weights is not None:
        raise ValueError("crop_batches: give weights or a sampler, not both")
    if sampler is None and weights is not None:
        sampler = WeightedRandomSampler(list(weights), num_samples=len(dataset), replacement=True)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(dataset) >= batch_size,
        num_workers=num_workers,
        collate_fn=list_data_collate,
    )
    while True:
        yield from loader
