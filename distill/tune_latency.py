"""CPU latency of a student size for the multi-objective study: measured once per size, then reused.

Latency depends on the architecture, the ROI and the thread count, not on the trained weights (the same
dense kernels run whatever the values), so each student size is exported once, untrained, to ONNX
(``export.onnx_export.export_onnx``, static batch 1) and one ROI patch is timed on ONNX Runtime
(``benchmarks.measure.time_runs``: warm-up, then ``repeats`` timed runs; the p50 is the objective). The
result is stored as JSON beside the ONNX file and read back by every later trial and worker. Measure on a
quiet machine: a worker timing a student while others train on the same cores reports a slower number.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from data.atomic import atomic_path, write_json_atomic


class StudentLatency:
    """``student name -> p50 ms`` for one ROI and thread count, cached on disk.

    Args:
        directory: where ``<name>_<X>x<Y>x<Z>_<threads>t.json`` and the ONNX files go.
        num_classes: K of the exported students.
        roi_size: ``[X, Y, Z]`` of the timed patch.
        threads: ONNX Runtime intra-op threads.
        repeats: timed runs (after 2 warm-up runs).
    """

    def __init__(self, directory: str | Path, num_classes: int, roi_size: Sequence[int], threads: int = 1,
                 repeats: int = 10, options: dict | None = None) -> None:
        self.directory = Path(directory)
        self.options = dict(options or {})  # student.arch: the latency of the architecture the run trains
        self.num_classes = int(num_classes)
        self.roi_size = [int(s) for s in roi_size]
        self.threads = int(threads)
        self.repeats = int(repeats)

    def path(self, name: str) -> Path:
        roi = "x".join(str(s) for s in self.roi_size)
        from student import ARCH_OPTIONS, arch_options

        # Only options that change this student from its registry defaults name a separate measurement.
        defaults = ARCH_OPTIONS.get(name, {})
        opts = "".join(f"_{k}{v}" for k, v in sorted(arch_options(name, self.options).items()) if defaults.get(k) != v)
        return self.directory / f"{name}_{roi}_{self.threads}t{opts}.json"

    def measure(self, name: str) -> dict:
        """Export ``name`` untrained and time one patch; returns (and stores) the record."""
        import onnxruntime as ort
        import torch

        from benchmarks.measure import time_runs
        from export.onnx_export import export_onnx
        from student import build_student, check_roi, count_params

        check_roi(name, self.roi_size)
        torch.manual_seed(0)
        model = build_student(name, self.num_classes, options=self.options).eval()
        onnx_path = self.path(name).with_suffix(".onnx")
        with atomic_path(onnx_path) as tmp:
            export_onnx(model, self.roi_size, tmp, batch=1)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.random.default_rng(0).random((1, 1, *self.roi_size), dtype=np.float32)}
        timing = time_runs(lambda: session.run(None, feed), warmup=2, repeats=self.repeats)
        record = {
            "student": name,
            "roi_size": self.roi_size,
            "threads": self.threads,
            "runtime": f"onnxruntime {ort.__version__}",
            "params": count_params(model),
            "onnx_bytes": onnx_path.stat().st_size,
            **{k: v for k, v in timing.as_dict().items() if k != "samples_ms"},
        }
        write_json_atomic(self.path(name), record)
        return record

    def record(self, name: str) -> dict:
        """The stored record of ``name``, measured first if there is none."""
        path = self.path(name)
        if path.is_file():
            return json.loads(path.read_text())
        return self.measure(name)

    def __call__(self, name: str) -> float:
        """p50 latency of one ROI patch of ``name`` in milliseconds."""
        return float(self.record(name)["p50_ms"])
