"""Segment a CT volume with a trained teacher (automatic prompt), writing a mask in the input's geometry.

    python -m teacher.predict --teacher runs/demo/teacher/teacher.pt --input ct.nii.gz --output mask.nii.gz

The image goes through the preprocessing stored in the checkpoint, is predicted by sliding windows of the
teacher's ROI, and the label map is mapped back to the input's voxel grid and affine
(``evaluation.sliding_window.predict_case``): the same code path that scores every model in this project.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from configs.schema import EvaluationConfig

def segment_with_teacher(
    model: torch.nn.Module,
    meta: Mapping[str, Any],
    image_path: str | Path,
    out_path: str | Path | None = None,
    overlap: float | None = None,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Segment one NIfTI with a loaded teacher (``teacher.checkpoint.load_teacher``).

    Args:
        model: the teacher, on ``device``.
        meta: its checkpoint metadata (``preprocess``, ``labels``, ``roi_size``, optional ``config``).
        image_path: a 3D CT NIfTI in Hounsfield units.
        out_path: where to write the mask (atomic NIfTI, the input's affine); None: only return it.
        overlap: sliding-window overlap; default the checkpoint config's ``evaluation.overlap`` (0.25).
        device: where the teacher runs.

    Returns:
        ``X x Y x Z`` integer mask on the input's voxel grid (class ids of the checkpoint's ``labels``).
    """
    from evaluation.sliding_window import predict_case
    from teacher.checkpoint import TeacherCheckpointError

    for key in ("preprocess", "labels", "roi_size"):
        if key not in meta:
            raise TeacherCheckpointError(f"teacher checkpoint metadata lacks {key!r}; not a trained teacher.pt")
    if overlap is None:
        overlap = float((meta.get("config") or {}).get("evaluation", {}).get("overlap", EvaluationConfig.overlap))
    labels = {int(k): str(v) for k, v in meta["labels"].items()}
    return predict_case(model, image_path, meta["preprocess"], meta["roi_size"], labels, out_path=out_path,
                        overlap=overlap, device=device)


def predict_teacher(
    teacher_path: str | Path,
    image_path: str | Path,
    out_path: str | Path | None = None,
    overlap: float | None = None,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Load ``teacher.pt`` and segment one NIfTI (see :func:`segment_with_teacher`).

    Args:
        teacher_path: checkpoint written by ``teacher.train`` (``teacher.checkpoint.save_teacher``).
        image_path: a 3D CT NIfTI in Hounsfield units.
        out_path: where to write the mask; None: only return it.
        overlap: sliding-window overlap; default from the checkpoint's config.
        device: where the teacher runs.
    """
    from teacher.checkpoint import load_teacher

    model, meta = load_teacher(teacher_path, device=device)
    return segment_with_teacher(model, meta, image_path, out_path, overlap, device)


def main(argv: Sequence[str] | None = None) -> np.ndarray:
    """Command line: one NIfTI in, one mask out; prints the voxel count per class."""
    from teacher.checkpoint import load_teacher

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher.pt")
    parser.add_argument("--input", required=True, help="CT NIfTI (.nii / .nii.gz)")
    parser.add_argument("--output", required=True, help="mask NIfTI to write")
    parser.add_argument("--overlap", type=float, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    model, meta = load_teacher(args.teacher, device=args.device)
    mask = segment_with_teacher(model, meta, args.input, args.output, args.overlap, args.device)
    labels = {int(k): v for k, v in meta["labels"].items()}
    counts = {labels.get(int(c), str(c)): int(n) for c, n in zip(*np.unique(mask, return_counts=True))}
    print(f"[predict] {args.output}: shape {mask.shape}, voxels per class {counts}, {time.perf_counter() - started:.1f} s")
    return mask


if __name__ == "__main__":
    main(sys.argv[1:])
