"""Two-way transformer of the SAM-Med3D mask decoder: prompt tokens and image tokens attend to each
other (token→image, image→token), as in SAM, on a flattened 3D embedding.

Parameter names follow the checkpoints: ``layers.i.{self_attn, norm1, cross_attn_token_to_image, norm2,
mlp.lin1, mlp.lin2, norm3, norm4, cross_attn_image_to_token}``, ``final_attn_token_to_image``,
``norm_final_attn``; every attention has ``q_proj, k_proj, v_proj, out_proj``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from teacher.sam_med3d.image_encoder import MLPBlock


class TokenAttention(nn.Module):
    """Multi-head attention whose projections may shrink the width by ``downsample_rate``.

    Args:
        embedding_dim: input/output width.
        num_heads: heads; must divide ``embedding_dim // downsample_rate``.
        downsample_rate: internal width divisor (2 for the cross attentions).
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        internal = embedding_dim // downsample_rate
        if internal % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide the internal width {internal}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, internal)
        self.k_proj = nn.Linear(embedding_dim, internal)
        self.v_proj = nn.Linear(embedding_dim, internal)
        self.out_proj = nn.Linear(internal, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q``: ``B x Nq x C``; ``k``, ``v``: ``B x Nk x C`` → ``B x Nq x C``."""
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        out = (attn @ v).transpose(1, 2)
        return self.out_proj(out.reshape(out.shape[0], out.shape[1], -1))


class TwoWayAttentionBlock3D(nn.Module):
    """Token self-attention, token→image cross-attention, token MLP, image→token cross-attention.

    Args:
        embedding_dim: width.
        num_heads: heads.
        mlp_dim: token MLP hidden width.
        attention_downsample_rate: width divisor of the cross attentions.
        skip_first_layer_pe: the first layer's self-attention sees the tokens without their positional part.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = TokenAttention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = TokenAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = TokenAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``queries``/``query_pe``: ``B x Nt x C``; ``keys``/``key_pe``: ``B x Ni x C`` → updated pair."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer3D(nn.Module):
    """Stack of two-way blocks and a final token→image attention.

    Args:
        depth: number of blocks (2).
        embedding_dim: width (384).
        num_heads: heads (8).
        mlp_dim: token MLP hidden width (2048).
        attention_downsample_rate: cross-attention width divisor (2).
    """

    def __init__(
        self,
        depth: int = 2,
        embedding_dim: int = 384,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock3D(
                embedding_dim, num_heads, mlp_dim, attention_downsample_rate, skip_first_layer_pe=(i == 0)
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = TokenAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: ``image_embedding``, ``image_pe``: ``B x C x X x Y x Z``; ``point_embedding``: ``B x Nt x C``.

        Returns: tokens ``B x Nt x C`` and image tokens ``B x XYZ x C``.
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
