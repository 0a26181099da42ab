"""Random clicks from a label map, for point-prompt training of the teacher.

How a K-class teacher learns from clicks (the prompt selects the object, as in SAM): for every crop one
target class ``c`` is drawn among the foreground classes present in it; positive clicks fall inside class
``c``, negative clicks outside it (background or another organ, where an over-segmenting model would be
corrected), and the training target becomes ``c`` where the label is ``c`` and background everywhere else.
The K-class output therefore answers "the clicked organ, nothing else"; with clicks in the liver the
kidneys are background. The automatic prompt keeps the ordinary multi-class target (every organ), so in
``prompt_mode: both`` the two prompt kinds ask two different, consistent questions of the same decoder. A
crop without foreground keeps an all-background target and gets negative clicks only.

Click counts vary per crop (1..``max_positive`` positives, 0..``max_negative`` negatives) and are padded
with label -1 to the batch's longest list, which the point-prompt encoder ignores.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from teacher.point_prompt import NEGATIVE, PADDING, POSITIVE


class ClickSamplingError(ValueError):
    """Labels or click counts the sampler cannot use; the message names the value."""


@dataclass
class ClickBatch:
    """Clicks for a batch of crops and the targets they ask for.

    Attributes:
        coords: ``B x N x 3`` float voxel coordinates (X, Y, Z order).
        labels: ``B x N`` long: 1 positive, 0 negative, -1 padding.
        target_class: ``B`` long, the clicked class per crop (0 for a crop without foreground).
        target: ``B x 1 x X x Y x Z`` long, the label reduced to the clicked class (others -> 0).
    """

    coords: torch.Tensor
    labels: torch.Tensor
    target_class: torch.Tensor
    target: torch.Tensor


def _pick(mask: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` voxel coordinates (``count x 3``, with replacement) drawn uniformly from a boolean mask."""
    where = mask.nonzero()
    if count == 0 or where.shape[0] == 0:
        return torch.zeros(0, 3, dtype=torch.float32)
    index = torch.randint(where.shape[0], (count,), generator=generator)
    return where[index].float()


def sample_clicks(
    label: torch.Tensor,
    max_positive: int = 3,
    max_negative: int = 2,
    generator: torch.Generator | None = None,
) -> ClickBatch:
    """Draw a target class and clicks for each crop of a batch.

    Args:
        label: ``B x 1 x X x Y x Z`` integer label crops (any device; clicks are drawn on the CPU).
        max_positive: most positive clicks per crop (at least one when the crop has foreground).
        max_negative: most negative clicks per crop.
        generator: torch RNG; None uses the global one (which the training engine restores on resume).

    Returns:
        A :class:`ClickBatch` on ``label``'s device.
    """
    if label.ndim != 5 or label.shape[1] != 1:
        raise ClickSamplingError(f"label must be B x 1 x X x Y x Z, got shape {tuple(label.shape)}")
    if int(max_positive) < 1 or int(max_negative) < 0:
        raise ClickSamplingError(f"need max_positive >= 1 and max_negative >= 0, got {max_positive}, {max_negative}")
    device = label.device
    cpu = label.detach().to("cpu").long()[:, 0]
    per_crop, classes, targets = [], [], []
    for crop in cpu:
        present = [int(c) for c in torch.unique(crop) if int(c) > 0]
        if present:
            target_class = present[int(torch.randint(len(present), (1,), generator=generator))]
            n_pos = 1 + int(torch.randint(int(max_positive), (1,), generator=generator))
        else:
            target_class, n_pos = 0, 0
        n_neg = int(torch.randint(int(max_negative) + 1, (1,), generator=generator))
        inside = crop == target_class if target_class else torch.zeros_like(crop, dtype=torch.bool)
        pos = _pick(inside, n_pos, generator)
        neg = _pick(~inside, n_neg, generator)
        if pos.shape[0] + neg.shape[0] == 0:  # no foreground and no negative drawn: one negative click anyway
            neg = _pick(~inside, 1, generator)
        coords = torch.cat([pos, neg])
        marks = torch.cat([torch.full((pos.shape[0],), POSITIVE), torch.full((neg.shape[0],), NEGATIVE)])
        per_crop.append((coords, marks))
        classes.append(target_class)
        targets.append(torch.where(inside, crop, torch.zeros_like(crop)))
    n = max(c.shape[0] for c, _ in per_crop)
    coords = torch.zeros(len(per_crop), n, 3)
    marks = torch.full((len(per_crop), n), PADDING, dtype=torch.long)
    for i, (c, m) in enumerate(per_crop):
        coords[i, : c.shape[0]] = c
        marks[i, : m.shape[0]] = m
    return ClickBatch(
        coords=coords.to(device),
        labels=marks.to(device),
        target_class=torch.tensor(classes, dtype=torch.long, device=device),
        target=torch.stack(targets)[:, None].to(device),
    )


def sample_correction_clicks(
    pred: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One correction click per crop, where a binary prediction is wrong (SAM-Med3D's iterative training).

    The click is drawn uniformly from the crop's error voxels: positive on a missed target voxel, negative
    on a false-positive voxel. A crop without error gets a padding click (label -1), which prompts nothing.

    Args:
        pred: ``B x 1 x X x Y x Z`` bool, the current prediction.
        target: ``B x 1 x X x Y x Z`` bool (or 0/1), the clicked object.
        generator: torch RNG; None uses the global one (restored on resume).

    Returns:
        ``(coords B x 1 x 3 float, labels B x 1 long)`` on ``pred``'s device.
    """
    if pred.shape != target.shape or pred.ndim != 5 or pred.shape[1] != 1:
        raise ClickSamplingError(f"pred and target must both be B x 1 x X x Y x Z, got {tuple(pred.shape)} and {tuple(target.shape)}")
    pred_cpu, target_cpu = pred.detach().to("cpu").bool()[:, 0], target.detach().to("cpu").bool()[:, 0]
    coords = torch.zeros(pred.shape[0], 1, 3)
    labels = torch.full((pred.shape[0], 1), PADDING, dtype=torch.long)
    for i, (p, t) in enumerate(zip(pred_cpu, target_cpu)):
        error = p ^ t
        if not error.any():
            continue
        coords[i] = _pick(error, 1, generator)
        x, y, z = coords[i, 0].long().tolist()
        labels[i, 0] = POSITIVE if bool(t[x, y, z]) else NEGATIVE
    return coords.to(pred.device), labels.to(pred.device)
