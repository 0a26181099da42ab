"""3D multi-layer-aggregation decoder (3DSAM-adapter's ``VIT_MLAHead_h``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_in_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1, bias=False), nn.InstanceNorm3d(out_ch), nn.ReLU(inplace=True)]


class MLADecoder(nn.Module):
    """Four feature maps -> two 3^3 convs each -> x2 up; concat with the image at that grid; conv -> K; x2 up.

    Args:
        in_dim: neck channels (256).
        head_dim: channels per aggregated head (128).
        num_classes: K, background included.
    """

    def __init__(self, in_dim: int, head_dim: int, num_classes: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(*conv_in_relu(in_dim, head_dim), *conv_in_relu(head_dim, head_dim)) for _ in range(4)
        )
        self.cls = nn.Sequential(
            *conv_in_relu(4 * head_dim + 1, head_dim),
            nn.Conv3d(head_dim, num_classes, kernel_size=3, padding=1, bias=False),
        )

    def forward(self, features: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """Decode.

        Args:
            features: four maps ``B x in_dim x gx x gy x gz``, shallow to deep (prompts already fused).
            image: the input crop ``B x 1 x X x Y x Z``.

        Returns:
            logits ``B x K x X x Y x Z``.
        """
        grid = [2 * g for g in features[0].shape[2:]]
        heads = [
            F.interpolate(head(f), size=grid, mode="trilinear", align_corners=True) for head, f in zip(self.heads, features)
        ]
        small_image = F.interpolate(image, size=grid, mode="trilinear", align_corners=False)
        logits = self.cls(torch.cat([*heads, small_image.to(heads[0].dtype)], dim=1))
        return F.interpolate(logits, size=image.shape[2:], mode="trilinear", align_corners=True)
