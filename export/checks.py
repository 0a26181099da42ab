"""The accuracy check a bundle carries for every model it offers, so that a device can choose among them
(``deploy.autoselect``) without data: mean foreground Dice of each model's argmax on the same validation
crops, against their labels (or the PyTorch model's argmax where a crop has none), and the drop from the
PyTorch FP32 student's."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from export.parity import foreground_dice

REFERENCE = "pytorch/fp32"


def accuracy_checks(predictors: Mapping[str, Callable[[np.ndarray], np.ndarray]],
                    items: Sequence[tuple[np.ndarray, np.ndarray | None]] | None, num_classes: int,
                    max_dice_drop: float, not_measured: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Score every model on the validation crops.

    Args:
        predictors: ``"runtime/precision"`` → ``B x C x roi -> B x K x roi`` logits; must include ``REFERENCE``.
        items: ``(C x roi crop, roi label or None)`` validation items; ``None``: nothing to check with.
        num_classes: K.
        max_dice_drop: the export's bound, recorded for the device's choice.
        not_measured: models offered but not scored here, with why (bf16 exported on a CPU without it).

    Returns:
        the manifest's ``checks`` section: ``metric``, ``crops``, ``reference``, ``max_dice_drop``, ``dice``
        and ``drop`` per model, ``not_measured``.
    """
    out: dict[str, Any] = {"reference": REFERENCE, "max_dice_drop": float(max_dice_drop),
                           "not_measured": dict(not_measured or {})}
    if not items:
        out.update(skipped="no validation crops (export without calibration data)", dice={}, drop={})
        return out
    reference = predictors[REFERENCE]
    targets, labelled = [], 0
    for crop, label in items:
        if label is None:
            targets.append(np.asarray(reference(crop[None]))[0].argmax(0))
        else:
            targets.append(np.asarray(label).reshape(crop.shape[1:]))
            labelled += 1
    dice = {}
    for key, predict in predictors.items():
        scores = [foreground_dice(np.asarray(predict(crop[None]))[0].argmax(0), target, num_classes)
                  for (crop, _), target in zip(items, targets)]
        dice[key] = float(np.mean(scores))
    out.update(metric=f"mean foreground Dice of the argmax over {len(items)} validation crops "
                      f"({labelled} against labels, {len(items) - labelled} against the PyTorch FP32 argmax)",
               crops=len(items), dice=dice, drop={k: dice[REFERENCE] - v for k, v in dice.items()})
    return out
