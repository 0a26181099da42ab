"""Validation during training: mean foreground Dice of whole-volume sliding-window predictions.

Teacher training and student distillation validate with this one function, so their numbers compare.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch


def validation_dice(model: Callable, cases: Sequence[Mapping[str, Any]], roi_size: Sequence[int], num_classes: int,
                    overlap: float, device: torch.device, clean_classes: Sequence[int] = ()) -> dict[str, float]:
    """Mean foreground Dice of whole-volume sliding-window predictions on preprocessed cases.

    Classes absent from a case's reference are left out of that case's mean (NaN), as in evaluation/.

    Args:
        model: segmentation network.
        cases: dicts with ``"image"`` ``1 x X x Y x Z`` and ``"label"`` ``1 x X x Y x Z``.
        roi_size: sliding-window ROI.
        num_classes: K.
        overlap: sliding-window overlap.
        device: where the model runs.
        clean_classes: classes of which only the largest connected piece is kept before scoring (a student's
            ``postprocess``, deploy/postprocess.py); none by default.

    Returns:
        ``{"dice": mean over cases, "dice_<class id>": per class}``.
    """
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    from deploy.postprocess import keep_largest_component
    from evaluation.sliding_window import predict_logits

    per_case = []
    for case in cases:
        logits = predict_logits(model, as_plain_tensor(case["image"]), roi_size, num_classes, overlap=overlap, device=device)
        if clean_classes:
            logits = keep_largest_component(torch.as_tensor(logits).cpu().numpy(), clean_classes)
        pred = torch.as_tensor(logits).argmax(0, keepdim=True)[None].cpu()
        ref = as_plain_tensor(case["label"]).long()[None].cpu()
        dice = compute_dice(one_hot(pred, num_classes), one_hot(ref, num_classes), include_background=False, ignore_empty=True)
        per_case.append(dice[0].numpy())
    per_class = np.nanmean(np.stack(per_case), axis=0) if per_case else np.full(num_classes - 1, np.nan)
    out = {"dice": float(np.nanmean(per_class))}
    out.update({f"dice_{c + 1}": float(v) for c, v in enumerate(per_class)})
    return out


def as_plain_tensor(x: Any) -> torch.Tensor:
    """A plain tensor: MONAI's MetaTensor would route every op of the network through its metadata hooks."""
    x = torch.as_tensor(x)
    return x.as_tensor() if hasattr(x, "as_tensor") else x
