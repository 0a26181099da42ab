"""Teacher presets and the factory that builds a teacher from the ``teacher:`` section of a run config.

Like segment_anything's ``build_sam.py``: a registry of named sizes built by one function. ``vit_b``/``vit_l``/
``vit_h`` are the SAM encoders with the paper's 3D configuration (128^3 crops -> 32^3 tokens, 8^3 windows);
``tiny`` is the same architecture with a small ViT for CPU runs (2.0M parameters at 64^3 crops).
"""
from __future__ import annotations

import copy
import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

from configs.schema import BACKBONE_DEFAULTS, TeacherConfig
from teacher.arch import TeacherArch
from teacher.sam_weights import load_sam_state_dict
from teacher.model import Teacher3D, count_parameters

PRESETS: dict[str, TeacherArch] = {
    "vit_b": TeacherArch(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": TeacherArch(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": TeacherArch(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    "tiny": TeacherArch(
        embed_dim=128, depth=4, num_heads=4, sam_img_size=256, global_attn_indexes=(),
        neck_dim=64, decoder_dim=32, apg_base=16, prompt_heads=4, prompt_mlp_dim=256, roi_size=(64, 64, 48),
    ),
}


# "sam2d": SAM's 2D ViT adapted to 3D (3DSAM-adapter + AutoProSAM); "sam_med3d": SAM-Med3D (teacher/sam_med3d/).
BACKBONES = ("sam2d", "sam_med3d")


class TeacherConfigError(ValueError):
    """A ``teacher:`` config section that cannot be built; the message names the key."""


def teacher_arch(cfg_teacher: Mapping[str, Any]) -> TeacherArch:
    """The architecture a config asks for: ``preset``, then ``roi_size`` and optional ``arch: {field: value}``.

    Args:
        cfg_teacher: the ``teacher:`` section.
    """
    preset = cfg_teacher.get("preset") or BACKBONE_DEFAULTS["sam2d"]["preset"]
    if preset not in PRESETS:
        raise TeacherConfigError(f"teacher.preset: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    overrides = dict(cfg_teacher.get("arch") or {})
    if "roi_size" in cfg_teacher and cfg_teacher["roi_size"] is not None:
        overrides["roi_size"] = cfg_teacher["roi_size"]
    fields = {f.name for f in dataclasses.fields(TeacherArch)}
    for key in overrides:
        if key not in fields:
            raise TeacherConfigError(f"teacher.arch.{key}: unknown architecture field; known: {sorted(fields)}")
    for key in ("roi_size", "global_attn_indexes"):
        if key in overrides:
            overrides[key] = tuple(int(v) for v in overrides[key])
    try:
        return dataclasses.replace(PRESETS[preset], **overrides)
    except (TypeError, ValueError) as exc:
        raise TeacherConfigError(f"teacher (preset {preset!r}, overrides {overrides}): {exc}") from exc


def teacher_from_config(cfg_teacher: Mapping[str, Any], num_classes: int) -> Teacher3D:
    """Construct the teacher a config describes, without loading weights or printing (used by ``load_teacher``)."""
    model = Teacher3D(
        teacher_arch(cfg_teacher),
        num_classes,
        peft=cfg_teacher.get("peft") or BACKBONE_DEFAULTS["sam2d"]["peft"],
        lora_rank=int(cfg_teacher.get("lora_rank", TeacherConfig.lora_rank)),
        prompt_mode=cfg_teacher.get("prompt_mode", TeacherConfig.prompt_mode),
    )
    model.grad_checkpointing = bool(cfg_teacher.get("grad_checkpointing", TeacherConfig.grad_checkpointing))
    model.teacher_cfg = copy.deepcopy(dict(cfg_teacher))
    return model


def build_teacher(cfg_teacher: Mapping[str, Any], num_classes: int, checkpoint: str | Path | None = None) -> Teacher3D:
    """Build the teacher, load official SAM weights when there are some, and set what trains.

    With a checkpoint the reused SAM weights are frozen (PEFT). Without one the encoder is random, a loud
    warning says so, and the whole model trains.

    Args:
        cfg_teacher: the ``teacher:`` config section (preset, checkpoint, peft, lora_rank, prompt_mode,
            roi_size, grad_checkpointing; optional ``arch`` overrides of :class:`TeacherArch` fields).
        num_classes: K, background included.
        checkpoint: SAM checkpoint path; overrides ``cfg_teacher["checkpoint"]``.

    Returns:
        the teacher (train mode).
    """
    checkpoint = checkpoint if checkpoint is not None else cfg_teacher.get("checkpoint")
    backbone = cfg_teacher.get("backbone", TeacherConfig.backbone)
    if backbone not in BACKBONES:
        raise TeacherConfigError(f"teacher.backbone: unknown backbone {backbone!r}; choose from {list(BACKBONES)}")
    if backbone == "sam_med3d":
        from teacher.sam_med3d.build import build_sam_med3d_teacher

        model = build_sam_med3d_teacher(dict(cfg_teacher), num_classes, checkpoint or None)
        model.teacher_cfg = copy.deepcopy(dict(cfg_teacher))
        model.encoder_pretrained = bool(checkpoint)
        if not checkpoint:
            print("WARNING teacher: NO SAM-Med3D CHECKPOINT - the encoder starts from RANDOM weights", file=sys.stderr)
        counts = count_parameters(model)
        print(f"teacher: backbone=sam_med3d trainable={counts['trainable']:,} frozen={counts['frozen']:,}", file=sys.stderr)
        return model
    model = teacher_from_config(cfg_teacher, num_classes)
    if checkpoint:
        report = load_sam_state_dict(checkpoint, model)
        model.teacher_cfg["checkpoint"] = str(checkpoint)
        print(f"teacher: {report.summary()}", file=sys.stderr)
    else:
        message = (
            "teacher: NO SAM CHECKPOINT - the encoder starts from RANDOM weights and the whole model trains "
            "(set teacher.checkpoint to sam_vit_b_01ec64.pth for the real teacher)"
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        print(f"WARNING {message}", file=sys.stderr)
        model.configure_trainable(pretrained=False)
    counts = count_parameters(model)
    print(
        f"teacher: preset={cfg_teacher.get('preset') or BACKBONE_DEFAULTS['sam2d']['preset']} peft={model.peft} "
        f"trainable={counts['trainable']:,} frozen={counts['frozen']:,}",
        file=sys.stderr,
    )
    return model
