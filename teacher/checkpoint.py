"""The teacher's own checkpoint, ``teacher.pt`` (docs/interfaces.md): saving, and rebuilding the model from it.
Loading official SAM weights into a fresh teacher is :mod:`teacher.sam_weights`."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import torch

from configs.schema import BACKBONE_DEFAULTS, TeacherConfig
from data.atomic import save_torch_atomic
from teacher.arch import TeacherArch
from teacher.build import teacher_from_config
from teacher.model import Teacher3D


class TeacherCheckpointError(ValueError):
    """A ``teacher.pt`` that cannot be loaded."""


def save_teacher(path: str | Path, model: torch.nn.Module, meta: Mapping[str, Any]) -> Path:
    """Write ``teacher.pt`` atomically: ``{"model": state_dict, **meta}`` (keys of docs/interfaces.md).

    ``teacher_cfg`` and ``num_classes`` default to the model's own; ``encoder_pretrained`` records whether the
    encoder holds SAM weights, so that loading restores the same frozen/trainable split.

    Args:
        path: destination file.
        model: a :class:`teacher.model.Teacher3D`.
        meta: the other checkpoint keys (labels, preprocess, roi_size, step, optimizer, ...).
    """
    ckpt = dict(meta)
    ckpt.setdefault("teacher_cfg", copy.deepcopy(getattr(model, "teacher_cfg", {})))
    ckpt.setdefault("num_classes", model.num_classes)
    ckpt["encoder_pretrained"] = bool(getattr(model, "encoder_pretrained", False))
    if ckpt["teacher_cfg"].get("backbone", TeacherConfig.backbone) == "sam_med3d":
        ckpt.setdefault("roi_size", [int(model.sam.img_size)] * 3)  # the preset fixes the crop
    else:
        ckpt.setdefault("roi_size", list(model.arch.roi_size))
        # The exact architecture, so a checkpoint rebuilds even if presets change later.
        ckpt["teacher_build"] = {
            "arch": model.arch.to_dict(), "peft": model.peft, "lora_rank": model.lora_rank,
            "prompt_mode": model.prompt_mode,
        }
    ckpt["model"] = model.state_dict()
    return save_torch_atomic(ckpt, path)


def load_teacher(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a teacher from ``teacher.pt``.

    Args:
        path: checkpoint written by :func:`save_teacher`.
        device: where to put the model.

    Returns:
        ``(model, meta)``: the model in eval mode, and every checkpoint key except ``model``.
    """

    path = Path(path)
    if not path.is_file():
        raise TeacherCheckpointError(f"teacher checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise TeacherCheckpointError(f"{path}: cannot be read as a teacher checkpoint ({exc})") from exc
    for key in ("model", "teacher_cfg", "num_classes"):
        if key not in ckpt:
            raise TeacherCheckpointError(f"{path}: missing key {key!r} (not a teacher.pt?)")
    build = ckpt.get("teacher_build")
    if ckpt["teacher_cfg"].get("backbone", TeacherConfig.backbone) == "sam_med3d":
        return _load_sam_med3d_teacher(path, ckpt, device)
    try:
        if build:
            model = Teacher3D(
                TeacherArch.from_dict(build["arch"]), int(ckpt["num_classes"]),
                peft=build["peft"], lora_rank=build["lora_rank"], prompt_mode=build["prompt_mode"],
            )
            model.teacher_cfg = dict(ckpt["teacher_cfg"])
        else:
            model = teacher_from_config(ckpt["teacher_cfg"], int(ckpt["num_classes"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise TeacherCheckpointError(f"{path}: cannot rebuild the teacher ({exc})") from exc
    model.grad_checkpointing = bool(ckpt["teacher_cfg"].get("grad_checkpointing", TeacherConfig.grad_checkpointing))
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        raise TeacherCheckpointError(f"{path}: weights do not match teacher_cfg {ckpt['teacher_cfg']} ({exc})") from exc
    model.configure_trainable(bool(ckpt.get("encoder_pretrained", False)))
    meta = {k: v for k, v in ckpt.items() if k != "model"}
    return model.to(device).eval(), meta


def _load_sam_med3d_teacher(path: Path, ckpt: dict[str, Any], device: str | torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a SAM-Med3D teacher (same frozen/LoRA structure as when it was trained)."""
    from teacher.sam_med3d.auto_teacher import SamMed3DAutoTeacher
    from teacher.sam_med3d.model import build_sam_med3d

    cfg = dict(ckpt["teacher_cfg"])
    pretrained = bool(ckpt.get("encoder_pretrained", False))
    try:
        model = SamMed3DAutoTeacher(
            build_sam_med3d(None, preset=cfg.get("preset") or BACKBONE_DEFAULTS["sam_med3d"]["preset"]), int(ckpt["num_classes"]),
            peft=cfg.get("peft") or BACKBONE_DEFAULTS["sam_med3d"]["peft"], lora_rank=int(cfg.get("lora_rank", TeacherConfig.lora_rank)), freeze_encoder=pretrained,
            apg_hidden=int(cfg.get("apg_hidden", TeacherConfig.apg_hidden)),
        )
        model.load_state_dict(ckpt["model"], strict=True)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise TeacherCheckpointError(f"{path}: cannot rebuild the SAM-Med3D teacher ({exc})") from exc
    model.teacher_cfg, model.encoder_pretrained = cfg, pretrained
    model.grad_checkpointing = bool(cfg.get("grad_checkpointing", TeacherConfig.grad_checkpointing))
    return model.to(device).eval(), {k: v for k, v in ckpt.items() if k != "model"}
