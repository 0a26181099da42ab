"""Point prompts (3DSAM-adapter interactive mode): click features + two-way transformer with global queries.

Each click becomes a token: the deepest feature sampled at the click (``grid_sample``) plus a random-Fourier
position encoding of its coordinates (SAM's ``PositionEmbeddingRandom`` in 3D) plus a label embedding
(positive / negative / padding). Ten learnable global queries and the click tokens go through a two-way
transformer (depth 2, dim 256): tokens attend to each other and to the image, then the image attends to the
tokens; the updated image feature replaces the deepest feature in the decoder (as in the reference). Padding
clicks (label -1) are masked out of every attention, so they change nothing.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

POSITIVE, NEGATIVE, PADDING = 1, 0, -1


class PromptAttention(nn.Module):
    """SAM's prompt attention: q/k/v projections to ``dim / downsample``, heads, output projection.

    Args:
        dim: token width.
        num_heads: heads.
        downsample: internal width divisor (2 for the cross attentions).
    """

    def __init__(self, dim: int, num_heads: int, downsample: int = 1) -> None:
        super().__init__()
        inner = dim // downsample
        if inner % num_heads:
            raise ValueError(f"prompt attention width {inner} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, inner) for _ in range(3))
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Args: q ``B x Nq x D``, k and v ``B x Nk x D``, key_valid ``B x Nk`` bool or None. Returns ``B x Nq x D``."""
        b = q.shape[0]
        q, k, v = (
            proj(t).reshape(b, t.shape[1], self.num_heads, -1).transpose(1, 2)
            for proj, t in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v))
        )
        mask = None if key_valid is None else key_valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class TwoWayBlock(nn.Module):
    """Token self-attention, token-to-image attention, token MLP, image-to-token attention (SAM's two-way block).

    Args:
        dim: width (256).
        num_heads: heads (8).
        mlp_dim: token MLP width (2048).
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.self_attn = PromptAttention(dim, num_heads)
        self.cross_token_to_image = PromptAttention(dim, num_heads, downsample=2)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, dim))
        self.cross_image_to_token = PromptAttention(dim, num_heads, downsample=2)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))

    def forward(
        self, tokens: torch.Tensor, token_pe: torch.Tensor, valid: torch.Tensor, image: torch.Tensor, image_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: tokens/token_pe ``B x T x D``, valid ``B x T`` bool, image/image_pe ``B x M x D``. Returns both updated."""
        q = tokens + token_pe
        tokens = self.norms[0](tokens + self.self_attn(q, q, tokens, valid))
        tokens = self.norms[1](tokens + self.cross_token_to_image(tokens + token_pe, image + image_pe, image))
        tokens = self.norms[2](tokens + self.mlp(tokens))
        image = self.norms[3](image + self.cross_image_to_token(image + image_pe, tokens + token_pe, tokens, valid))
        return tokens, image


class PointPromptEncoder(nn.Module):
    """Fuse clicks into the deepest feature map.

    Args:
        dim: feature channels (256).
        depth: two-way blocks (2).
        num_heads: heads (8).
        mlp_dim: token MLP width (2048).
        num_queries: learnable global queries (10).
    """

    def __init__(self, dim: int = 256, depth: int = 2, num_heads: int = 8, mlp_dim: int = 2048, num_queries: int = 10) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"point prompt dim must be even, got {dim}")
        # SAM's random Fourier features (a fixed buffer, saved with the model so encodings are reproducible).
        self.register_buffer("pe_gaussian", torch.randn(3, dim // 2))
        self.label_embed = nn.Embedding(3, dim)  # rows: padding, negative, positive
        self.global_queries = nn.Parameter(0.1 * torch.randn(1, num_queries, dim))
        self.layers = nn.ModuleList(TwoWayBlock(dim, num_heads, mlp_dim) for _ in range(depth))

    def encode_positions(self, unit_coords: torch.Tensor) -> torch.Tensor:
        """Random Fourier features of coordinates in ``[0, 1]^3``: ``... x 3 -> ... x dim``."""
        proj = (2 * unit_coords - 1) @ self.pe_gaussian.to(unit_coords.dtype) * (2 * math.pi)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def forward(
        self, feature: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor, input_size: tuple[int, int, int]
    ) -> torch.Tensor:
        """Update the feature map with clicks.

        Args:
            feature: deepest feature ``B x D x gx x gy x gz``.
            coords: click voxel coordinates ``B x N x 3`` (X, Y, Z order, voxel centres at integers).
            labels: ``B x N`` with 1 positive, 0 negative, -1 padding.
            input_size: the crop's ``(X, Y, Z)`` the coordinates refer to.

        Returns:
            updated feature ``B x D x gx x gy x gz``.
        """
        b, d, *grid = feature.shape
        check_points(coords, labels, b)
        size = torch.tensor(input_size, dtype=feature.dtype, device=feature.device)
        unit = (coords.to(feature.dtype) + 0.5) / size  # [0, 1], voxel-centre convention of align_corners=False
        # grid_sample's last grid axis indexes the input's last spatial axis (Z), so reverse X, Y, Z.
        sample_grid = (2 * unit - 1).flip(-1)[:, :, None, None, :]  # B x N x 1 x 1 x 3
        sampled = F.grid_sample(feature, sample_grid, mode="bilinear", padding_mode="border", align_corners=False)
        point_tokens = sampled.flatten(2).transpose(1, 2)  # B x N x D
        labels = labels.long()
        point_pe = self.encode_positions(unit) + self.label_embed(labels + 1)
        valid_points = labels != PADDING

        queries = self.global_queries.expand(b, -1, -1).to(feature.dtype)
        tokens = torch.cat([queries, point_tokens * valid_points[..., None]], dim=1)
        token_pe = torch.cat([torch.zeros_like(queries), point_pe], dim=1)
        valid = torch.cat([torch.ones(queries.shape[:2], dtype=torch.bool, device=feature.device), valid_points], dim=1)

        centres = [(torch.arange(g, device=feature.device, dtype=feature.dtype) + 0.5) / g for g in grid]
        mesh = torch.stack(torch.meshgrid(*centres, indexing="ij"), dim=-1)  # gx x gy x gz x 3
        image_pe = self.encode_positions(mesh).flatten(0, 2)[None]  # 1 x M x D
        image = feature.flatten(2).transpose(1, 2)  # B x M x D
        for layer in self.layers:
            tokens, image = layer(tokens, token_pe, valid, image, image_pe)
        return image.transpose(1, 2).reshape(b, d, *grid)


def check_points(coords: torch.Tensor, labels: torch.Tensor, batch: int) -> None:
    """Raise ValueError unless coords is ``B x N x 3`` and labels ``B x N`` with values in {-1, 0, 1}."""
    if coords.ndim != 3 or coords.shape[0] != batch or coords.shape[2] != 3:
        raise ValueError(f"point coords must be B x N x 3 with B = {batch}, got shape {tuple(coords.shape)}")
    if labels.shape != coords.shape[:2]:
        raise ValueError(f"point labels must be B x N = {tuple(coords.shape[:2])}, got shape {tuple(labels.shape)}")
    if labels.numel() and not torch.isin(labels, torch.tensor([PADDING, NEGATIVE, POSITIVE], device=labels.device)).all():
        raise ValueError(f"point labels must be 1 (positive), 0 (negative) or -1 (padding); got {labels.unique().tolist()}")
