"""export.ir_compact: few-valued constants are stored as table + uint8 indices, with identical outputs."""
from __future__ import annotations

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from export.ir_compact import compact_constants


def _model(rng):
    x = ops.parameter([64, 256], ov.Type.f32, name="x")
    mask = np.where(rng.random((64, 256)) < 0.3, -100.0, 0.0).astype(np.float32)  # like a shifted-window mask
    weights = rng.normal(size=(256, 256)).astype(np.float32)  # as many values as elements: left alone
    y = ops.matmul(ops.add(x, ops.constant(mask)), ops.constant(weights), False, False)
    return ov.Model([y], [x], "m"), mask, weights


def test_compaction_is_lossless_and_shrinks_only_few_valued_constants(tmp_path):
    rng = np.random.default_rng(0)
    model, mask, weights = _model(rng)
    plain, compact = tmp_path / "plain.xml", tmp_path / "compact.xml"
    ov.save_model(model, str(plain), compress_to_fp16=False)
    report = compact_constants(model)
    ov.save_model(model, str(compact), compress_to_fp16=False)
    assert report == {"constants": 1, "bytes_before": mask.nbytes, "bytes_after": 2 * 4 + mask.size}
    saved = plain.with_suffix(".bin").stat().st_size - compact.with_suffix(".bin").stat().st_size
    assert mask.nbytes - mask.size - 64 <= saved <= mask.nbytes - mask.size  # table, axis and the Convert are bytes
    core = ov.Core()
    x = rng.normal(size=(64, 256)).astype(np.float32)
    a = core.compile_model(str(plain), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
    b = core.compile_model(str(compact), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, (x + mask) @ weights, rtol=1e-4, atol=1e-3)


def test_constants_with_many_values_or_few_bytes_are_kept(tmp_path):
    rng = np.random.default_rng(1)
    model, _, _ = _model(rng)
    assert compact_constants(model, min_bytes=10**8)["constants"] == 0
    assert compact_constants(model, max_values=1)["constants"] == 0
