"""Channel-first LayerNorm for 5-D feature maps (``B x C x X x Y x Z``), as SAM-Med3D uses in its necks."""
from __future__ import annotations

import torch
from torch import nn


class LayerNorm3d(nn.Module):
    """Normalise each voxel's channel vector; parameters ``weight``/``bias`` of shape ``(C,)``.

    Args:
        num_channels: C.
        eps: added to the variance (SAM-Med3D uses 1e-6).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x C x X x Y x Z`` → same shape."""
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]
