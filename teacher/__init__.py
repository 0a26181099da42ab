"""The teacher stage: SAM's ViT adapted to 3D (3DSAM-adapter + AutoProSAM), its checkpoints and presets."""
from teacher.arch import TeacherArch
from teacher.build import PRESETS, TeacherConfigError, build_teacher, teacher_arch
from teacher.checkpoint import TeacherCheckpointError, load_teacher, save_teacher
from teacher.sam_weights import SamCheckpointError, SamLoadReport, load_sam_state_dict
from teacher.model import Teacher3D, count_parameters

__all__ = [
    "PRESETS",
    "SamCheckpointError",
    "SamLoadReport",
    "Teacher3D",
    "TeacherArch",
    "TeacherCheckpointError",
    "TeacherConfigError",
    "build_teacher",
    "count_parameters",
    "load_sam_state_dict",
    "load_teacher",
    "save_teacher",
    "teacher_arch",
]
