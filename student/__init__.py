"""Students: small MONAI networks distilled from the teacher (SwinUNETR tiny/small, U-Nets)."""
from student.checkpoint import StudentCheckpointError, load_student, save_student
from student.complexity import count_params, describe
from student.registry import ARCH_OPTIONS, INT8_FP32_MODULES, STUDENTS, UnknownStudentError, arch_options, build_student, check_roi

__all__ = [
    "ARCH_OPTIONS",
    "INT8_FP32_MODULES",
    "STUDENTS",
    "arch_options",
    "StudentCheckpointError",
    "UnknownStudentError",
    "build_student",
    "check_roi",
    "count_params",
    "describe",
    "load_student",
    "save_student",
]
