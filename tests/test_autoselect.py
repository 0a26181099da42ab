"""deploy.autoselect: which models qualify (the bundle's accuracy check), the measured choice, its cache."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deploy import RuntimeChoiceError, Segmenter, load_bundle
from deploy.autoselect import CHOICE_FILE, choose, qualifying
from deploy.machine import cache_dir, cpu_info
from deploy.runtime import cpu_supports_bf16

SPEC = {"spacing_mm": [3.2, 3.2, 7.5], "orientation": "RAS",
        "intensity": {"mode": "scale", "hu_min": -175.0, "hu_max": 250.0, "mean": None, "std": None}}


def _manifest(dice: dict, drop_bound: float = 0.01, models=None) -> dict:
    return {"dir": "/nowhere", "models": models or {"onnxruntime": {"fp32": "m.onnx"},
                                                    "openvino": {"fp32": "a.xml", "bf16": "a.xml", "int8": "b.xml"}},
            "checks": {"reference": "pytorch/fp32", "max_dice_drop": drop_bound, "dice": dice,
                       "not_measured": {"openvino/bf16": "the export CPU has no native bf16"}}}


def test_a_model_qualifies_only_within_the_bound_of_the_recorded_fp32_dice():
    dice = {"pytorch/fp32": 0.80, "onnxruntime/fp32": 0.80, "openvino/fp32": 0.799, "openvino/int8": 0.785}
    keys, rejected, recorded, reference = qualifying(_manifest(dice))
    assert reference == 0.80 and recorded["openvino/int8"] == 0.785
    assert keys == ["onnxruntime/fp32", "openvino/fp32"]
    assert "0.015 below FP32's 0.800 (bound 0.01)" in rejected["openvino/int8"]
    # bf16: never scored by this export (or no native bf16 here): not chosen, and the reason says which
    assert "openvino/bf16" in rejected
    expected = "no accuracy check in the bundle (the export CPU" if cpu_supports_bf16() else "the CPU has no native bf16"
    assert rejected["openvino/bf16"].startswith(expected)
    keys, _, _, _ = qualifying(_manifest({**dice, "openvino/int8": 0.791}))
    assert "openvino/int8" in keys
    # narrowing by a fixed runtime or precision
    assert qualifying(_manifest(dice), runtime="openvino")[0] == ["openvino/fp32"]
    assert qualifying(_manifest(dice), precision="fp32")[0] == ["onnxruntime/fp32", "openvino/fp32"]


def test_a_bundle_without_checks_offers_fp32_and_only_an_accuracy_controlled_int8():
    bundle = {"dir": "/nowhere", "models": {"openvino": {"fp32": "a.xml", "int8": "b.xml"}}}
    assert qualifying(bundle)[0] == ["openvino/fp32"]
    bundle["int8"] = {"openvino": {"within_bound": True}}
    assert qualifying(bundle)[0] == ["openvino/fp32", "openvino/int8"]


@pytest.fixture(scope="module")
def int8_bundle(phantom_dataset, tmp_path_factory):
    """An untrained U-Net student exported with FP32 and OpenVINO INT8 models and the accuracy check."""
    from export import build_bundle
    from student import build_student, save_student

    torch.manual_seed(0)
    labels = {int(k): v for k, v in json.loads((phantom_dataset / "dataset.json").read_text())["labels"].items()}
    work = tmp_path_factory.mktemp("auto_bundle")
    ckpt = save_student(work / "student.pt", build_student("unet_small", len(labels)),
                        {"arch": {"name": "unet_small", "num_classes": len(labels), "in_channels": 1},
                         "roi_size": [32, 32, 32], "preprocess": SPEC, "labels": labels})
    return build_bundle(ckpt, work / "bundle", calibration=phantom_dataset, int8=True, calibration_crops=2,
                        validation_crops=2, max_dice_drop=1.0, onnxruntime_int8=False, log=lambda *_: None)


def test_export_records_a_dice_check_for_every_model_it_offers(int8_bundle):
    bundle = load_bundle(int8_bundle)
    checks = bundle["checks"]
    offered = {f"{r}/{p}" for r, ps in bundle["models"].items() for p in ps}
    scored = set(checks["dice"])
    assert "pytorch/fp32" in scored and offered - {"openvino/bf16"} <= scored
    assert ("openvino/bf16" in scored) == cpu_supports_bf16()
    assert checks["crops"] == 2 and checks["max_dice_drop"] == 1.0
    # FP32 runtimes reproduce PyTorch's argmax on the same crops: the same Dice to rounding
    assert abs(checks["dice"]["openvino/fp32"] - checks["dice"]["pytorch/fp32"]) < 0.01
    assert checks["drop"]["openvino/int8"] == pytest.approx(checks["dice"]["pytorch/fp32"] - checks["dice"]["openvino/int8"])


def test_the_device_measures_once_picks_the_fastest_and_reads_the_cache_after(int8_bundle):
    bundle = load_bundle(int8_bundle)
    cache = cache_dir() / CHOICE_FILE
    cache.unlink(missing_ok=True)
    first = choose(bundle, threads=1, repeats=2)
    keys = qualifying(bundle)[0]
    assert not first.cached and set(first.window_ms) == set(keys) and len(keys) >= 3
    assert f"{first.runtime}/{first.precision}" == min(first.window_ms, key=first.window_ms.get)
    assert first.cpu["model"] == cpu_info()["model"] and "avx2" in first.summary() or not cpu_info()["flags"]
    second = choose(bundle, threads=1)
    assert second.cached and (second.runtime, second.precision) == (first.runtime, first.precision)
    assert second.window_ms == first.window_ms and "cached" in second.summary()
    # a damaged cache file is measured again and rewritten
    cache.write_text("{not json")
    third = choose(bundle, threads=1, repeats=1)
    assert not third.cached and json.loads(cache.read_text())
    # the segmenter resolves auto to the choice and runs it
    seg = Segmenter(int8_bundle, "auto", "auto", threads=1, compile_cache=True)
    assert seg.choice.cached and (seg.runtime, seg.precision) == (third.runtime, third.precision)
    assert any(cache_dir().joinpath("openvino").glob("*.blob")) or seg.runtime != "openvino"


def test_auto_refuses_with_every_reason_when_nothing_qualifies(int8_bundle):
    bundle = load_bundle(int8_bundle)
    with pytest.raises(RuntimeChoiceError, match="no runtime/precision qualifies.*onnxruntime/int8|no runtime/precision qualifies"):
        choose(bundle, runtime="onnxruntime", precision="int8")


def test_cli_auto_prints_the_choice_and_writes_it_to_the_report(int8_bundle, phantom_dataset, tmp_path, capsys):
    from deploy.infer import main

    path = phantom_dataset / "imagesTr" / "phantom_000.nii.gz"
    report = tmp_path / "r.json"
    assert main(["--bundle", str(int8_bundle), "--input", str(path), "--output", str(tmp_path / "m.nii.gz"),
                 "--threads", "1", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    written = json.loads(report.read_text())
    assert out.startswith("auto: ") and f"{written['runtime']}/{written['precision']}" in out.splitlines()[1]
    assert written["choice"]["runtime"] == written["runtime"] and written["windows"] >= 1
    assert written["peak_rss_mb"] > 50
