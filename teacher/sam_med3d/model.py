"""SAM-Med3D assembled (image encoder, prompt encoder, mask decoder) and its named configurations.

``vit_b_ori`` is the published architecture of ``sam_med3d_turbo.pth`` and the paper's ViT-B model:
128³ crops, 16³ patches (8³ tokens), width 768, 12 blocks × 12 heads, window 14 with global attention in
blocks 2, 5, 8, 11, neck to 384, prompt/decoder width 384, low-res masks 32³. ``small`` is the same design
at the scale of the 4 mm phantoms (64³ crops, 8³ tokens, width 96, 4 blocks) for CPU demos; ``tiny`` keeps
every code path at a size that runs in milliseconds on a CPU (tests).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from teacher.sam_med3d.image_encoder import ImageEncoderViT3D
from teacher.sam_med3d.mask_decoder import MaskDecoder3D
from teacher.sam_med3d.prompt_encoder import PromptEncoder3D

SAM_MED3D_PRESETS: dict[str, dict[str, Any]] = {
    "vit_b_ori": dict(
        img_size=128, patch_size=16, embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11),
        window_size=14, prompt_dim=384, mask_in_chans=16, decoder_mlp_dim=2048, decoder_heads=8,
    ),
    # The 4 mm phantoms on a CPU (configs/sam_med3d_demo.yaml): a 64³ crop (256 mm, a whole phantom) in 8³
    # tokens of 8³ voxels, ViT-B's token grid and decoder unchanged (low-res logits 32³, 1/2 per axis).
    "small": dict(
        img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=4, global_attn_indexes=(1, 3),
        window_size=4, prompt_dim=96, mask_in_chans=16, decoder_mlp_dim=256, decoder_heads=4,
    ),
    "tiny": dict(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, global_attn_indexes=(1,),
        window_size=6, prompt_dim=48, mask_in_chans=8, decoder_mlp_dim=64, decoder_heads=8,
    ),
}


class SamMed3D(nn.Module):
    """The SAM-Med3D network; a state dict of it has the keys of the published checkpoints.

    Args:
        image_encoder: 3D ViT.
        prompt_encoder: points/mask prompts.
        mask_decoder: two-way transformer decoder.
    """

    def __init__(
        self, image_encoder: ImageEncoderViT3D, prompt_encoder: PromptEncoder3D, mask_decoder: MaskDecoder3D
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    @property
    def img_size(self) -> int:
        """Crop edge in voxels (128)."""
        return self.image_encoder.img_size

    @property
    def low_res_size(self) -> tuple[int, int, int]:
        """Edge of the decoder's mask logits (32³ for ViT-B)."""
        return self.prompt_encoder.mask_input_size

    def decode(
        self,
        image_embeddings: torch.Tensor,
        points: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        mask_inputs: Optional[torch.Tensor] = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompted decoding of precomputed embeddings (an encoder pass serves many clicks).

        Args:
            image_embeddings: ``B x C x X' x Y' x Z'`` from ``image_encoder``.
            points: ``(coords B x N x 3, labels B x N)`` in crop voxel coordinates, or None.
            mask_inputs: previous low-res logits ``B x 1 x 32³`` (dense prompt), or None.
            multimask_output: three ambiguity masks instead of one.

        Returns:
            low-res logits ``B x M x 32³`` and IoU predictions ``B x M``.
        """
        sparse, dense = self.prompt_encoder(points, mask_inputs, batch_size=image_embeddings.shape[0])
        return self.mask_decoder(
            image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output
        )

    def forward(
        self,
        image: torch.Tensor,
        points: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        mask_inputs: Optional[torch.Tensor] = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ``B x 1 x 128³`` (z-scored, see ``preprocess``) → low-res logits ``B x M x 32³``, IoU ``B x M``."""
        return self.decode(self.image_encoder(image), points, mask_inputs, multimask_output)


def build_sam_med3d(
    checkpoint: Optional[str | Path] = None, preset: str = "vit_b_ori", **overrides: Any
) -> SamMed3D:
    """Build SAM-Med3D, optionally loading a published checkpoint with strict key matching.

    Args:
        checkpoint: ``.pth`` file with weights under ``model_state_dict`` (or a bare state dict); None =
            random initialisation.
        preset: a key of ``SAM_MED3D_PRESETS`` (``vit_b_ori`` is the published architecture).
        **overrides: replace preset fields (e.g. ``depth=4``).

    Returns:
        The model in eval mode.
    """
    if preset not in SAM_MED3D_PRESETS:
        raise ValueError(f"unknown SAM-Med3D preset {preset!r}; choose from {sorted(SAM_MED3D_PRESETS)}")
    unknown = set(overrides) - set(SAM_MED3D_PRESETS[preset])
    if unknown:
        raise ValueError(f"unknown SAM-Med3D option(s) {sorted(unknown)}; known: {sorted(SAM_MED3D_PRESETS[preset])}")
    p = {**SAM_MED3D_PRESETS[preset], **overrides}
    grid = p["img_size"] // p["patch_size"]
    model = SamMed3D(
        ImageEncoderViT3D(
            img_size=p["img_size"], patch_size=p["patch_size"], embed_dim=p["embed_dim"], depth=p["depth"],
            num_heads=p["num_heads"], out_chans=p["prompt_dim"], window_size=p["window_size"],
            global_attn_indexes=tuple(p["global_attn_indexes"]),
        ),
        PromptEncoder3D(
            embed_dim=p["prompt_dim"], image_embedding_size=(grid,) * 3,
            input_image_size=(p["img_size"],) * 3, mask_in_chans=p["mask_in_chans"],
        ),
        MaskDecoder3D(
            transformer_dim=p["prompt_dim"], transformer_heads=p["decoder_heads"],
            transformer_mlp_dim=p["decoder_mlp_dim"],
        ),
    )
    if checkpoint is not None:
        from teacher.sam_med3d.checkpoint import load_sam_med3d_checkpoint

        load_sam_med3d_checkpoint(checkpoint, model)
    return model.eval()
