"""Export stage: student → ONNX (parity-checked) → OpenVINO IR FP32 / INT8 (NNCF) → deploy bundle."""
from export.bundle import build_bundle, library_versions
from export.errors import ExportError
from export.onnx_export import export_onnx

__all__ = ["ExportError", "build_bundle", "export_onnx", "library_versions"]
