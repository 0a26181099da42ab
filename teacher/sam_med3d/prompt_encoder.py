"""SAM-Med3D prompt encoder: point clicks → sparse tokens, a low-resolution mask → a dense embedding.

Names follow the checkpoints: ``pe_layer.positional_encoding_gaussian_matrix`` (a persistent buffer,
3 x C/3), ``point_embeddings.{0,1}`` (negative, positive), ``not_a_point_embed``, ``mask_downscaling.{0,1,3,4,6}``,
``no_mask_embed``.

Two quirks of the published model are reproduced because its weights were trained with them:
- the Fourier feature is ``[sin, cos, sin]`` of one projection (C = 3 x C/3, e.g. 384 = 3 x 128);
- the dense grid encoding swaps the first two axes relative to the point encoding (an inheritance of
  SAM's 2D (x, y) vs (row, col) convention). Points are given in tensor index order (X, Y, Z of our
  ``B x 1 x X x Y x Z`` layout), exactly what SAM-Med3D's click code passes (``argwhere`` of the mask).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from teacher.neck import LayerNorm3d


class PositionEmbeddingRandom3D(nn.Module):
    """Random-Fourier positional encoding of normalised 3D coordinates.

    Args:
        num_pos_feats: projections per sin/cos part; the output width is ``3 * num_pos_feats``.
        scale: standard deviation of the random frequencies.
    """

    def __init__(self, num_pos_feats: int = 128, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(3, num_pos_feats))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """``... x 3`` in [0, 1] → ``... x 3 * num_pos_feats``."""
        proj = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(proj), torch.cos(proj), torch.sin(proj)], dim=-1)

    def forward(self, size: tuple[int, int, int]) -> torch.Tensor:
        """Dense encoding of a ``size`` grid (cell centres) → ``C x X x Y x Z``."""
        sx, sy, sz = size
        device = self.positional_encoding_gaussian_matrix.device
        ax0 = (torch.arange(sx, device=device, dtype=torch.float32) + 0.5) / sy
        ax1 = (torch.arange(sy, device=device, dtype=torch.float32) + 0.5) / sx
        ax2 = (torch.arange(sz, device=device, dtype=torch.float32) + 0.5) / sz
        g0, g1, g2 = torch.meshgrid(ax0, ax1, ax2, indexing="ij")
        # Feature 0 follows grid axis 1 and feature 1 grid axis 0 (see the module docstring).
        return self._encode(torch.stack([g1, g0, g2], dim=-1)).permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int, int]) -> torch.Tensor:
        """Voxel coordinates ``B x N x 3`` in an image of ``image_size`` → ``B x N x C``."""
        scale = torch.tensor(image_size, dtype=torch.float32, device=coords.device)
        return self._encode(coords.float() / scale)


class PromptEncoder3D(nn.Module):
    """Encode point and mask prompts for the mask decoder.

    Args:
        embed_dim: prompt width (384).
        image_embedding_size: token grid of the image embedding (8, 8, 8).
        input_image_size: crop size in voxels (128, 128, 128).
        mask_in_chans: hidden channels of the mask downscaling (16).
    """

    def __init__(
        self,
        embed_dim: int = 384,
        image_embedding_size: tuple[int, int, int] = (8, 8, 8),
        input_image_size: tuple[int, int, int] = (128, 128, 128),
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        if embed_dim % 3:
            raise ValueError(f"prompt embed_dim {embed_dim} must be divisible by 3 (sin/cos/sin features)")
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.mask_input_size = tuple(4 * s for s in image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(2))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid, ``1 x C x X' x Y' x Z'``."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Clicks → tokens.

        Args:
            coords: ``B x N x 3`` voxel coordinates (index order) in the crop.
            labels: ``B x N``: 1 positive, 0 negative, -1 padding.

        Returns:
            ``B x (N + 1) x C``: one padding token is appended, as SAM does without a box prompt.
        """
        b = coords.shape[0]
        coords = torch.cat([coords.float() + 0.5, coords.new_zeros(b, 1, 3, dtype=torch.float32)], dim=1)
        labels = torch.cat([labels.to(coords.device), labels.new_full((b, 1), -1)], dim=1)[..., None]
        pe = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        neg, pos = self.point_embeddings[0].weight, self.point_embeddings[1].weight
        return torch.where(
            labels == -1,
            self.not_a_point_embed.weight.expand_as(pe),
            pe + torch.where(labels == 1, pos, torch.where(labels == 0, neg, torch.zeros_like(pos))),
        )

    def forward(
        self,
        points: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        masks: Optional[torch.Tensor] = None,
        batch_size: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            points: ``(coords B x N x 3, labels B x N)`` or None.
            masks: low-res mask logits ``B x 1 x 4X' x 4Y' x 4Z'`` (32³ for ViT-B) or None.
            batch_size: B when neither prompt is given.

        Returns:
            sparse ``B x (N+1) x C`` (``B x 0 x C`` without points) and dense ``B x C x X' x Y' x Z'``.
        """
        if points is not None:
            batch_size = points[0].shape[0]
        elif masks is not None:
            batch_size = masks.shape[0]
        device = self.no_mask_embed.weight.device
        if points is not None:
            sparse = self.embed_points(*points)
        else:
            sparse = torch.empty(batch_size, 0, self.embed_dim, device=device)
        if masks is not None:
            if tuple(masks.shape[2:]) != self.mask_input_size:
                raise ValueError(f"mask prompt must be B x 1 x {self.mask_input_size}, got {tuple(masks.shape)}")
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(
                batch_size, -1, *self.image_embedding_size
            )
        return sparse, dense
