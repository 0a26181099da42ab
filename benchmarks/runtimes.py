"""One model on one runtime at one precision and thread count, as a predictor on numpy patches.

A predictor maps a float32 ``B x 1 x X x Y x Z`` array to logits ``B x K x X x Y x Z``. Runtimes:
- ``pytorch``: eager ``nn.Module`` under ``torch.inference_mode``; bf16 via CPU autocast (what a user
  would switch on; norms and softmax stay FP32).
- ``onnxruntime``: one ``InferenceSession``, ``intra_op_num_threads = threads``, sequential execution.
- ``openvino``: ``compile_model`` on CPU with the LATENCY hint, one stream, ``INFERENCE_NUM_THREADS =
  threads`` and ``INFERENCE_PRECISION_HINT`` f32 or bf16 (INT8 IRs run with f32 for their
  non-quantised operations). The model is reshaped to the static patch shape first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

RUNTIMES = ("pytorch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")

Predictor = Callable[[np.ndarray], np.ndarray]


class RuntimeSpecError(ValueError):
    """A runtime/precision/model combination that cannot be built; the message names the model file."""


def model_files(entry: dict, runtime: str, precision: str) -> list[Path]:
    """Files a row runs from (for its size column), per runtime and precision.

    Args:
        entry: model entry (see ``benchmarks.latency.ModelEntry``) as a dict.
        runtime: one of ``RUNTIMES``.
        precision: one of ``PRECISIONS``.
    """
    if runtime == "onnxruntime":
        path = entry.get("onnx_int8") if precision == "int8" else entry.get("onnx")
        return [Path(path)] + _onnx_external_data(Path(path)) if path else []
    if runtime == "openvino":
        xml = (entry.get("openvino") or {}).get("int8" if precision == "int8" else "fp32")
        if xml:
            return [Path(xml), Path(xml).with_suffix(".bin")]
        return model_files(entry, "onnxruntime", "fp32") if precision != "int8" else []
    return []


def _onnx_external_data(path: Path) -> list[Path]:
    data = path.with_name(path.name + ".data")
    return [data] if data.is_file() else []


def available(entry: dict, runtime: str, precision: str, bf16_native: bool) -> bool:
    """Whether a row can be measured: the model file exists and the CPU supports the precision.

    Args:
        entry: model entry dict.
        runtime: one of ``RUNTIMES``.
        precision: one of ``PRECISIONS``.
        bf16_native: the CPU computes bf16 natively (``benchmarks.peak.cpu_supports_bf16``).
    """
    if precision == "bf16" and not bf16_native:
        return False
    if runtime == "pytorch":
        return entry.get("torch") is not None and precision in ("fp32", "bf16")
    if runtime == "onnxruntime":
        # ORT's CPU provider has no general bf16 kernels; INT8 only where export wrote a QDQ model.
        return precision == "fp32" and bool(entry.get("onnx")) or precision == "int8" and bool(entry.get("onnx_int8"))
    if runtime == "openvino":
        return bool(model_files(entry, runtime, precision))
    raise RuntimeSpecError(f"unknown runtime {runtime!r}; known: {RUNTIMES}")


def load_torch_model(torch_source: dict) -> tuple[Any, dict]:
    """Build the eager model a row runs.

    Args:
        torch_source: ``{"kind": "student", "path": student.pt}``, ``{"kind": "teacher", "path":
            teacher.pt}`` or ``{"kind": "arch", "name": student name, "num_classes": K}`` (random weights:
            latency does not depend on the values).

    Returns:
        ``(model in eval mode, meta)``.
    """
    kind = torch_source.get("kind")
    if kind == "student":
        from student import load_student

        return load_student(torch_source["path"])
    if kind == "teacher":
        from teacher.checkpoint import load_teacher

        return load_teacher(torch_source["path"])
    if kind == "arch":
        from student import build_student

        model = build_student(torch_source["name"], int(torch_source["num_classes"]), options=torch_source.get("options"))
        return model.eval(), {"arch": {"name": torch_source["name"], "num_classes": int(torch_source["num_classes"])}}
    raise RuntimeSpecError(f"unknown torch model source {torch_source!r} (kind: student | teacher | arch)")


def load_predictor(entry: dict, runtime: str, precision: str, threads: int, batch_shape: Sequence[int]) -> Predictor:
    """Build a predictor for one row.

    Args:
        entry: model entry dict (``torch`` source, ``onnx`` path, ``openvino`` IR paths).
        runtime: one of ``RUNTIMES``.
        precision: ``fp32``, ``bf16`` or ``int8``.
        threads: intra-op threads.
        batch_shape: the input shape ``B x 1 x X x Y x Z`` the predictor will be called with (OpenVINO
            compiles for it statically).
    """
    if runtime == "pytorch":
        return _torch_predictor(entry, precision, threads)
    if runtime == "onnxruntime":
        return _ort_predictor(entry, precision, threads)
    if runtime == "openvino":
        return _openvino_predictor(entry, precision, threads, batch_shape)
    raise RuntimeSpecError(f"unknown runtime {runtime!r}; known: {RUNTIMES}")


def _torch_predictor(entry: dict, precision: str, threads: int) -> Predictor:
    import torch

    torch.set_num_threads(threads)
    model, _ = load_torch_model(entry["torch"])
    if precision not in ("fp32", "bf16"):
        raise RuntimeSpecError(f"{entry.get('name')}: PyTorch eager runs fp32 or bf16, not {precision!r}")

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return out.float().numpy()

    return predict


def _ort_predictor(entry: dict, precision: str, threads: int) -> Predictor:
    import onnxruntime as ort

    files = model_files(entry, "onnxruntime", precision)
    if not files or not files[0].is_file():
        raise RuntimeSpecError(f"{entry.get('name')}: no ONNX model for onnxruntime/{precision} ({files})")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(files[0]), sess_options=opts, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return predict


def openvino_config(precision: str, threads: int) -> dict[str, str]:
    """CPU plugin properties for a latency row (the same ones ``benchmark_app`` is given)."""
    return {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": str(threads),
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
    }


def _openvino_predictor(entry: dict, precision: str, threads: int, batch_shape: Sequence[int]) -> Predictor:
    import openvino as ov

    files = model_files(entry, "openvino", precision)
    if not files or not files[0].is_file():
        raise RuntimeSpecError(f"{entry.get('name')}: no model for openvino/{precision} ({files})")
    core = ov.Core()
    model = core.read_model(str(files[0]))
    model.reshape({model.inputs[0].get_any_name(): ov.PartialShape([int(s) for s in batch_shape])})
    compiled = core.compile_model(model, "CPU", openvino_config(precision, threads))
    request = compiled.create_infer_request()

    def predict(x: np.ndarray) -> np.ndarray:
        request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        # copy: the output tensor's memory is reused by the next inference
        return np.array(request.get_output_tensor(0).data, copy=True)

    return predict
