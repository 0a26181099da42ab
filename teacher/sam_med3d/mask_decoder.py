"""SAM-Med3D mask decoder: output tokens (IoU + 4 mask tokens) and prompt tokens run through the two-way
transformer with the image embedding; the image side is upsampled ×4 (two transposed convs) and each mask
token's hypernetwork MLP turns it into a per-voxel dot product → low-resolution mask logits (32³ for a
128³ crop).

Names follow the checkpoints: ``transformer.*``, ``iou_token``, ``mask_tokens``, ``output_upscaling.{0,1,3}``,
``output_hypernetworks_mlps.i.layers.j``, ``iou_prediction_head.layers.j``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from teacher.neck import LayerNorm3d
from teacher.sam_med3d.transformer import TwoWayTransformer3D


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (``layers.j``).

    Args:
        input_dim: input width.
        hidden_dim: hidden width.
        output_dim: output width.
        num_layers: number of linear layers.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``... x input_dim`` → ``... x output_dim``."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder3D(nn.Module):
    """Predict masks and their IoU from image and prompt embeddings.

    Args:
        transformer_dim: width (384 = the prompt dimension).
        num_multimask_outputs: extra ambiguity masks (3); token 0 is the single-mask output.
        iou_head_depth: layers of the IoU head (3).
        iou_head_hidden_dim: hidden width of the IoU head (256).
        transformer_depth: two-way blocks (2).
        transformer_heads: attention heads (8).
        transformer_mlp_dim: token MLP width (2048).
    """

    def __init__(
        self,
        transformer_dim: int = 384,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        transformer_depth: int = 2,
        transformer_heads: int = 8,
        transformer_mlp_dim: int = 2048,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = TwoWayTransformer3D(
            transformer_depth, transformer_dim, transformer_heads, transformer_mlp_dim
        )
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            image_embeddings: ``B x C x X' x Y' x Z'`` (8³ for ViT-B).
            image_pe: ``1 x C x X' x Y' x Z'``.
            sparse_prompt_embeddings: ``B x Nt x C`` (Nt may be 0).
            dense_prompt_embeddings: ``B x C x X' x Y' x Z'``.
            multimask_output: return the 3 ambiguity masks instead of the single one.

        Returns:
            mask logits ``B x M x 4X' x 4Y' x 4Z'`` (M = 1 or 3) and IoU predictions ``B x M``.
        """
        b = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] != b or dense_prompt_embeddings.shape[0] != b:
            raise ValueError(
                f"batch mismatch: image {image_embeddings.shape[0]}, sparse {b}, dense {dense_prompt_embeddings.shape[0]}"
            )
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        src = image_embeddings + dense_prompt_embeddings
        pos = image_pe.expand(b, -1, -1, -1, -1)
        _, c, x, y, z = src.shape
        hs, src = self.transformer(src, pos, tokens)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, x, y, z))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        _, cu, ux, uy, uz = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, cu, -1)).reshape(b, -1, ux, uy, uz)
        iou_pred = self.iou_prediction_head(iou_token_out)
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou_pred[:, sel]
