"""ONNX export of a student at its fixed ROI.

SwinUNETR's window partitioning fixes the spatial size at export time, so the ROI is static. The batch
axis is exported dynamic and kept only if ONNX Runtime and OpenVINO both reproduce PyTorch at batch 1 and
2 (:func:`dynamic_batch_works`); otherwise the caller re-exports with a static batch.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

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
        # Our own optimisation (optimize_graph) in place of the exporter's optimize=True: the same file for the
        # students in 40 % less export time (see optimize_graph).
        program = torch.onnx.export(model, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    opset_version=opset, dynamo=True, dynamic_shapes=dynamic_shapes, optimize=False,
                                    verbose=False)
    if program is None:
        raise ExportError(f"{path}: torch.onnx.export returned no program")
    optimize_graph(program.model)
    check_conv_biases(program.model, path)
    # > 2 GB cannot live in one protobuf; students are far below that.
    program.save(str(path), external_data=False)
    if not path.is_file() or os.path.getsize(path) == 0:
        raise ExportError(f"{path}: ONNX export wrote nothing")
    return path


def optimize_graph(model: Any) -> None:
    """Optimise an exported ONNX IR model in place: the exporter's own optimiser (onnxscript's ``optimize_ir``)
    with the 9 of its 46 rewrite rules that change a student's graph.

    ``optimize=True`` spends most of SwinUNETR's export matching 46 rules against every node (252 385 tries for the
    tiny student, 60 of 94 s under a profiler). On SwinUNETR-tiny and -small only these rules fire: the exporter binds
    zero biases of the wrong shape to bias-free convolutions (``[C, 2]``; ONNX Runtime refuses them: "bias must be a 1D
    tensor"), which the bias rule removes, and transposes, reshapes and unsqueezes come in pairs that fold into one.
    The result is byte-identical to ``optimize=True`` for both students (test); the export of SwinUNETR-tiny at 64 x
    64 x 32 takes 15-17 s against 27-31 s (2 threads, AMD EPYC capped to AVX2 + FMA). A graph another rule would have
    changed is still correct, only less folded.
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding
    from onnxscript.rewriter.rules import common as rules

    fold = _constant_folding.FoldConstantsPass(shape_inference=True,
                                               input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                               output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                                               should_fold=lambda node: None)
    rewrite = rewriter.RewritePass([rules.remove_optional_bias_from_conv_rule, rules.transpose_transpose_rule,
                                    rules.no_op_transpose_rule, rules.reshape_reshape_rule,
                                    rules.unsqueeze_unsqueeze_rule, rules.cast_cast_rule, rules.no_op_cast_rule,
                                    rules.no_op_expand_rule, rules.materialize_reshape_shape_rule])
    # The order of onnxscript's optimize_ir (0.7), which makes the file identical to its output.
    ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager([fold, rewrite, common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
                               common.RemoveUnusedOpsetsPass()], steps=2, early_stop=True),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def check_conv_biases(model: Any, path: str | Path) -> None:
    """Refuse a graph with a convolution bias that is not ``[output channels]`` (ONNX Runtime would fail on it later,
    on first use, far from the export)."""
    for node in model.graph:
        if node.op_type not in ("Conv", "ConvTranspose") or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        bias, weight = node.inputs[2], node.inputs[1]
        shape = bias.shape if bias.shape is not None else getattr(bias.const_value, "shape", None)
        if shape is None:
            continue  # not known before shape inference
        shape = tuple(shape)
        out_channels = weight.shape[0] if node.op_type == "Conv" and weight.shape is not None else None
        if len(shape) != 1 or (out_channels is not None and shape[0] != out_channels):
            raise ExportError(f"{path}: {node.op_type} {node.name!r} has a bias of shape {shape}, not "
                              f"[{out_channels if out_channels is not None else 'C'}] (an exporter fault this "
                              "export's optimisation does not repair)")


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
