"""The 3D image encoder: SAM's ViT blocks on a 3D token grid, with adapters or LoRA, and four necks.

Parameter names match SAM's ``ImageEncoderViT`` wherever a SAM weight is reused, so an official checkpoint's
``image_encoder.*`` keys map onto ``image_encoder.*`` of :class:`teacher.model.Teacher3D` one to one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from teacher.adapter import SpatialAdapter3d
from teacher.arch import TeacherArch
from teacher.attention import WindowAttention3d
from teacher.neck import Neck3d
from teacher.patch_embed import PatchEmbed3d

# SAM weights reused in every block (names relative to ``blocks.<i>.``).
SAM_BLOCK_KEYS = (
    "norm1.weight", "norm1.bias",
    "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "attn.rel_pos_h", "attn.rel_pos_w",
    "norm2.weight", "norm2.bias",
    "mlp.lin1.weight", "mlp.lin1.bias", "mlp.lin2.weight", "mlp.lin2.bias",
)


class MLPBlock(nn.Module):
    """SAM's transformer MLP (``lin1``, GELU, ``lin2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


class Block3d(nn.Module):
    """``x = adapter(x); x = x + attn(norm1(x)); x = x + mlp(norm2(x))`` on a ``B x X x Y x Z x C`` grid.

    Args:
        dim: C.
        num_heads: heads.
        mlp_ratio: MLP width / C.
        window_size: cubic window in tokens.
        shifted: shift windows by half a window (the reference shifts even-indexed blocks).
        adapter: add the spatial adapter before ``norm1``.
        lora_rank: > 0 adds LoRA on q and v.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, shifted: bool,
        adapter: bool, lora_rank: int,
    ) -> None:
        super().__init__()
        self.adapter = SpatialAdapter3d(dim, dim // 2) if adapter else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = WindowAttention3d(dim, num_heads, window_size, shifted, lora_rank)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``B x X x Y x Z x C``. Returns the same shape."""
        if self.adapter is not None:
            x = self.adapter(x)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageEncoder3d(nn.Module):
    """Folded 3D patch embedding, SAM position table + depth embedding, windowed blocks, four necks.

    Args:
        arch: sizes.
        peft: "adapter" (spatial adapters in every block) or "lora" (LoRA on q, v; no adapters).
        lora_rank: LoRA rank for ``peft="lora"``.
    """

    def __init__(self, arch: TeacherArch, peft: str = "adapter", lora_rank: int = 4) -> None:
        super().__init__()
        c = arch.embed_dim
        self.arch = arch
        self.patch_embed = PatchEmbed3d(c, arch.patch_size, arch.upsample)
        table = arch.sam_img_size // arch.patch_size
        # SAM's absolute table, frozen when loaded; pooled to the in-plane token grid at run time.
        self.pos_embed = nn.Parameter(torch.zeros(1, table, table, c))
        # New, sized from the training crop's depth; the reference (ImageEncoderViT_3d_v2) starts it at ones.
        self.depth_embed = nn.Parameter(torch.ones(1, arch.roi_size[2] // arch.voxels_per_token, c))
        self.blocks = nn.ModuleList(
            Block3d(c, arch.num_heads, arch.mlp_ratio, arch.window_size, shifted=(i % 2 == 0),
                    adapter=(peft == "adapter"), lora_rank=(lora_rank if peft == "lora" else 0))
            for i in range(arch.depth)
        )
        self.necks = nn.ModuleList(Neck3d(c, arch.neck_dim) for _ in range(4))
        self.neck_indexes = arch.neck_indexes
        self.grad_checkpointing = False

    def sam_keys(self) -> list[str]:
        """Names (relative to this module) of every parameter that holds a reused SAM weight."""
        keys = ["patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"]
        for i in range(len(self.blocks)):
            keys += [f"blocks.{i}.{k}" for k in SAM_BLOCK_KEYS]
        return keys

    def position_embedding(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """SAM's table average-pooled to ``(gx, gy)`` plus the depth embedding resized to ``gz``: ``1 x gx x gy x gz x C``."""
        pos = F.adaptive_avg_pool2d(self.pos_embed.permute(0, 3, 1, 2), grid[:2]).permute(0, 2, 3, 1)
        depth = self.depth_embed
        if depth.shape[1] != grid[2]:
            depth = F.interpolate(depth.transpose(1, 2), size=grid[2], mode="linear", align_corners=False).transpose(1, 2)
        return pos[:, :, :, None, :] + depth[:, None, None, :, :]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encode a crop.

        Args:
            x: ``B x 1 x X x Y x Z``, sizes multiples of ``voxels_per_token``.

        Returns:
            four neck features, shallow to deep, each ``B x neck_dim x X/v x Y/v x Z/v``.
        """
        tokens = self.patch_embed(x)
        tokens = tokens + self.position_embedding(tuple(tokens.shape[1:4])).to(tokens.dtype)
        features = []
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
            if i in self.neck_indexes:
                neck = self.necks[self.neck_indexes.index(i)]
                features.append(neck(tokens.permute(0, 4, 1, 2, 3)))
        return features
