"""A stand-in teacher for tests of the stages after the teacher: any module with the segmentation contract
(``B x 1 x X x Y x Z`` → ``B x K x X x Y x Z`` logits) serves the cache and the KD loss."""
import torch
from torch import nn


class ConvTeacher(nn.Module):
    """One seeded 3³ convolution: deterministic soft targets at no cost."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
