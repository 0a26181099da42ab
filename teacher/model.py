"""Teacher3D: SAM adapted to 3D (3DSAM-adapter encoder + AutoProSAM prompt generator + point prompts + MLA decoder)."""
from __future__ import annotations

import torch
from torch import nn

from teacher.arch import TeacherArch
from teacher.decoder import MLADecoder
from teacher.encoder import ImageEncoder3d
from teacher.point_prompt import PointPromptEncoder
from teacher.prompt_generator import AutoPromptGenerator, apg_levels_for_grid

PEFT_MODES = ("adapter", "lora")
PROMPT_MODES = ("auto", "points", "both")


class PEFTConfigError(ValueError):
    """An unknown PEFT mode, prompt mode or LoRA rank."""


class Teacher3D(nn.Module):
    """3D segmentation teacher built on SAM's ViT.

    Args:
        arch: sizes (see :mod:`teacher.build` for presets).
        num_classes: K, background included.
        peft: "adapter" (spatial adapters; frozen SAM weights except norms) or "lora" (rank-r LoRA on q, v).
        lora_rank: LoRA rank for ``peft="lora"``.
        prompt_mode: the prompting the model is trained for ("auto", "points", "both"); recorded for training
            and inference code; every mode can be called on any model.
    """

    def __init__(
        self, arch: TeacherArch, num_classes: int, peft: str = "adapter", lora_rank: int = 4, prompt_mode: str = "auto"
    ) -> None:
        super().__init__()
        if peft not in PEFT_MODES:
            raise PEFTConfigError(f"teacher.peft must be one of {PEFT_MODES}, got {peft!r}")
        if prompt_mode not in PROMPT_MODES:
            raise PEFTConfigError(f"teacher.prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
        if peft == "lora" and int(lora_rank) <= 0:
            raise PEFTConfigError(f"teacher.lora_rank must be positive for peft='lora', got {lora_rank}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
        self.arch = arch
        self.num_classes = num_classes
        self.peft = peft
        self.lora_rank = int(lora_rank)
        self.prompt_mode = prompt_mode
        # The config section this model was built from (set by teacher.build); saved in teacher.pt.
        self.teacher_cfg: dict = {"peft": peft, "lora_rank": int(lora_rank), "prompt_mode": prompt_mode}
        # True once official SAM weights are loaded: only then does PEFT freezing apply.
        self.encoder_pretrained = False
        self.image_encoder = ImageEncoder3d(arch, peft=peft, lora_rank=int(lora_rank))
        grid = [s // arch.voxels_per_token for s in arch.roi_size]
        self.prompt_generator = AutoPromptGenerator(arch.neck_dim, arch.apg_base, apg_levels_for_grid(grid, arch.apg_levels))
        self.point_prompt = PointPromptEncoder(
            arch.neck_dim, arch.prompt_depth, arch.prompt_heads, arch.prompt_mlp_dim, arch.num_global_queries
        )
        self.decoder = MLADecoder(arch.neck_dim, arch.decoder_dim, num_classes)

    @property
    def grad_checkpointing(self) -> bool:
        return self.image_encoder.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, enabled: bool) -> None:
        self.image_encoder.grad_checkpointing = bool(enabled)

    def forward(
        self,
        image: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        use_auto_prompt: bool = True,
    ) -> torch.Tensor:
        """Segment a crop.

        Args:
            image: ``B x 1 x X x Y x Z``, X, Y, Z multiples of ``arch.voxels_per_token`` (4).
            points: optional ``(coords B x N x 3, labels B x N)``: voxel coordinates in X, Y, Z order; labels
                1 positive, 0 negative, -1 padding.
            use_auto_prompt: add the automatic prompt generator's dense prompt to the deepest feature.

        Returns:
            logits ``B x K x X x Y x Z``.
        """
        features = self.image_encoder(image)
        deepest = features[-1]
        if use_auto_prompt:
            deepest = deepest + self.prompt_generator(deepest)
        if points is not None:
            coords, labels = points
            deepest = self.point_prompt(deepest, coords.to(image.device), labels.to(image.device), tuple(image.shape[2:]))
        return self.decoder([*features[:-1], deepest], image)

    def frozen_parameter_names(self) -> set[str]:
        """Parameters PEFT freezes once SAM weights are loaded: the reused SAM weights (norms stay trainable
        with adapters, as in 3DSAM-adapter; with LoRA everything from SAM is frozen, as in SAMed)."""
        names = set()
        for key in self.image_encoder.sam_keys():
            if self.peft == "adapter" and (".norm1." in key or ".norm2." in key):
                continue
            names.add(f"image_encoder.{key}")
        return names

    def configure_trainable(self, pretrained: bool) -> None:
        """Set ``requires_grad``: with pretrained SAM weights freeze :meth:`frozen_parameter_names`, otherwise
        train everything (frozen random weights would carry nothing)."""
        self.encoder_pretrained = bool(pretrained)
        frozen = self.frozen_parameter_names() if pretrained else set()
        for name, param in self.named_parameters():
            param.requires_grad_(name not in frozen)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"trainable": n, "frozen": n}`` parameter counts of a model.

    Args:
        model: any module.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen}
