"""Windowed 3D self-attention with decomposed 3-axis relative position (SAM's h/w tables + a new depth one).

Tokens attend within non-overlapping cubic windows (8^3 = 512 tokens); in shifted blocks the grid is rolled by
half a window first (Swin) and a mask keeps tokens from attending across the roll's seams. Grids that are not a
multiple of the window are zero-padded (after ``norm1``, as SAM does) and the padded keys are masked out, so the
output for real tokens does not depend on padding. Along an axis shorter than the window the window shrinks to
the grid and that axis is not shifted. No grid size is fixed at build time: masks are computed for the grid
seen at run time and cached.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from teacher.adapter import LoRAQV

# Added to masked logits; finite so that fp16/bf16 autocast stays finite, far below any real logit.
MASK_VALUE = -1.0e4


def window_partition(x: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """``B x X x Y x Z x C`` (each size a multiple of its window) -> ``(B * nW) x wx x wy x wz x C``."""
    b, gx, gy, gz, c = x.shape
    wx, wy, wz = window
    x = x.view(b, gx // wx, wx, gy // wy, wy, gz // wz, wz, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wx, wy, wz, c)


def window_unpartition(windows: torch.Tensor, window: tuple[int, int, int], grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW) x wx x wy x wz x C`` -> ``B x X x Y x Z x C``."""
    wx, wy, wz = window
    gx, gy, gz = grid
    n_windows = (gx // wx) * (gy // wy) * (gz // wz)
    b = windows.shape[0] // n_windows
    x = windows.view(b, gx // wx, gy // wy, gz // wz, wx, wy, wz, -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, gx, gy, gz, -1)


def window_layout(
    grid: tuple[int, int, int], window_size: int, shifted: bool
) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]:
    """Per-axis window, shift and padded grid for a token grid.

    Args:
        grid: token grid ``(gx, gy, gz)``.
        window_size: nominal cubic window.
        shifted: whether this block shifts by half a window.

    Returns:
        (window, shift, padded_grid), each a 3-tuple.
    """
    window = tuple(min(window_size, g) for g in grid)
    shift = tuple(w // 2 if shifted and g > window_size else 0 for g, w in zip(grid, window))
    padded = tuple(-(-g // w) * w for g, w in zip(grid, window))
    return window, shift, padded  # type: ignore[return-value]


def attention_mask(
    grid: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int],
    padded: tuple[int, int, int], device: torch.device | None = None,
) -> torch.Tensor | None:
    """Additive mask for the windows of a (padded, rolled) grid, or None when nothing is masked.

    Key j is masked for query i when they come from different regions of the rolled grid (Swin's shifted
    window mask) or when j is padding.

    Returns:
        ``nW x N x N`` float tensor of 0 and ``MASK_VALUE`` (N = wx * wy * wz).
    """
    if shift == (0, 0, 0) and padded == grid:
        return None
    region = torch.zeros(padded, dtype=torch.long, device=device)
    for axis, (p, w, s) in enumerate(zip(padded, window, shift)):
        if s == 0:
            continue
        ids = torch.zeros(p, dtype=torch.long, device=device)
        ids[p - w : p - s] = 1
        ids[p - s :] = 2
        shape = [1, 1, 1]
        shape[axis] = p
        region = region * 3 + ids.view(shape)
    valid = torch.zeros(padded, dtype=torch.bool, device=device)
    valid[: grid[0], : grid[1], : grid[2]] = True
    valid = torch.roll(valid, shifts=tuple(-s for s in shift), dims=(0, 1, 2))
    region_w = window_partition(region[None, ..., None], window).flatten(1)  # nW x N
    valid_w = window_partition(valid[None, ..., None], window).flatten(1)
    allowed = (region_w[:, :, None] == region_w[:, None, :]) & valid_w[:, None, :]
    return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, MASK_VALUE)


def relative_position_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """``R[i, j] = table[i - j + L]`` for a table of length ``2 L + 1``; ``size <= L + 1``. Returns ``size x size x d``."""
    centre = (table.shape[0] - 1) // 2
    coords = torch.arange(size, device=table.device)
    return table[coords[:, None] - coords[None, :] + centre]


def decomposed_rel_pos_bias(
    q: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor], window: tuple[int, int, int]
) -> torch.Tensor:
    """MViTv2/SAM decomposed relative position, over three axes.

    Args:
        q: unscaled queries ``Bw x heads x N x d`` (N = wx * wy * wz).
        tables: (x, y, z) tables, each ``(2 w - 1) x d``.
        window: ``(wx, wy, wz)``.

    Returns:
        bias ``Bw x heads x N x N``.
    """
    bw, heads, n, d = q.shape
    wx, wy, wz = window
    rx, ry, rz = (relative_position_table(t.to(q.dtype), w) for t, w in zip(tables, window))
    q5 = q.reshape(bw, heads, wx, wy, wz, d)
    bx = torch.einsum("bhxyzc,xkc->bhxyzk", q5, rx)
    by = torch.einsum("bhxyzc,ykc->bhxyzk", q5, ry)
    bz = torch.einsum("bhxyzc,zkc->bhxyzk", q5, rz)
    bias = bx[..., :, None, None] + by[..., None, :, None] + bz[..., None, None, :]
    return bias.reshape(bw, heads, n, n)


def rel_pos_augmented_qk(
    q: torch.Tensor, k: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor], window: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold scaling and the decomposed relative position into q and k, so that ``q' . k'`` equals
    ``q . k / sqrt(d) + decomposed_rel_pos_bias(q)`` exactly.

    The x-term of the bias for query i and key j is ``A_x[i, x_j]`` with ``A_x[i, m] = q_i . R_x[x_i, m]``;
    appending ``A_x`` to q and the one-hot of ``x_j`` to k adds it inside the dot product. This never builds the
    ``N x N`` bias, so fused attention kernels can run and autograd stores no bias (512^2 per window and head).

    Args:
        q, k: ``Bw x heads x N x d``.
        tables: (x, y, z) tables, each ``(2 w - 1) x d``.
        window: ``(wx, wy, wz)``.

    Returns:
        ``q'`` and ``k'``, each ``Bw x heads x N x (d + wx + wy + wz)``; use with ``scale=1``.
    """
    bw, heads, n, d = q.shape
    wx, wy, wz = window
    rx, ry, rz = (relative_position_table(t.to(q.dtype), w) for t, w in zip(tables, window))
    q5 = q.reshape(bw, heads, wx, wy, wz, d)
    ax = torch.einsum("bhxyzc,xkc->bhxyzk", q5, rx).reshape(bw, heads, n, wx)
    ay = torch.einsum("bhxyzc,ykc->bhxyzk", q5, ry).reshape(bw, heads, n, wy)
    az = torch.einsum("bhxyzc,zkc->bhxyzk", q5, rz).reshape(bw, heads, n, wz)
    gx, gy, gz = torch.meshgrid(*(torch.arange(w, device=q.device) for w in window), indexing="ij")
    onehot = torch.cat(
        [F.one_hot(g.flatten(), w) for g, w in zip((gx, gy, gz), window)], dim=-1
    ).to(q.dtype)  # N x (wx + wy + wz)
    q_aug = torch.cat([q * d**-0.5, ax, ay, az], dim=-1)
    k_aug = torch.cat([k, onehot.expand(bw, heads, n, -1)], dim=-1)
    return q_aug, k_aug


class WindowAttention3d(nn.Module):
    """Multi-head self-attention in (optionally shifted) 3D windows.

    Parameter names follow SAM's ``Attention`` (``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w``); the new depth
    table is ``rel_pos_d``. ``rel_pos_h`` acts along X, ``rel_pos_w`` along Y, ``rel_pos_d`` along Z.

    Args:
        dim: token width C.
        num_heads: heads.
        window_size: cubic window in tokens (8).
        shifted: roll by half a window before partitioning.
        lora_rank: > 0 adds LoRA on q and v.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shifted: bool, lora_rank: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.shifted = shifted
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        length = 2 * window_size - 1
        self.rel_pos_h = nn.Parameter(torch.zeros(length, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(length, head_dim))
        self.rel_pos_d = nn.Parameter(torch.zeros(length, head_dim))
        self.lora = LoRAQV(dim, lora_rank) if lora_rank > 0 else None
        self._mask_cache: dict[tuple, torch.Tensor | None] = {}

    def _mask(self, grid, window, shift, padded, device) -> torch.Tensor | None:
        key = (grid, window, shift, str(device))
        if key not in self._mask_cache:
            self._mask_cache[key] = attention_mask(grid, window, shift, padded, device)
        return self._mask_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``B x X x Y x Z x C`` (normalised tokens). Returns the attention output, same shape."""
        b, gx, gy, gz, c = x.shape
        grid = (gx, gy, gz)
        window, shift, padded = window_layout(grid, self.window_size, self.shifted)
        if padded != grid:
            x = F.pad(x, (0, 0, 0, padded[2] - gz, 0, padded[1] - gy, 0, padded[0] - gx))
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        windows = window_partition(x, window).flatten(1, 3)  # Bw x N x C
        bw, n, _ = windows.shape

        qkv = self.qkv(windows)
        q, k, v = qkv.chunk(3, dim=-1)
        if self.lora is not None:
            dq, dv = self.lora(windows)
            q, v = q + dq, v + dv
        q, k, v = (t.reshape(bw, n, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))

        q_aug, k_aug = rel_pos_augmented_qk(q, k, (self.rel_pos_h, self.rel_pos_w, self.rel_pos_d), window)
        mask = self._mask(grid, window, shift, padded, x.device)
        if mask is not None:
            # Windows of one sample are contiguous (B outer, nW inner), so the nW x N x N mask tiles over B.
            n_windows = mask.shape[0]
            mask = mask[None, :, None].expand(bw // n_windows, -1, -1, -1, -1).reshape(bw, 1, n, n).to(q_aug.dtype)
        # Zero-padding v to q's width lets PyTorch pick its fused (flash) kernel, which needs equal head dims.
        head_dim = v.shape[-1]
        v = F.pad(v, (0, q_aug.shape[-1] - head_dim))
        out = F.scaled_dot_product_attention(q_aug, k_aug, v, attn_mask=mask, scale=1.0)[..., :head_dim]
        out = self.proj(out.transpose(1, 2).reshape(bw, n, c))

        out = window_unpartition(out.view(bw, *window, c), window, padded)
        if any(shift):
            out = torch.roll(out, shifts=shift, dims=(1, 2, 3))
        return out[:, :gx, :gy, :gz].contiguous()
