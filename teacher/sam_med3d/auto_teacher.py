"""Automatic multi-class SAM-Med3D teacher: no clicks, K classes (background included), for distillation.

How K classes come out of a decoder built for one mask: one decoder pass per class, batched. Each pass
gets the same image embedding, the same dense prompt (SAM-Med3D's "no mask" embedding plus the auto
prompt generator's output) and one learned class token as its sparse prompt (in the place of a click);
the decoder's single-mask output of pass k is class k's logit map. This keeps every pretrained decoder
weight loadable and used as published (k extra mask tokens would change ``mask_tokens``' shape); the
decoder is cheap next to the encoder (8³ image tokens), so K passes cost little.

Fine-tuning is parameter-efficient when real weights are loaded: the image and prompt encoders are frozen
and LoRA (rank r, q and v of every fused qkv) is the only trainable part of the encoder; the decoder,
the APG and the class tokens train fully. From random weights nothing is frozen (frozen random weights
carry nothing).

Distillation cache: store ``forward_low_res`` output, the native ``B x K x 32³`` logits of each 128³
window, as float16 (64× smaller than full-resolution logits), and upsample ×4 trilinearly at load time
(``upsample_logits``) — that is exactly what ``forward`` computes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from teacher.sam_med3d.auto_prompt import AutoPromptNet3D
from teacher.sam_med3d.lora import inject_lora_qkv
from teacher.sam_med3d.model import SamMed3D

PEFT_MODES = ("lora", "none")


def upsample_logits(low_res: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Cached native logits ``B x K x 32³`` (any float dtype) → ``B x K x *size`` float32, trilinear."""
    return F.interpolate(low_res.float(), size=size, mode="trilinear", align_corners=False)


class SamMed3DAutoTeacher(nn.Module):
    """SAM-Med3D with an auto prompt generator and a K-class head.

    Args:
        sam: the SAM-Med3D network (pretrained or random).
        num_classes: K, background included.
        peft: ``lora`` (frozen encoder + LoRA on qkv) or ``none`` (everything trains) — applies when
            ``freeze_encoder`` is True.
        lora_rank: LoRA rank.
        freeze_encoder: freeze the pretrained image and prompt encoders (True when weights were loaded).
        apg_hidden: width of the auto prompt generator.
    """

    def __init__(
        self,
        sam: SamMed3D,
        num_classes: int,
        peft: str = "lora",
        lora_rank: int = 4,
        freeze_encoder: bool = True,
        apg_hidden: int = 64,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts background and must be >= 2, got {num_classes}")
        if peft not in PEFT_MODES:
            raise ValueError(f"teacher.peft={peft!r} is not supported by the sam_med3d backbone; choose from {PEFT_MODES}")
        self.sam = sam
        self.num_classes = num_classes
        dim = sam.prompt_encoder.embed_dim
        self.auto_prompt = AutoPromptNet3D(dim, apg_hidden)
        self.class_tokens = nn.Embedding(num_classes, dim)
        # Only the single-mask output is used: the IoU head and the ambiguity masks' hypernetworks never
        # reach the loss, so they stay as loaded instead of holding optimizer state.
        unused = [sam.mask_decoder.iou_prediction_head, *sam.mask_decoder.output_hypernetworks_mlps[1:]]
        for p in (p for m in unused for p in m.parameters()):
            p.requires_grad_(False)
        if freeze_encoder:
            for p in list(sam.image_encoder.parameters()) + list(sam.prompt_encoder.parameters()):
                p.requires_grad_(False)
            if peft == "lora":
                inject_lora_qkv(sam.image_encoder, lora_rank)

    def forward_low_res(
        self, image: torch.Tensor, points: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    ) -> torch.Tensor:
        """Image ``B x 1 x 128³`` → native logits ``B x K x 32³`` (what the distillation cache stores).

        Args:
            image: preprocessed crop.
            points: optional clicks ``(coords B x N x 3, labels B x N)`` shared by every class pass.
        """
        emb = self.sam.image_encoder(image)
        b, c = emb.shape[:2]
        k = self.num_classes
        dense = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, c, 1, 1, 1) + self.auto_prompt(emb)
        sparse = self.class_tokens.weight[None].expand(b, -1, -1).reshape(b * k, 1, c)
        if points is not None:
            clicks = self.sam.prompt_encoder.embed_points(*points)
            sparse = torch.cat([sparse, clicks.repeat_interleave(k, dim=0)], dim=1)
        logits, _ = self.sam.mask_decoder(
            emb.repeat_interleave(k, dim=0),
            self.sam.prompt_encoder.get_dense_pe(),
            sparse,
            dense.repeat_interleave(k, dim=0),
        )
        return logits.reshape(b, k, *logits.shape[2:])

    def forward(
        self, image: torch.Tensor, points: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    ) -> torch.Tensor:
        """Image ``B x 1 x X x Y x Z`` (X = Y = Z = 128, preprocessed) → logits ``B x K x X x Y x Z``."""
        return upsample_logits(self.forward_low_res(image, points), tuple(image.shape[2:]))
