"""3D patch embedding: SAM's frozen 2D 16x16 patch conv and a trainable slice merge, folded into one 3D conv.

The reference (3DSAM-adapter) upsamples a crop x4 with trilinear interpolation (``align_corners=False``),
embeds every axial slice with SAM's 2D conv (kernel = stride = 16) and merges 16 consecutive slice
embeddings with a depthwise Conv3d (kernel = stride = 16 along depth). All three steps are linear, so a token
is a fixed linear function of the original voxels: we fold them into one strided 3D conv and never build
the 64x larger upsampled volume.

Exactness, borders included: per axis, trilinear upsampling by ``f`` with ``align_corners=False`` reads
source coordinate ``s = (o + 0.5) / f - 0.5`` and clamps it to ``[0, n - 1]``. Clamping equals
interpolating a replicate-padded signal (padding value = edge value gives the same weighted sum), and for
every output inside the 16-wide patch of token ``p`` the two source voxels lie in
``[v p - 1, v p + v]`` with ``v = 16 / f``. So the folded operator is: replicate-pad one voxel per side, then a
conv with kernel ``v + 2`` and stride ``v`` (6 and 4 for the paper configuration). This equals the reference
everywhere, including the first and last token along each axis; ``tests/test_teacher_patch_embed.py``
checks it on random input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def upsample_weights(patch_size: int, upsample: int) -> torch.Tensor:
    """Weights of linear upsampling (``align_corners=False``) restricted to one patch.

    Args:
        patch_size: upsampled samples per patch (16).
        upsample: integer upsampling factor ``f`` (4).

    Returns:
        ``patch_size x (patch_size / f + 2)`` matrix ``U``: upsampled sample ``q`` of a patch equals
        ``sum_j U[q, j] * x_pad[v p + j]`` where ``x_pad`` is the signal replicate-padded by one.
    """
    v = patch_size // upsample
    weights = torch.zeros(patch_size, v + 2, dtype=torch.float64)
    for q in range(patch_size):
        # Source coordinate relative to padded index v*p - 1 (see module docstring).
        rel = (q + 0.5) / upsample + 0.5
        i0 = int(rel // 1)
        lam = rel - i0
        weights[q, i0] += 1.0 - lam
        if lam > 0:
            weights[q, i0 + 1] += lam
    return weights


class PatchEmbed3d(nn.Module):
    """Tokens of a 1-channel volume: frozen SAM 2D patch conv + trainable depthwise slice merge, folded.

    Args:
        embed_dim: token width C.
        patch_size: SAM's 2D patch size (16).
        upsample: the reference's upsampling factor (4); a token covers ``patch_size / upsample`` voxels.
        in_chans: channels of SAM's patch conv (3, RGB); a CT slice is fed to all of them, so their weights
            are summed.
    """

    def __init__(self, embed_dim: int, patch_size: int = 16, upsample: int = 4, in_chans: int = 3) -> None:
        super().__init__()
        if patch_size % upsample:
            raise ValueError(f"patch_size {patch_size} is not divisible by upsample {upsample}")
        self.patch_size = patch_size
        self.upsample = upsample
        self.voxels_per_token = patch_size // upsample
        # Same names and shapes as SAM's `patch_embed.proj` so an official checkpoint loads 1:1.
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        # The reference's `slice_embed`: depthwise over 16 consecutive upsampled slices.
        self.slice_merge = nn.Conv3d(
            embed_dim, embed_dim, kernel_size=(1, 1, patch_size), stride=(1, 1, patch_size), groups=embed_dim
        )
        self.register_buffer("interp", upsample_weights(patch_size, upsample).float(), persistent=False)

    def folded_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single 3D conv equal to upsample + 2D embed + slice merge.

        Returns:
            weight ``C x 1 x (v+2) x (v+2) x (v+2)`` and bias ``C``.
        """
        w2d = self.proj.weight.sum(dim=1)  # C x P x P: one CT channel fed to R, G and B
        merge = self.slice_merge.weight.flatten(1)  # C x P
        u = self.interp.to(w2d.dtype)
        weight = torch.einsum("cab,cd,ai,bj,dk->cijk", w2d, merge, u, u, u).unsqueeze(1)
        bias = self.slice_merge.bias + self.proj.bias * merge.sum(dim=1)
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a volume.

        Args:
            x: ``B x 1 x X x Y x Z``, each size a multiple of ``voxels_per_token``.

        Returns:
            tokens ``B x X/v x Y/v x Z/v x C`` (channels last).
        """
        _check_volume(x, self.voxels_per_token)
        weight, bias = self.folded_kernel()
        x = F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate")
        tokens = F.conv3d(x, weight.to(x.dtype), bias.to(x.dtype), stride=self.voxels_per_token)
        return tokens.permute(0, 2, 3, 4, 1)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference computation (upsample, embed each axial slice, merge slices); same output as forward.

        Args:
            x: ``B x 1 x X x Y x Z``.

        Returns:
            tokens ``B x X/v x Y/v x Z/v x C``. Costs 64x the memory of ``forward``: for tests and documentation.
        """
        _check_volume(x, self.voxels_per_token)
        b = x.shape[0]
        up = F.interpolate(x, scale_factor=self.upsample, mode="trilinear", align_corners=False)
        depth = up.shape[-1]
        slices = up.permute(0, 4, 1, 2, 3).reshape(b * depth, 1, up.shape[2], up.shape[3])
        emb = self.proj(slices.expand(-1, self.proj.in_channels, -1, -1))  # (B*fZ) x C x gx x gy
        emb = emb.reshape(b, depth, *emb.shape[1:]).permute(0, 2, 3, 4, 1)  # B x C x gx x gy x fZ
        return self.slice_merge(emb).permute(0, 2, 3, 4, 1)


def _check_volume(x: torch.Tensor, multiple: int) -> None:
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"teacher input must be B x 1 x X x Y x Z, got shape {tuple(x.shape)}")
    if any(s % multiple for s in x.shape[2:]):
        raise ValueError(f"teacher input spatial size {tuple(x.shape[2:])} must be multiples of {multiple} voxels")
