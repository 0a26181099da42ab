"""AutoProSAM's automatic prompt generator: a small 3D U-Net from the deepest feature to a dense prompt.

The dense prompt has the feature's shape and is added to it, as SAM adds a dense prompt embedding to its
image embedding. (AutoProSAM's code feeds the shallowest feature by mistake; we feed the deepest.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def apg_levels_for_grid(grid: tuple[int, int, int] | list[int], max_levels: int = 4) -> int:
    """Downsamplings that keep at least 2 tokens per axis at the bottom (4 for a 32^3 grid, 2 for 16x16x12)."""
    levels = 0
    while levels < max_levels and all(g % 2 ** (levels + 1) == 0 and g // 2 ** (levels + 1) >= 2 for g in grid):
        levels += 1
    return levels


class ConvNormAct3d(nn.Sequential):
    """3^3 conv (optionally strided), InstanceNorm, ReLU (the U-Net's ``SingleConv``)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv3d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.InstanceNorm3d(out_ch, affine=True),
            nn.ReLU(inplace=True),
        )


class AutoPromptGenerator(nn.Module):
    """3D U-Net, ``channels -> base -> ... -> base * 2^levels -> ... -> base -> channels``.

    Args:
        channels: feature channels in and out (256).
        base: channels at full resolution (16).
        levels: number of stride-2 downsamplings (4 for a 32^3 grid; see :func:`apg_levels_for_grid`).
    """

    def __init__(self, channels: int, base: int = 16, levels: int = 4) -> None:
        super().__init__()
        self.levels = levels
        widths = [base * 2**i for i in range(levels + 1)]
        self.inc = ConvNormAct3d(channels, base)
        self.downs = nn.ModuleList(
            nn.Sequential(ConvNormAct3d(widths[i], widths[i + 1], stride=2), ConvNormAct3d(widths[i + 1], widths[i + 1]))
            for i in range(levels)
        )
        self.ups = nn.ModuleList(ConvNormAct3d(widths[i + 1] + widths[i], widths[i]) for i in range(levels))
        self.out = nn.Conv3d(base, channels, kernel_size=1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """Dense prompt for a feature map.

        Args:
            feature: ``B x C x gx x gy x gz`` (any grid: padded internally to a multiple of ``2^levels``).

        Returns:
            dense prompt ``B x C x gx x gy x gz``.
        """
        grid = feature.shape[2:]
        unit = 2**self.levels
        # At least two tokens per axis at the bottom, or InstanceNorm has nothing to normalise in training.
        target = [max(-(-g // unit) * unit, 2 * unit) for g in grid]
        pad = [t - g for t, g in zip(target, grid)]
        x = F.pad(feature, (0, pad[2], 0, pad[1], 0, pad[0])) if any(pad) else feature
        x = self.inc(x)
        skips = [x]
        for down in self.downs:
            x = down(x)
            skips.append(x)
        skips.pop()
        for up in reversed(self.ups):
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = up(torch.cat([x, skip], dim=1))
        x = self.out(x)
        return x[:, :, : grid[0], : grid[1], : grid[2]]
