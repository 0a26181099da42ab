"""SAM-Med3D teacher: automatic multi-class prompts (for distillation) and SAM-Med3D's own clicks.

How K classes come out of a decoder built for one mask: one decoder pass per class, batched. Each pass
gets the same image embedding, the same dense prompt (SAM-Med3D's "no mask" embedding plus the auto
prompt generator's output) and one learned class token as its sparse prompt (in the place of a click);
the decoder's single-mask output of pass k is class k's logit map. This keeps every pretrained decoder
weight loadable and used as published (k extra mask tokens would change ``mask_tokens``' shape); the
decoder is cheap next to the encoder (8³ image tokens), so K passes cost little.

The interactive path (``use_auto_prompt=False``) is SAM-Med3D's own, untouched: clicks as sparse prompt,
the previous prediction's low-resolution logits (or "no mask") as dense prompt, one binary mask out.
``teacher.train`` trains it in ``prompt_mode: points``; ``teacher.clicks`` evaluates it with
``SamMed3DClickSegmenter`` on ``self.sam`` (the same weights, LoRA included).

Fine-tuning is parameter-efficient when real weights are loaded: the image and prompt encoders are frozen
and LoRA (rank r, q and v of every fused qkv) is the only trainable part of the encoder; the decoder,
the APG and the class tokens train fully. From random weights nothing is frozen (frozen random weights
carry nothing).

Distillation cache (``distill.cache``): the teacher's logits are computed at their native resolution,
``forward_low_res`` (``B x K x 32³`` per 128³ window, 1/``low_res_factor`` per axis), blended over the
sliding windows on that grid, stored as float16, and upsampled ×``low_res_factor`` trilinearly at load
time (``upsample_logits``), which is exactly the step ``forward`` ends with.
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
        freeze_encoder: the encoders hold pretrained weights (True when a checkpoint was loaded): with ``lora``
            they are frozen and LoRA is added.
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
        if freeze_encoder and peft == "lora":  # peft "none" fine-tunes the pretrained encoders in full
            for p in list(sam.image_encoder.parameters()) + list(sam.prompt_encoder.parameters()):
                p.requires_grad_(False)
            inject_lora_qkv(sam.image_encoder, lora_rank)

    @property
    def low_res_factor(self) -> int:
        """Voxels per native logit along each axis (4 for ViT-B: 128³ crops, 32³ logits)."""
        return self.sam.img_size // self.sam.low_res_size[0]

    @property
    def grad_checkpointing(self) -> bool:
        return self.sam.image_encoder.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, enabled: bool) -> None:
        self.sam.image_encoder.grad_checkpointing = bool(enabled)

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

    def interactive_low_res(
        self,
        image: torch.Tensor,
        points: Optional[tuple[torch.Tensor, torch.Tensor]],
        mask_inputs: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """SAM-Med3D's click path: image ``B x 1 x 128³`` and clicks → one binary mask's logits ``B x 1 x 32³``.

        Args:
            image: preprocessed crop.
            points: ``(coords B x N x 3, labels B x N)`` in crop voxels (X, Y, Z), labels 1/0/-1.
            mask_inputs: the previous prediction's logits as dense prompt, low-res ``B x 1 x 32³`` or
                full-res ``B x 1 x 128³`` (resized trilinearly, as SAM-Med3D does); None = no mask.
        """
        if mask_inputs is not None and tuple(mask_inputs.shape[2:]) != self.sam.low_res_size:
            mask_inputs = F.interpolate(mask_inputs.float(), size=self.sam.low_res_size, mode="trilinear",
                                        align_corners=False)
        logits, _ = self.sam.decode(self.sam.image_encoder(image), points, mask_inputs)
        return logits

    def forward(
        self,
        image: torch.Tensor,
        points: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        use_auto_prompt: bool = True,
        mask_inputs: Optional[torch.Tensor] = None,
        low_res: bool = False,
    ) -> torch.Tensor:
        """Segment a crop (the signature of ``teacher.model.Teacher3D`` plus SAM-Med3D's mask prompt).

        Args:
            image: ``B x 1 x X x Y x Z`` (X = Y = Z = 128, preprocessed).
            points: optional clicks ``(coords B x N x 3, labels B x N)``, voxel coordinates X, Y, Z; labels
                1 positive, 0 negative, -1 padding.
            use_auto_prompt: True: the automatic K-class prediction (clicks, if any, added to every class
                pass); False: SAM-Med3D's interactive binary prediction (``interactive_low_res``).
            mask_inputs: previous logits for the interactive path (ignored with the automatic prompt).
            low_res: return the native logits instead of upsampling them to the crop.

        Returns:
            logits ``B x K x X x Y x Z`` (automatic) or ``B x 1 x X x Y x Z`` (interactive); at 1/``low_res_factor``
            per axis with ``low_res``.
        """
        if use_auto_prompt:
            low = self.forward_low_res(image, points)
        else:
            if points is None and mask_inputs is None:
                raise ValueError("the interactive path needs clicks or a mask prompt (use_auto_prompt=False)")
            low = self.interactive_low_res(image, points, mask_inputs)
        return low if low_res else upsample_logits(low, tuple(image.shape[2:]))
