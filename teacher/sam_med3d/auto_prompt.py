"""Automatic prompt generator for SAM-Med3D: image embedding → dense prompt embedding, no clicks.

A small 3D conv net on the 8³ embedding grid (one downsampling, one skip) whose output is added to
SAM-Med3D's own "no mask" dense embedding. Its last conv starts at zero, so before training the automatic
teacher decodes exactly as the pretrained model does without a mask prompt; training moves the dense
prompt from there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.InstanceNorm3d(cout, affine=True),
        nn.GELU(),
    )


class AutoPromptNet3D(nn.Module):
    """Dense prompt from image embeddings.

    Args:
        embed_dim: embedding/prompt width C (384).
        hidden: width inside the net.
    """

    def __init__(self, embed_dim: int = 384, hidden: int = 64) -> None:
        super().__init__()
        self.inp = _conv_block(embed_dim, hidden)
        self.down = _conv_block(hidden, 2 * hidden, stride=2)
        self.bottleneck = _conv_block(2 * hidden, 2 * hidden)
        self.up = _conv_block(3 * hidden, hidden)
        self.out = nn.Conv3d(hidden, embed_dim, kernel_size=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """``B x C x X' x Y' x Z'`` → dense prompt residual of the same shape."""
        skip = self.inp(image_embeddings)
        deep = self.bottleneck(self.down(skip))
        deep = F.interpolate(deep, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.out(self.up(torch.cat([skip, deep], dim=1)))
