"""ONNX export of a student at its fixed ROI.

SwinUNETR's window partitioning fixes the spatial size at export time, so the ROI is static. The batch
axis is exported dynamic and kept only if ONNX Runtime and OpenVINO both reproduce PyTorch at batch 1 and
2 (:func:`dynamic_batch_works`); otherwise the caller re-exports with a static batch.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from export.errors import ExportError

OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def export_onnx(model: nn.Module, roi_size: Sequence[int], path: str | Path, in_channels: int = 1,
                batch: int | str = "dynamic", opset: int = OPSET) -> Path:
    """Write ``model`` as a single self-contained ONNX file (weights embedded).

    Args:
        model: maps ``B x C x X x Y x Z`` to ``B x K x X x Y x Z``.
        roi_size: ``[X, Y, Z]`` fixed in the graph.
        path: destination ``.onnx``.
        in_channels: C.
        batch: ``"dynamic"`` or a static batch size.
        opset: ONNX opset (>= 18).
    """
    path = Path(path)
    example_batch = 2 if batch == "dynamic" else int(batch)
    example = torch.zeros(example_batch, in_channels, *[int(s) for s in roi_size])
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if batch == "dynamic" else None
    model = model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # optimize=True (the default) is required: the unoptimised SwinUNETR graph fails in ONNX Runtime
        # ("bias must be a 1D tensor"). It is also most of the export time.
        program = torch.onnx.export(model, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    opset_version=opset, dynamo=True, dynamic_shapes=dynamic_shapes, optimize=True,
                                    verbose=False)
    if program is None:
        raise ExportError(f"{path}: torch.onnx.export returned no program")
    # > 2 GB cannot live in one protobuf; students are far below that.
    program.save(str(path), external_data=False)
    if not path.is_file() or os.path.getsize(path) == 0:
        raise ExportError(f"{path}: ONNX export wrote nothing")
    return path


def onnx_logits(path: str | Path, batch: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Run an ONNX file with ONNX Runtime (CPU) on ``B x C x roi``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(batch, np.float32)})[0]


def dynamic_batch_works(path: str | Path, reference: np.ndarray, crops: np.ndarray, atol: float = 1e-2,
                        min_agreement: float = 0.999) -> tuple[bool, str]:
    """Whether a dynamic-batch ONNX file gives PyTorch's logits at batch 1 and 2 on both runtimes.

    A runtime that mishandles the dynamic axis is grossly wrong (or fails); batched kernels legitimately
    differ from batch-1 ones in the last float digits (OpenVINO: ~2e-3 on SwinUNETR logits), hence the
    tolerance on logits plus a check on the predicted classes.

    Args:
        path: ONNX file with a dynamic batch axis.
        reference: PyTorch logits of ``crops`` (``2 x K x roi``).
        crops: ``2 x C x roi``.
        atol: largest tolerated absolute logit difference.
        min_agreement: smallest tolerated fraction of voxels with the same argmax class.

    Returns:
        ``(ok, why)``.
    """
    import openvino as ov

    core = ov.Core()
    try:
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        worst = 0.0
        for n in (1, 2):
            for name, out in (("onnxruntime", onnx_logits(path, crops[:n])), ("openvino", compiled(crops[:n])[0])):
                out = np.asarray(out)
                diff = float(np.abs(out - reference[:n]).max())
                agreement = float((out.argmax(1) == reference[:n].argmax(1)).mean())
                if not (diff <= atol and agreement >= min_agreement):
                    return False, f"{name} batch {n}: max |logit diff| {diff:.3g}, argmax agreement {agreement:.4f}"
                worst = max(worst, diff)
    except Exception as exc:  # a runtime that cannot compile or run the dynamic graph: use a static batch
        return False, f"{type(exc).__name__}: {str(exc)[:200]}"
    return True, f"onnxruntime and openvino match PyTorch at batch 1 and 2 (max |logit diff| {worst:.3g})"
