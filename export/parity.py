"""How closely an exported model reproduces the PyTorch student on the same crops."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def logit_parity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Compare ``B x K x roi`` logits.

    Returns:
        ``{"max_abs_diff", "mean_abs_diff", "argmax_agreement"}`` (agreement: fraction of voxels whose
        predicted class is the same).
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"logit shapes differ: {reference.shape} vs {candidate.shape}")
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    agree = (reference.argmax(1) == candidate.argmax(1)).mean()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "argmax_agreement": float(agree)}


def foreground_dice(pred: np.ndarray, target: np.ndarray, num_classes: int) -> float:
    """Mean Dice over foreground classes present in ``pred`` or ``target`` (1.0 when both are empty)."""
    scores = []
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        denom = p.sum() + t.sum()
        if denom:
            scores.append(2.0 * np.logical_and(p, t).sum() / denom)
    return float(np.mean(scores)) if scores else 1.0


def batched(predict: Callable[[np.ndarray], np.ndarray], crops: Sequence[np.ndarray], batch: int = 1) -> np.ndarray:
    """Apply ``predict`` (``B x C x roi -> B x K x roi``) over ``N`` crops ``C x roi``; returns ``N x K x roi``."""
    outs = [np.asarray(predict(np.stack(crops[i : i + batch]).astype(np.float32))) for i in range(0, len(crops), batch)]
    return np.concatenate(outs)
