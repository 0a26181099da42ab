"""Inspect a dataset before training: ``python -m data ROOT [--layout auto] [--skip-bad] [--stats]``.

Reads the MSD or nnU-Net description, checks every case (headers first, then arrays), and prints the
classes, case counts, shapes and spacings, and optionally the foreground intensity statistics. Exits with
status 1 and the problem (file and reason) if a case is bad and ``--skip-bad`` is not given.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

import nibabel as nib
import numpy as np

from data.checks import DataError, check_dataset
from data.dataset import load_dataset
from data.stats import compute_intensity_stats, ras_spacing


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data", description=__doc__.split("\n")[0])
    parser.add_argument("root", help="dataset folder holding dataset.json")
    parser.add_argument("--layout", default="auto", choices=["auto", "msd", "nnunet"])
    parser.add_argument("--skip-bad", action="store_true", help="report bad cases and continue without them")
    parser.add_argument("--stats", action="store_true", help="also compute foreground intensity statistics")
    args = parser.parse_args(argv)
    try:
        dataset = load_dataset(args.root, args.layout)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            checked = check_dataset(dataset, skip_bad=args.skip_bad)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        spacings = []
        shapes = []
        for case in checked.training:
            img = nib.load(str(case["image"]))
            spacings.append(ras_spacing(img.affine, img.header.get_zooms()[:3]))
            shapes.append(img.shape[:3])
        print(f"{checked.name} ({checked.layout}) at {checked.root}")
        print(f"classes: {checked.labels}")
        print(f"labelled cases: {len(checked.training)} (of {len(dataset.training)}), "
              f"unlabelled: {len(checked.test)} (of {len(dataset.test)})")
        sp = np.asarray(spacings)
        print(f"spacing mm (RAS) min {sp.min(0).round(3).tolist()} median {np.median(sp, 0).round(3).tolist()} "
              f"max {sp.max(0).round(3).tolist()}")
        print(f"shape min {np.min(shapes, 0).tolist()} max {np.max(shapes, 0).tolist()}")
        if args.stats:
            stats = compute_intensity_stats(checked, checked.case_ids, cache_path=None)
            print(f"foreground HU: p0.5 {stats['p0.5']:.1f}  p99.5 {stats['p99.5']:.1f}  "
                  f"mean {stats['mean']:.1f}  std {stats['std']:.1f}")
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
