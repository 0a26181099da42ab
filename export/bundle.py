"""The deployment bundle: ONNX + OpenVINO FP32/INT8 models, checked against PyTorch, with a manifest.

Layout (docs/interfaces.md)::

    model.json                  labels, preprocess spec, ROI, overlap, I/O names, parity, int8 report,
                                sha256 of every file, library versions, student arch/params/GFLOPs
    model.onnx                  FP32, opset 18, single file
    model_int8.onnx             ONNX Runtime INT8 (QDQ), only if it was faster than FP32 here
    openvino/model_fp32.xml|bin FP32 IR (also run at bf16 by the runtime where the CPU has it)
    openvino/model_int8.xml|bin NNCF INT8 IR, only if its Dice drop was within bound

The bundle is assembled in a temporary sibling folder and renamed into place: a reader sees the old
bundle or the complete new one, never a half-written one.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from data.atomic import write_json_atomic
from data.transforms import body_crop_spec
from deploy.bundle import FORMAT_VERSION, MANIFEST, file_sha256, load_bundle
from deploy.runtime import cpu_supports_bf16
from export.calibration import case_crops, dataset_crops
from export.checks import accuracy_checks
from export.errors import ExportError
from export.int8 import quantize_onnxruntime, quantize_openvino
from export.ir_compact import compact_constants
from export.onnx_export import INPUT_NAME, OPSET, OUTPUT_NAME, dynamic_batch_works, export_onnx, onnx_logits
from export.parity import batched, logit_parity
from student.checkpoint import load_student
from student.complexity import describe
from student.registry import INT8_FP32_MODULES, check_roi

def _as_items(source: Any, meta: dict, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray | None]] | None:
    """Normalise a crop source (dataset folder, crops, or (crop, label) pairs) to ``(C x roi, label)`` items."""
    if source is None:
        return None
    if isinstance(source, (str, Path)):
        return dataset_crops(source, meta["preprocess"], meta["roi_size"], count, seed=seed)
    source = list(source)
    if source and isinstance(source[0], Mapping):  # cases {"image": path, "label": path}, e.g. one split's
        return case_crops(source, meta["preprocess"], meta["roi_size"], count, seed=seed)
    items = []
    for entry in source:
        crop, label = entry if isinstance(entry, tuple) else (entry, None)
        crop = np.asarray(crop, np.float32)
        if crop.ndim == 3:
            crop = crop[None]
        if list(crop.shape[1:]) != [int(s) for s in meta["roi_size"]]:
            raise ExportError(f"crop of shape {crop.shape} does not match the student's ROI {meta['roi_size']}")
        items.append((crop, None if label is None else np.asarray(label).astype(np.int64)))
    if not items:
        raise ExportError("an empty list of crops was given")
    return items


def _dataset_of(meta: dict) -> Path | None:
    """The dataset a checkpoint was trained on, when its meta or config names a folder with dataset.json."""
    for candidate in (meta.get("dataset_dir"), ((meta.get("config") or {}).get("data") or {}).get("source")):
        if isinstance(candidate, (str, Path)) and (Path(candidate) / "dataset.json").is_file():
            return Path(candidate)
    return None


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced (and must run) the bundle."""
    out = {}
    for name in ("torch", "monai", "onnx", "onnxruntime", "openvino", "nncf", "numpy", "nibabel"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def build_bundle(student_ckpt: str | Path, out_dir: str | Path, calibration: Any = None, validation: Any = None,
                 int8: bool = True, max_dice_drop: float = 0.01, calibration_crops: int = 8, validation_crops: int = 4,
                 overlap: float = 0.25, threads: int = 2, onnxruntime_int8: bool = True, seed: int = 0,
                 max_restore_iterations: int | None = None, min_fp32_dice: float = 0.0, dynamic_batch: bool = True,
                 fp32_modules: Sequence[str] | None = None,
                 log=print) -> Path:
    """Export a student checkpoint to a verified deploy bundle.

    Args:
        student_ckpt: ``student.pt`` (``student.save_student``).
        out_dir: bundle folder to create (replaced atomically if it exists).
        calibration: a dataset folder (``dataset.json``; crops are drawn through the training
            preprocessing), a list of labelled cases ``{"image": path, "label": path}`` (the pipeline passes its
            training split), or crops ``C x roi`` / ``(crop, label)`` pairs. Used for INT8 calibration and as
            the parity crops. ``None``: the checkpoint's ``dataset_dir`` or ``config.data.source`` if that is a
            dataset folder; otherwise parity runs on random crops and INT8 is skipped.
        validation: as ``calibration``, for the INT8 accuracy check (labels give true Dice; without labels
            the FP32 model's argmax is the reference). Defaults to crops from ``calibration``.
        int8: also produce INT8 models.
        max_dice_drop: largest tolerated absolute drop of mean foreground Dice for the OpenVINO INT8 model.
        calibration_crops: crops drawn when ``calibration`` is a folder.
        validation_crops: crops drawn when ``validation`` is a folder (or split off ``calibration``).
        overlap: sliding-window overlap recorded for the runtime.
        threads: threads for the latency comparison of ONNX Runtime INT8 vs FP32.
        onnxruntime_int8: try ONNX Runtime static INT8 (offered only if faster than FP32 here and its Dice
            drop is within ``max_dice_drop``).
        seed: crop placement seed.
        max_restore_iterations: cap on NNCF's layer-by-layer fallback (``None``: until within bound); an INT8
            model still above the bound is reported and not offered.
        min_fp32_dice: below this FP32 Dice on labelled validation crops the INT8 bound is not enforced (the
            model does not segment yet, so a drop against it is noise): plain NNCF quantisation, drop reported,
            INT8 offered (``export.int8.quantize_openvino``).
        dynamic_batch: first export with a dynamic batch axis, kept only if both runtimes reproduce PyTorch at
            batch 1 and 2 (else a second export with batch 1). False: export batch 1 at once (SwinUNETR's
            dynamic batch has been rejected on every demo run, and the ONNX export is most of this stage).
        fp32_modules: PyTorch module names whose operations stay float32 in the OpenVINO INT8 model
            (``export.int8.quantize_openvino``); None: the student's default (``student.INT8_FP32_MODULES``).
        log: progress printer.

    Returns:
        the bundle folder.
    """
    import openvino as ov

    started = time.perf_counter()
    student_ckpt, out_dir = Path(student_ckpt), Path(out_dir)
    model, meta = load_student(student_ckpt)
    arch, roi = meta["arch"], [int(s) for s in meta["roi_size"]]
    check_roi(arch["name"], roi)
    in_channels, num_classes = int(arch.get("in_channels", 1)), int(arch["num_classes"])
    labels = {int(k): str(v) for k, v in meta["labels"].items()}
    if fp32_modules is None:
        fp32_modules = INT8_FP32_MODULES.get(arch["name"], ())
    if max(labels) + 1 != num_classes:
        raise ExportError(f"{student_ckpt}: labels {labels} do not match num_classes {num_classes}")

    if calibration is None:
        calibration = _dataset_of(meta)
    want_val = validation_crops if validation is None else 0
    calib_items = _as_items(calibration, meta, calibration_crops + want_val, seed)
    val_items = _as_items(validation, meta, validation_crops, seed + 1)
    if calib_items is not None and val_items is None:
        split = len(calib_items) - want_val if len(calib_items) > want_val else len(calib_items)
        calib_items, val_items = calib_items[:split], (calib_items[split:] or calib_items)
    if calib_items is not None:
        parity_crops, crop_kind = [c for c, _ in (val_items or calib_items)][:4], "preprocessed dataset crops"
    else:
        rng = np.random.default_rng(seed)
        parity_crops, crop_kind = [rng.uniform(0, 1, (in_channels, *roi)).astype(np.float32) for _ in range(2)], "random uniform [0, 1] crops (no calibration data given)"
    if len(parity_crops) < 2:
        parity_crops = parity_crops * 2

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        torch.set_grad_enabled(False)
        torch_logits = batched(lambda b: model(torch.from_numpy(b)).numpy(), parity_crops)

        log(f"[export] ONNX (opset {OPSET}) of {arch['name']} at ROI {roi}")
        batch: int | str = "dynamic" if dynamic_batch else 1
        onnx_path = export_onnx(model, roi, tmp / "model.onnx", in_channels, batch=batch)
        if dynamic_batch:
            ok, why = dynamic_batch_works(onnx_path, torch_logits[:2], np.stack(parity_crops[:2]))
            if not ok:
                log(f"[export] dynamic batch rejected ({why}); re-exporting with batch 1")
                batch = 1
                export_onnx(model, roi, onnx_path, in_channels, batch=1)
        else:
            why = "not tried (export.dynamic_batch: false)"
        parity: dict[str, Any] = {"crops": crop_kind, "num_crops": len(parity_crops), "dynamic_batch_check": why}
        parity["onnxruntime_fp32"] = logit_parity(torch_logits, batched(lambda b: onnx_logits(onnx_path, b), parity_crops))

        log("[export] OpenVINO IR FP32")
        ov_dir = tmp / "openvino"
        ov_dir.mkdir()
        ov_model = ov.convert_model(str(onnx_path))
        compaction = {"fp32": _save_compact(ov_model, ov_dir / "model_fp32.xml")}
        core = ov.Core()
        fp32 = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        parity["openvino_fp32"] = logit_parity(torch_logits, batched(lambda b: fp32(b)[0], parity_crops))
        models: dict[str, dict[str, str]] = {"onnxruntime": {"fp32": "model.onnx"},
                                             "openvino": {"fp32": "openvino/model_fp32.xml"}}
        if cpu_supports_bf16():
            bf16 = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
            parity["openvino_bf16"] = logit_parity(torch_logits, batched(lambda b: bf16(b)[0], parity_crops))
        # The runtime compiles the FP32 IR with a bf16 hint where the CPU has native bf16.
        models["openvino"]["bf16"] = "openvino/model_fp32.xml"

        int8_report: dict[str, Any] = {"requested": bool(int8)}
        if int8 and calib_items is None:
            int8_report["skipped"] = "no calibration data (pass calibration= a dataset folder or crops)"
            log("[export] INT8 skipped: no calibration data")
        elif int8:
            log(f"[export] OpenVINO INT8 (NNCF, {len(calib_items)} calibration / {len(val_items)} validation crops, "
                f"max Dice drop {max_dice_drop})")
            q_model, ov_report = quantize_openvino(ov_model, [c for c, _ in calib_items], val_items, num_classes,
                                                   max_dice_drop, max_restore_iterations=max_restore_iterations,
                                                   min_fp32_dice=min_fp32_dice, fp32_modules=fp32_modules)
            int8_report["openvino"] = ov_report
            if not ov_report["enforced"]:
                log(f"[export] OpenVINO INT8 without accuracy control: {ov_report['not_enforced_because']} "
                    f"(measured drop {ov_report['dice_drop']:.4f})")
            if ov_report["offered"]:
                compaction["int8"] = _save_compact(q_model, ov_dir / "model_int8.xml")
                models["openvino"]["int8"] = "openvino/model_int8.xml"
                q_compiled = core.compile_model(q_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
                parity["openvino_int8"] = logit_parity(torch_logits, batched(lambda b: q_compiled(b)[0], parity_crops))
            else:
                log(f"[export] OpenVINO INT8 not offered: Dice drop {ov_report['dice_drop']:.4f} > {max_dice_drop}")
            if onnxruntime_int8:
                ort_report = quantize_onnxruntime(onnx_path, tmp / "model_int8.onnx", [c for c, _ in calib_items],
                                                  val_items, num_classes, INPUT_NAME, max_dice_drop, threads=threads,
                                                  min_fp32_dice=min_fp32_dice)
                ort_report["offered"] = ort_report["faster"] and (ort_report["within_bound"] or not ort_report["enforced"])
                int8_report["onnxruntime"] = ort_report
                log(f"[export] ONNX Runtime INT8 patch {ort_report['int8_patch_s']:.3f}s vs FP32 "
                    f"{ort_report['fp32_patch_s']:.3f}s, Dice drop {ort_report['dice_drop']:.4f}: "
                    f"{'offered' if ort_report['offered'] else 'not offered (slower or drop above bound)'}")
                if ort_report["offered"]:
                    models["onnxruntime"]["int8"] = "model_int8.onnx"
                else:
                    (tmp / "model_int8.onnx").unlink()

        log("[export] accuracy check of every model offered")
        predictors = {"pytorch/fp32": lambda b: model(torch.from_numpy(np.ascontiguousarray(b))).numpy(),
                      "onnxruntime/fp32": lambda b: onnx_logits(onnx_path, b),
                      "openvino/fp32": lambda b: fp32(b)[0]}
        not_measured = {}
        if cpu_supports_bf16():
            predictors["openvino/bf16"] = lambda b: bf16(b)[0]
        else:
            not_measured["openvino/bf16"] = "the export CPU has no native bf16"
        if "int8" in models["openvino"]:
            predictors["openvino/int8"] = lambda b: q_compiled(b)[0]
        if "int8" in models["onnxruntime"]:
            predictors["onnxruntime/int8"] = lambda b: onnx_logits(tmp / "model_int8.onnx", b)
        checks = accuracy_checks(predictors, val_items, num_classes, max_dice_drop, not_measured)

        stats = describe(model, roi, in_channels)
        files = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "format_version": FORMAT_VERSION,
            "labels": {str(k): v for k, v in sorted(labels.items())},
            "num_classes": num_classes,
            "preprocess": meta["preprocess"],
            "roi_size": roi,
            "overlap": float(overlap),
            "crop_foreground": body_crop_spec(),
            # Classes whose largest connected piece alone is kept, chosen on validation (deploy/postprocess.py).
            "postprocess": meta.get("postprocess"),
            "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME,
            "input_shape": ["batch" if batch == "dynamic" else batch, in_channels, *roi],
            "batch": batch,
            "opset": OPSET,
            "models": models,
            "files": files,
            "parity": parity,
            "int8": int8_report,
            "checks": checks,
            "ir_compaction": compaction,
            "versions": library_versions(),
            "student": {"arch": dict(arch), "params": stats["params"], "gflops": round(stats["gflops"], 3),
                        "checkpoint": str(student_ckpt.resolve()), "step": meta.get("step"),
                        "best_dice": meta.get("best_dice"), "lambda_kd": meta.get("lambda_kd")},
            "export_seconds": round(time.perf_counter() - started, 1),
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        load_bundle(tmp)  # the bundle must pass the runtime's own checks before it is published
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_grad_enabled(True)
    log(f"[export] bundle {out_dir} ({manifest['export_seconds']} s)")
    return out_dir


def _save_compact(model: Any, path: Path) -> dict[str, Any]:
    """Save an OpenVINO model with its few-valued constants table-encoded (``export.ir_compact``, lossless);
    the model in memory (which NNCF and the parity checks use) is left as it is."""
    import openvino as ov

    saved = model.clone()
    report = compact_constants(saved)
    ov.save_model(saved, str(path), compress_to_fp16=False)
    return report


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished bundle into place, replacing an older one only once the new one is complete."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
