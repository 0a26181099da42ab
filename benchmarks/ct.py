"""The clinical-size CT workload: one 512 x 512 x 200 abdominal CT at 0.8 x 0.8 x 2.5 mm, end to end.

Deployed rows (ONNX Runtime, OpenVINO) time what a user runs: ``python -m deploy.infer`` in a fresh
process, from the command to the mask on disk (interpreter start, bundle check and compile, reading the
gzipped NIfTI, the input checks, resampling, sliding window, resampling back, writing). Eager PyTorch rows
have no such command: they time loading the model and ``Segmenter.segment_file`` around it in-process (no
interpreter start), so their figure is a lower bound of a comparable command.

The CT is a phantom (``data.phantom --size 512 512 200 --spacing 0.8 0.8 2.5``) of a seed no pipeline
stage uses: the anatomy has the training phantoms' physical size in a clinical field of view (410 x 410 x
500 mm, air around the body), so the students can segment it and each row's Dice is scored on its label.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CT_SIZE = (512, 512, 200)
CT_SPACING_MM = (0.8, 0.8, 2.5)
# Not a corpus or site seed of any config (those are run.seed and data.site.phantom_seed, 0 and 1000 in the demo).
CT_SEED = 4242


class CtWorkloadError(RuntimeError):
    """A clinical-size CT row that could not be run (the deploy command failed)."""


def clinical_phantom(root: str | Path) -> tuple[Path, Path]:
    """Write (or reuse) the workload's CT and its label under ``root``; returns ``(image, label)`` paths."""
    from data.phantom_dataset import write_dataset

    root = Path(root)
    image, label = root / "imagesTr" / "phantom_000.nii.gz", root / "labelsTr" / "phantom_000.nii.gz"
    meta = root / "dataset.json"
    expected = {"seed": CT_SEED, "size": list(CT_SIZE)}
    if image.is_file() and label.is_file() and meta.is_file():
        generator = json.loads(meta.read_text()).get("generator", {})
        if all(generator.get(k) == v for k, v in expected.items()) and \
                [round(f, 3) for f in generator.get("field_of_view_mm", [])] == [round(n * s, 3) for n, s in zip(CT_SIZE, CT_SPACING_MM)]:
            return image, label
    write_dataset(root, cases=1, test_cases=0, seed=CT_SEED, size=CT_SIZE, spacing_mm=CT_SPACING_MM)
    return image, label


def deploy_infer(bundle: str | Path, volume: str | Path, out_path: str | Path, runtime: str, precision: str,
                 threads: int) -> dict[str, Any]:
    """Run ``python -m deploy.infer`` once in a fresh process; return its ``--report`` plus ``wall_s``.

    Raises:
        CtWorkloadError: the command failed (its stderr in the message).
    """
    with tempfile.TemporaryDirectory(prefix="bench_ct_") as tmp:
        report_path = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "deploy.infer", "--bundle", str(bundle), "--input", str(volume),
                   "--output", str(out_path), "--runtime", runtime, "--precision", precision,
                   "--threads", str(int(threads)), "--report", str(report_path)]
        env = {**os.environ, "OMP_NUM_THREADS": str(int(threads))}
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise CtWorkloadError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-800:]}")
        report = json.loads(report_path.read_text())
    report["wall_s"] = wall
    return report
