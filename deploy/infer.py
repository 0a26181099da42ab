"""Command line of the edge runtime::

    python -m deploy.infer --bundle BUNDLE --input ct.nii.gz --output mask.nii.gz \
        [--runtime openvino|onnxruntime] [--precision fp32|bf16|int8] [--threads N] [--overlap F] [--overlay out.png]
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from deploy.errors import DeployError
from deploy.runtime import PRECISIONS, RUNTIMES
from deploy.segmenter import Segmenter


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.infer", description="Segment a CT NIfTI with a deploy bundle.")
    parser.add_argument("--bundle", required=True, help="bundle folder (model.json + model files)")
    parser.add_argument("--input", required=True, help="CT volume (.nii / .nii.gz)")
    parser.add_argument("--output", required=True, help="label mask to write (.nii / .nii.gz)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="openvino")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--overlap", type=float, default=None, help="window overlap (default: the bundle's)")
    parser.add_argument("--overlay", default=None, help="optional PNG of a few axial slices with the mask")
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        segmenter = Segmenter(args.bundle, args.runtime, args.precision, args.threads, args.overlap)
        loaded = time.perf_counter()
        labels = segmenter.segment_file(args.input, args.output, overlay=args.overlay)
        done = time.perf_counter()
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = {segmenter.labels.get(int(c), str(c)): int((labels == c).sum()) for c in range(1, segmenter.num_classes)}
    print(f"{args.output}: shape {labels.shape}, {args.runtime}/{args.precision}, "
          f"load {loaded - start:.2f}s, segment {done - loaded:.2f}s; voxels per class {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
