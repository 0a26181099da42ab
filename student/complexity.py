"""Model size and cost: parameter count and FLOPs for one ROI patch."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return int(sum(p.numel() for p in model.parameters()))


def describe(model: nn.Module, roi_size: Sequence[int], in_channels: int | None = None) -> dict:
    """Parameters and forward FLOPs of one ``1 x C x roi`` patch.

    FLOPs are counted by ``torch.utils.flop_counter`` (a multiply-add counts as 2 FLOPs); operations it
    does not count (norms, activations, softmax) are a few percent of a SwinUNETR's cost.

    Args:
        model: a segmentation network.
        roi_size: ``[X, Y, Z]``.
        in_channels: image channels; inferred from the first convolution when ``None``.

    Returns:
        ``{"params": int, "gflops": float}``.
    """
    if in_channels is None:
        first_conv = next((m for m in model.modules() if isinstance(m, (nn.Conv3d, nn.Conv2d))), None)
        in_channels = first_conv.in_channels if first_conv is not None else 1
    x = torch.zeros(1, in_channels, *[int(s) for s in roi_size])
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return {"params": count_params(model), "gflops": counter.get_total_flops() / 1e9}
