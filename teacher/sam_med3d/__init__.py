"""SAM-Med3D (uni-medical, a SAM rebuilt in 3D and pre-trained on 22K medical volumes) as a teacher backbone.

Our own implementation of its architecture; parameter names and shapes match the published checkpoints
(``sam_med3d_turbo.pth``, ``vit_b_ori``), which load with strict key matching::

    sam = build_sam_med3d("sam_med3d_turbo.pth")            # interactive: SamMed3DTeacher(sam)
    teacher = build_sam_med3d_teacher(cfg["teacher"], num_classes=8, checkpoint="sam_med3d_turbo.pth")
"""
from teacher.sam_med3d.auto_teacher import SamMed3DAutoTeacher, upsample_logits
from teacher.sam_med3d.build import SamMed3DConfigError, build_sam_med3d_teacher
from teacher.sam_med3d.checkpoint import CheckpointMismatchError, load_sam_med3d_checkpoint
from teacher.sam_med3d.interactive import SamMed3DClickSegmenter, SamMed3DTeacher
from teacher.sam_med3d.model import SAM_MED3D_PRESETS, SamMed3D, build_sam_med3d
from teacher.sam_med3d.preprocess import crop_or_pad, paste_window, sam_med3d_preprocess_spec, zscore_foreground

__all__ = [
    "SAM_MED3D_PRESETS",
    "CheckpointMismatchError",
    "SamMed3D",
    "SamMed3DAutoTeacher",
    "SamMed3DClickSegmenter",
    "SamMed3DConfigError",
    "SamMed3DTeacher",
    "build_sam_med3d",
    "build_sam_med3d_teacher",
    "crop_or_pad",
    "load_sam_med3d_checkpoint",
    "paste_window",
    "sam_med3d_preprocess_spec",
    "upsample_logits",
    "zscore_foreground",
]
