"""Config hook: ``teacher.backbone: sam_med3d`` builds the automatic SAM-Med3D teacher."""
from __future__ import annotations

from typing import Optional

from configs.schema import BACKBONE_DEFAULTS, TeacherConfig
from teacher.sam_med3d.auto_teacher import SamMed3DAutoTeacher
from teacher.sam_med3d.model import SAM_MED3D_PRESETS, build_sam_med3d


class SamMed3DConfigError(ValueError):
    """A teacher config section the sam_med3d backbone cannot use; the message names the key."""


def build_sam_med3d_teacher(
    cfg_teacher: dict, num_classes: int, checkpoint: Optional[str] = None
) -> SamMed3DAutoTeacher:
    """Build the automatic SAM-Med3D teacher from a config's ``teacher`` section.

    Keys read: ``preset`` (``vit_b_ori`` | ``tiny``, default ``vit_b_ori``), ``peft`` (``lora`` | ``none``),
    ``lora_rank``, ``apg_hidden`` (default 64), ``roi_size`` (must equal the preset's crop, 128³).

    Args:
        cfg_teacher: the ``teacher`` section (``backbone`` must be ``sam_med3d`` when present).
        num_classes: K, background included.
        checkpoint: published SAM-Med3D ``.pth``; None = random weights, whole network trainable.
    """
    backbone = cfg_teacher.get("backbone", "sam_med3d")
    if backbone != "sam_med3d":
        raise SamMed3DConfigError(f"teacher.backbone={backbone!r}: build_sam_med3d_teacher builds 'sam_med3d' only")
    preset = cfg_teacher.get("preset") or BACKBONE_DEFAULTS["sam_med3d"]["preset"]
    if preset not in SAM_MED3D_PRESETS:
        raise SamMed3DConfigError(f"teacher.preset={preset!r} is not a SAM-Med3D preset; choose from {sorted(SAM_MED3D_PRESETS)}")
    crop = SAM_MED3D_PRESETS[preset]["img_size"]
    roi = cfg_teacher.get("roi_size")
    if roi is not None and list(roi) != [crop] * 3:
        raise SamMed3DConfigError(f"teacher.roi_size={roi}: SAM-Med3D preset {preset!r} takes {[crop] * 3} crops")
    sam = build_sam_med3d(checkpoint, preset=preset)
    return SamMed3DAutoTeacher(
        sam,
        num_classes,
        peft=cfg_teacher.get("peft") or BACKBONE_DEFAULTS["sam_med3d"]["peft"],
        lora_rank=int(cfg_teacher.get("lora_rank", TeacherConfig.lora_rank)),
        freeze_encoder=checkpoint is not None,
        apg_hidden=int(cfg_teacher.get("apg_hidden", TeacherConfig.apg_hidden)),
    )
