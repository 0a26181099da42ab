"""Necks: project encoder tokens tapped after four blocks to the 256-channel feature maps the decoder reads."""
from __future__ import annotations

import torch
from torch import nn


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of a ``B x C x X x Y x Z`` map (SAM's LayerNorm2d, in 3D).

    Args:
        num_channels: C.
        eps: variance floor.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``B x C x X x Y x Z``. Returns the same shape."""
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]


class Neck3d(nn.Sequential):
    """1^3 conv C -> out, LayerNorm3d, 3^3 conv, LayerNorm3d (3DSAM-adapter ``neck_3d``, SAM's neck in 3D).

    Args:
        in_dim: encoder width C.
        out_dim: feature channels (256).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.Conv3d(in_dim, out_dim, kernel_size=1, bias=False),
            LayerNorm3d(out_dim),
            nn.Conv3d(out_dim, out_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_dim),
        )
