"""Channels-last for 3D models on a CPU: ``torch.channels_last_3d`` for a model's 5-D tensors only.

``Module.to(memory_format=torch.channels_last_3d)`` refuses a model that also holds 4-D tensors (the teacher's
2-D SAM parts: patch embedding, rel-pos tables), so ``training.loop.fit`` and ``benchmarks.train_step`` convert
with this instead.
"""
from __future__ import annotations

import torch
from torch import nn


def to_channels_last_3d(model: nn.Module) -> nn.Module:
    """Put the 5-D parameters and buffers of ``model`` in ``torch.channels_last_3d``, in place (the parameter
    objects are kept, so an optimizer built before or after sees the same ones); returns ``model``."""
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.dim() == 5:
                param.data = param.data.to(memory_format=torch.channels_last_3d)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.dim() == 5:
                setattr(module, name, buffer.to(memory_format=torch.channels_last_3d))
    return model
