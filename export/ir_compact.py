"""Lossless shrinking of an OpenVINO IR before it is saved: large float constants that hold few distinct
values are stored as a small table plus uint8 indices, ``Gather(table, Convert(indices))``, which the CPU
plugin folds back into the original constant when it compiles the model.

Why the IR is larger than the weights: a SwinUNETR exported at a fixed ROI gets its shifted-window
attention masks as dense float32 constants, one ``windows x 1 x N x N`` tensor per stage (tiny student,
4^3 windows at 64 x 64 x 32: 256 x 64 x 64 = 4.2 MB for stage 1 alone) that hold only 0 and -100, and the
relative-position biases gathered into ``heads x N x N`` tensors. In the tiny student's FP32 IR they are
5.3 of 21 MB, in its INT8 IR 5.3 of 9.5 MB. The weights themselves have nearly as many distinct values as
elements and are left as they are; nothing is rounded.
"""
from __future__ import annotations

from typing import Any

import numpy as np

MIN_BYTES = 64 * 1024  # smaller constants are not worth a Gather


def compact_constants(model: Any, min_bytes: int = MIN_BYTES, max_values: int = 256) -> dict[str, Any]:
    """Replace, in place, each float32 constant of at least ``min_bytes`` with at most ``max_values``
    distinct values by a table of those values and uint8 indices into it.

    Args:
        model: an ``openvino.Model`` (changed in place).
        min_bytes: smallest constant considered.
        max_values: most distinct values (uint8 indices: at most 256).

    Returns:
        ``{"constants": how many were replaced, "bytes_before", "bytes_after"}`` of those constants.
    """
    import openvino as ov
    from openvino import opset13 as ops

    if not 1 <= max_values <= 256:
        raise ValueError(f"max_values must be in [1, 256] for uint8 indices, got {max_values}")
    replaced, before, after = 0, 0, 0
    for node in model.get_ops():
        if node.get_type_name() != "Constant" or node.get_output_element_type(0) != ov.Type.f32:
            continue
        data = node.get_data()
        if data.nbytes < min_bytes:
            continue
        values, inverse = np.unique(data, return_inverse=True)
        if values.size > max_values:
            continue
        table = ops.constant(values.astype(np.float32))
        indices = ops.constant(inverse.reshape(data.shape).astype(np.uint8))
        gather = ops.gather(table, ops.convert(indices, ov.Type.i32), ops.constant(np.int64(0)))
        gather.set_friendly_name(node.get_friendly_name())
        for target in list(node.output(0).get_target_inputs()):
            target.replace_source_output(gather.output(0))
        replaced += 1
        before += data.nbytes
        after += values.nbytes + data.size
    return {"constants": replaced, "bytes_before": int(before), "bytes_after": int(after)}
