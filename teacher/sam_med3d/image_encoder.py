"""SAM-Med3D image encoder: a plain 3D ViT (ViTDet-style) with windowed/global attention and 3D relative
positions, followed by a neck to the prompt dimension.

Parameter names and shapes follow the published SAM-Med3D checkpoints (``sam_med3d_turbo.pth``,
``vit_b_ori``): ``patch_embed.proj``, ``pos_embed`` (1 x G x G x G x C), ``blocks.i.{norm1, attn.qkv,
attn.proj, attn.rel_pos_{d,h,w}, norm2, mlp.lin1, mlp.lin2}``, ``neck.{0,1,2,3}``.

For ViT-B on a 128³ crop the token grid is 8³, while the published configuration uses window size 14:
every windowed block pads the 8³ grid to one 14³ window of which only 512 tokens are real. The padded
tokens are zeros after ``norm1``, so their keys and values are ``qkv(0)`` and they do take part in the
softmax; the checkpoint was trained that way, so we keep them as keys. Their *queries* are discarded by
the reference after attention, so we never compute them: attention runs for the 512 real queries
against the 2,744 window keys, which is exactly the reference result at ~1/5 of the cost and memory.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from teacher.neck import LayerNorm3d


class PatchEmbed3D(nn.Module):
    """Non-overlapping cubic patches → tokens (``proj`` is a strided Conv3d).

    Args:
        patch_size: edge of a cubic patch in voxels (16 for SAM-Med3D).
        in_chans: image channels (1 for CT).
        embed_dim: token width.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 1, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x in_chans x X x Y x Z`` → tokens ``B x X/p x Y/p x Z/p x embed_dim`` (channel-last)."""
        return self.proj(x).permute(0, 2, 3, 4, 1)


class MLPBlock(nn.Module):
    """Two-layer perceptron ``lin1 → act → lin2`` (names as in the checkpoints).

    Args:
        embedding_dim: input/output width.
        mlp_dim: hidden width.
        act: activation class.
    """

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``... x embedding_dim`` → same shape."""
        return self.lin2(self.act(self.lin1(x)))


def relative_position_table(rel_pos: torch.Tensor, q_size: int, k_size: int) -> torch.Tensor:
    """Look up relative-position embeddings for query positions ``0..q_size-1`` against keys ``0..k_size-1``.

    The table is indexed by ``q - k + (L - 1) / 2`` with ``L = 2 * max(q_size, k_size) - 1``; a table
    trained for another grid is resized linearly first (as SAM does for a new input size). Query and key
    grids share one origin (queries are a leading sub-block of the key window), so no rescaling applies.

    Args:
        rel_pos: ``L0 x head_dim`` table.
        q_size: number of query positions along this axis.
        k_size: number of key positions along this axis.

    Returns:
        ``q_size x k_size x head_dim``.
    """
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t().unsqueeze(0), size=length, mode="linear").squeeze(0).t()
    q_idx = torch.arange(q_size, device=rel_pos.device)[:, None]
    k_idx = torch.arange(k_size, device=rel_pos.device)[None, :]
    return rel_pos[q_idx - k_idx + (max(q_size, k_size) - 1)]


class Attention3D(nn.Module):
    """Multi-head self-attention over a 3D token grid, optionally in cubic windows, with decomposed 3D
    relative positions (one table per axis: ``rel_pos_d``, ``rel_pos_h``, ``rel_pos_w`` for grid axes 0, 1, 2).

    Args:
        dim: token width.
        num_heads: attention heads.
        qkv_bias: bias on the fused qkv projection.
        use_rel_pos: add decomposed relative positions to the attention logits.
        rel_pos_size: grid edge the tables are built for (the window size, or the token grid for global
            attention): each table has ``2 * rel_pos_size - 1`` rows.
        window_size: 0 for global attention, else the cubic window edge in tokens.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        rel_pos_size: int = 8,
        window_size: int = 0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.window_size = window_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            rows = 2 * rel_pos_size - 1
            self.rel_pos_d = nn.Parameter(torch.zeros(rows, head_dim))
            self.rel_pos_h = nn.Parameter(torch.zeros(rows, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(rows, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``B x X x Y x Z x dim`` (already normalised) → ``B x X x Y x Z x dim``."""
        b, gx, gy, gz, c = x.shape
        qkv = self.qkv(x)
        ws = self.window_size
        if ws == 0:
            out = self._attend(qkv.reshape(b, -1, 3 * c), qkv.reshape(b, -1, 3 * c), (gx, gy, gz), (gx, gy, gz))
            return self.proj(out.reshape(b, gx, gy, gz, c))

        padded = [math.ceil(s / ws) * ws for s in (gx, gy, gz)]
        if padded != [gx, gy, gz]:
            # Padded tokens are zero vectors after norm1: their projections are qkv(0) (the bias, or LoRA's
            # zero update on top of it), not zeros.
            fill = self.qkv(x.new_zeros(1, c)).reshape(1, 1, 1, 1, 3 * c)
            full = fill.expand(b, *padded, 3 * c).clone()
            full[:, :gx, :gy, :gz] = qkv
        else:
            full = qkv
        if all(p == ws for p in padded):
            # One window holds the whole grid: only the real tokens' queries are needed.
            out = self._attend(qkv.reshape(b, -1, 3 * c), full.reshape(b, -1, 3 * c), (gx, gy, gz), (ws, ws, ws))
            return self.proj(out.reshape(b, gx, gy, gz, c))

        nx, ny, nz = (p // ws for p in padded)
        windows = (
            full.reshape(b, nx, ws, ny, ws, nz, ws, 3 * c)
            .permute(0, 1, 3, 5, 2, 4, 6, 7)
            .reshape(b * nx * ny * nz, ws**3, 3 * c)
        )
        out = self._attend(windows, windows, (ws, ws, ws), (ws, ws, ws))
        out = (
            out.reshape(b, nx, ny, nz, ws, ws, ws, c)
            .permute(0, 1, 4, 2, 5, 3, 6, 7)
            .reshape(b, *padded, c)[:, :gx, :gy, :gz]
        )
        return self.proj(out)

    def _attend(
        self,
        q_qkv: torch.Tensor,
        kv_qkv: torch.Tensor,
        q_grid: Sequence[int],
        k_grid: Sequence[int],
    ) -> torch.Tensor:
        """Attention of the query part of ``q_qkv`` (``B' x Nq x 3C``) to the key/value parts of ``kv_qkv``
        (``B' x Nk x 3C``); queries form the leading ``q_grid`` sub-block of the ``k_grid`` block.
        Returns ``B' x Nq x C``."""
        bw, nq, c3 = q_qkv.shape
        nk = kv_qkv.shape[1]
        c = c3 // 3
        h = self.num_heads
        q = q_qkv[..., :c].reshape(bw, nq, h, -1).transpose(1, 2).reshape(bw * h, nq, -1)
        k = kv_qkv[..., c : 2 * c].reshape(bw, nk, h, -1).transpose(1, 2).reshape(bw * h, nk, -1)
        v = kv_qkv[..., 2 * c :].reshape(bw, nk, h, -1).transpose(1, 2).reshape(bw * h, nk, -1)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            attn = self._add_rel_pos(attn, q, q_grid, k_grid)
        out = attn.softmax(dim=-1) @ v
        return out.reshape(bw, h, nq, -1).transpose(1, 2).reshape(bw, nq, c)

    def _add_rel_pos(
        self, attn: torch.Tensor, q: torch.Tensor, q_grid: Sequence[int], k_grid: Sequence[int]
    ) -> torch.Tensor:
        """Decomposed relative positions (MViTv2): ``attn`` ``N x Nq x Nk`` plus q·R per axis."""
        (qd, qh, qw), (kd, kh, kw) = q_grid, k_grid
        rd = relative_position_table(self.rel_pos_d, qd, kd)
        rh = relative_position_table(self.rel_pos_h, qh, kh)
        rw = relative_position_table(self.rel_pos_w, qw, kw)
        n = q.shape[0]
        r_q = q.reshape(n, qd, qh, qw, -1)
        rel_d = torch.einsum("bdhwc,dkc->bdhwk", r_q, rd)
        rel_h = torch.einsum("bdhwc,hkc->bdhwk", r_q, rh)
        rel_w = torch.einsum("bdhwc,wkc->bdhwk", r_q, rw)
        attn = (
            attn.view(n, qd, qh, qw, kd, kh, kw)
            + rel_d[:, :, :, :, :, None, None]
            + rel_h[:, :, :, :, None, :, None]
            + rel_w[:, :, :, :, None, None, :]
        )
        return attn.view(n, qd * qh * qw, kd * kh * kw)


class Block3D(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        qkv_bias: bias on qkv.
        use_rel_pos: decomposed 3D relative positions.
        window_size: 0 = global attention over the grid.
        grid_size: token grid edge (used for the rel-pos table size of global blocks).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 0,
        grid_size: int = 8,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention3D(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_size=window_size if window_size > 0 else grid_size,
            window_size=window_size,
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x X x Y x Z x dim`` → same shape."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT3D(nn.Module):
    """3D ViT image encoder of SAM-Med3D.

    Args:
        img_size: cubic input edge in voxels (128 for SAM-Med3D).
        patch_size: cubic patch edge (16 → an 8³ token grid on 128³).
        in_chans: input channels.
        embed_dim: token width (768 for ViT-B).
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width ratio.
        out_chans: neck output channels = prompt embedding dim (384).
        window_size: window edge of non-global blocks (14 in the published configuration).
        global_attn_indexes: blocks with global attention.
        use_rel_pos: decomposed 3D relative positions.
    """

    def __init__(
        self,
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        use_rel_pos: bool = True,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        grid = img_size // patch_size
        self.grid_size = grid
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block3D(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                grid_size=grid,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )
        # Recompute each block's activations in the backward pass (GPU memory for time); set by training.
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``B x 1 x S x S x S`` (S = img_size) → embedding ``B x out_chans x S/p x S/p x S/p``."""
        if tuple(x.shape[2:]) != (self.img_size,) * 3:
            raise ValueError(
                f"SAM-Med3D encoder expects a {self.img_size}³ crop, got spatial shape {tuple(x.shape[2:])}"
            )
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))
