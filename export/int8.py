"""INT8 post-training quantisation: OpenVINO through NNCF (accuracy-controlled) and ONNX Runtime (static QDQ).

NNCF's accuracy-controlled mode quantises everything, measures the validation metric, and if the drop
exceeds ``max_drop`` ranks the quantised operations by their contribution to the error and returns them to
float one group at a time until the drop is within bound. The drop actually obtained is measured again
here on the returned model and written to the bundle.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from export.errors import ExportError
from export.parity import foreground_dice, logit_parity

ValidationItem = tuple[np.ndarray, "np.ndarray | None"]


def _compiled(model: Any, precision_hint: str = "f32"):
    import openvino as ov

    if isinstance(model, ov.Model):
        return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision_hint})
    return model


def dice_metric(num_classes: int, reference_labels: Sequence[np.ndarray]):
    """An NNCF validation function: mean foreground Dice of the model's argmax over validation crops.

    Args:
        num_classes: K.
        reference_labels: one ``roi`` label map per validation item (ground truth, or the FP32 model's
            argmax when the crops have no labels).

    Returns:
        ``validate(model, items) -> (mean Dice, per-item Dice)``; items are ``1 x C x roi`` arrays.
    """

    def validate(model: Any, items) -> tuple[float, list[float]]:
        compiled = _compiled(model)
        output = compiled.output(0)
        scores = []
        for x, target in zip(items, reference_labels):
            pred = np.asarray(compiled(x)[output])[0].argmax(0)
            scores.append(foreground_dice(pred, target, num_classes))
        return float(np.mean(scores)), scores

    return validate


def quantize_openvino(model, calibration: Sequence[np.ndarray], validation: Sequence[ValidationItem], num_classes: int,
                      max_drop: float = 0.01, ranking_subset_size: int | None = None,
                      max_restore_iterations: int | None = None,
                      min_fp32_dice: float = 0.0, fp32_modules: Sequence[str] = ()) -> tuple[Any, dict[str, Any]]:
    """Quantise an OpenVINO FP32 model to INT8 with accuracy control.

    Accuracy control needs a metric with signal. When the validation crops have labels and the FP32 model's
    Dice on them is below ``min_fp32_dice`` (a student that does not segment yet, e.g. Dice 0.02 over four
    crops, where rounding alone moves it by 0.01), a drop against it is noise and NNCF's layer ranking spends
    minutes chasing it. The model is then quantised by plain ``nncf.quantize`` (the first step accuracy
    control takes anyway); the drop is still measured and reported, with ``enforced: false``.

    Args:
        model: ``ov.Model`` (FP32).
        calibration: crops ``C x roi`` (a few suffice; each costs one forward pass per statistics step).
        validation: ``(C x roi crop, roi label or None)``; without labels the FP32 argmax is the reference.
        num_classes: K.
        max_drop: largest tolerated absolute drop of mean foreground Dice (0.01 = 1 Dice point).
        ranking_subset_size: validation items used to rank operations (default: NNCF's).
        max_restore_iterations: groups of operations returned to float at most (``None``: until the drop is
            within bound); each costs one compile and one validation pass.
        min_fp32_dice: below this FP32 Dice against labels the bound is not enforced (see above); 0 always
            enforces it.
        fp32_modules: PyTorch module names (prefixes, e.g. ``decoder2.conv_block``) whose operations stay in
            float32: NNCF's ignored scope, found through the weight names the ONNX export keeps
            (:func:`ops_of_modules`).

    Returns:
        ``(INT8 ov.Model, report)`` with ``fp32_dice``, ``int8_dice``, ``dice_drop``, ``within_bound``,
        ``enforced`` (accuracy control ran), ``offered`` (within bound, or not enforced), the INT8-vs-FP32
        logit parity on the validation crops, and timings.
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    start = time.perf_counter()
    fp32 = _compiled(model)
    val_inputs = [np.ascontiguousarray(x[None], np.float32) for x, _ in validation]
    fp32_logits = [np.asarray(fp32(x)[0]) for x in val_inputs]
    with_labels = all(label is not None for _, label in validation)
    targets = [label if with_labels else logits[0].argmax(0) for (_, label), logits in zip(validation, fp32_logits)]
    validate = dice_metric(num_classes, targets)
    calib = nncf.Dataset([np.ascontiguousarray(x[None], np.float32) for x in calibration])
    kept = ops_of_modules(model, fp32_modules)
    scope = {"ignored_scope": nncf.IgnoredScope(names=kept)} if kept else {}
    fp32_dice, _ = validate(fp32, val_inputs)
    report = {"calibration_crops": len(calibration), "max_drop": float(max_drop), "fp32_dice": fp32_dice,
              "fp32_modules": list(fp32_modules), "fp32_ops": kept,
              "metric": "mean foreground Dice vs " + ("labels" if with_labels else "the FP32 model's argmax")}
    report.update(_enforcement(fp32_dice, with_labels, min_fp32_dice))
    if not report["enforced"]:
        quantized = nncf.quantize(model, calib, subset_size=len(calibration), model_type=nncf.ModelType.TRANSFORMER,
                                  **scope)
        report.update(method="nncf.quantize", nncf_log=[])
    else:
        # NNCF reports the initial drop and what it reverted only in its log; keep those lines for the report.
        restorer_log = _LogLines(("drop", "quantized operations", "revert", "removed", "iteration", "metric"))
        nncf_logger = logging.getLogger("nncf")
        nncf_logger.addHandler(restorer_log)
        try:
            quantized = nncf.quantize_with_accuracy_control(
                model,
                calib,
                nncf.Dataset(val_inputs),
                validation_fn=validate,
                max_drop=float(max_drop),
                drop_type=nncf.DropType.ABSOLUTE,
                subset_size=len(calibration),
                model_type=nncf.ModelType.TRANSFORMER,
                **scope,
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                    ranking_subset_size=ranking_subset_size, num_ranking_workers=1,
                    **({} if max_restore_iterations is None else {"max_num_iterations": int(max_restore_iterations)}),
                ),
            )
        finally:
            nncf_logger.removeHandler(restorer_log)
        report.update(method="nncf.quantize_with_accuracy_control", nncf_log=restorer_log.lines)
    # The drop is measured again on the returned model.
    int8_compiled = _compiled(quantized)
    int8_dice, _ = validate(int8_compiled, val_inputs)
    int8_logits = np.concatenate([np.asarray(int8_compiled(x)[0]) for x in val_inputs])
    within = bool(fp32_dice - int8_dice <= max_drop + 1e-9)
    report.update(
        model_type="TRANSFORMER",
        validation_crops=len(validation),
        int8_dice=int8_dice,
        dice_drop=fp32_dice - int8_dice,
        within_bound=within,
        offered=within or not report["enforced"],
        fake_quantize_ops=sum(1 for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize"),
        vs_fp32=logit_parity(np.concatenate(fp32_logits), int8_logits),
        seconds=time.perf_counter() - start,
    )
    return quantized, report


def ops_of_modules(model: Any, modules: Sequence[str]) -> list[str]:
    """Names of the OpenVINO operations whose weights belong to ``modules`` (PyTorch module-name prefixes).

    The ONNX export keeps each parameter's name on its initializer (``decoder2.conv_block.conv1.conv.weight``),
    and OpenVINO on the constant; an operation is matched through its weight input (past converts).
    A prefix that matches no operation is an error: a renamed module must not silently quantise everything.
    """
    if not modules:
        return []
    found: dict[str, list[str]] = {m: [] for m in modules}
    for op in model.get_ordered_ops():
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul") or op.get_input_size() < 2:
            continue
        node = op.input_value(1).get_node()
        while node.get_type_name() != "Constant" and node.get_input_size():
            node = node.input_value(0).get_node()
        weight = node.get_friendly_name()
        for m in modules:
            if weight == m or weight.startswith(m + "."):
                found[m].append(op.get_friendly_name())
    missing = [m for m, ops in found.items() if not ops]
    if missing:
        raise ExportError(f"export.int8_fp32_modules: no operation of the exported model has weights under {missing}")
    return sorted({name for ops in found.values() for name in ops})


class _LogLines(logging.Handler):
    """Collects the log lines that mention any of ``keywords``."""

    def __init__(self, keywords: Sequence[str]) -> None:
        super().__init__(level=logging.INFO)
        self.keywords, self.lines = tuple(keywords), []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if any(k in text.lower() for k in self.keywords):
            self.lines.append(text)


def _latency(session, feed: dict, repeats: int = 3) -> float:
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _enforcement(fp32_dice: float, with_labels: bool, min_fp32_dice: float) -> dict[str, Any]:
    """Whether an INT8 Dice bound is enforced: always against the FP32 argmax, against labels only from
    ``min_fp32_dice`` up (below it the model does not segment yet and a drop is noise)."""
    if with_labels and fp32_dice < float(min_fp32_dice):
        return {"enforced": False, "not_enforced_because": f"FP32 Dice {fp32_dice:.3f} on the validation crops is "
                                                           f"below min_fp32_dice {float(min_fp32_dice)}: a drop against it is noise"}
    return {"enforced": True}


def quantize_onnxruntime(onnx_path: str | Path, out_path: str | Path, calibration: Sequence[np.ndarray],
                         validation: Sequence[ValidationItem], num_classes: int, input_name: str,
                         max_drop: float = 0.01, threads: int = 2, repeats: int = 3,
                         min_fp32_dice: float = 0.0) -> dict[str, Any]:
    """Static INT8 (QDQ, per-channel weights) with ONNX Runtime: its Dice drop and patch latency against FP32.

    There is no accuracy-controlled fallback here; the caller offers the model only if it is faster and
    its drop is within ``max_drop`` or the bound is not enforced (``min_fp32_dice``, as in
    :func:`quantize_openvino`).

    Args:
        onnx_path: FP32 model.
        out_path: where the INT8 model is written.
        calibration: crops ``C x roi``.
        validation: ``(C x roi crop, roi label or None)``; without labels the FP32 argmax is the reference.
        num_classes: K.
        input_name: the graph input.
        max_drop: largest tolerated absolute drop of mean foreground Dice.
        threads: intra-op threads for the latency comparison.
        repeats: timed runs (median reported) after one warm-up.
        min_fp32_dice: below this FP32 Dice against labels the bound is not enforced.

    Returns:
        ``{"fp32_patch_s", "int8_patch_s", "speedup", "faster", "fp32_dice", "int8_dice", "dice_drop",
        "within_bound", "enforced", "vs_fp32": parity}`` (and ``not_enforced_because`` when not enforced).
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter([{input_name: np.ascontiguousarray(x[None], np.float32)} for x in calibration])

        def get_next(self):
            return next(self._items, None)

    start = time.perf_counter()
    quantize_static(str(onnx_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    fp32 = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(out_path), options, providers=["CPUExecutionProvider"])
    feed = {input_name: np.ascontiguousarray(calibration[0][None], np.float32)}
    fp32_s, int8_s = _latency(fp32, feed, repeats), _latency(int8, feed, repeats)
    fp32_logits, int8_logits = [], []
    for crop, _ in validation:
        x = {input_name: np.ascontiguousarray(crop[None], np.float32)}
        fp32_logits.append(fp32.run(None, x)[0])
        int8_logits.append(int8.run(None, x)[0])
    targets = [label if label is not None else ref[0].argmax(0) for (_, label), ref in zip(validation, fp32_logits)]
    fp32_dice = float(np.mean([foreground_dice(o[0].argmax(0), t, num_classes) for o, t in zip(fp32_logits, targets)]))
    int8_dice = float(np.mean([foreground_dice(o[0].argmax(0), t, num_classes) for o, t in zip(int8_logits, targets)]))
    parity = logit_parity(np.concatenate(fp32_logits), np.concatenate(int8_logits))
    return {
        "method": "onnxruntime.quantization.quantize_static (QDQ, per-channel s8 weights, u8 activations)",
        "threads": threads,
        "fp32_patch_s": fp32_s,
        "int8_patch_s": int8_s,
        "speedup": fp32_s / int8_s,
        "faster": bool(int8_s < fp32_s),
        "fp32_dice": fp32_dice,
        "int8_dice": int8_dice,
        "dice_drop": fp32_dice - int8_dice,
        "within_bound": bool(fp32_dice - int8_dice <= max_drop + 1e-9),
        **_enforcement(fp32_dice, all(label is not None for _, label in validation), min_fp32_dice),
        "vs_fp32": parity,
        "seconds": time.perf_counter() - start,
    }
