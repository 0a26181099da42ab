"""``python -m export --student CKPT --out BUNDLE [--int8] [--calib-dir DATASET]``"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from export.bundle import build_bundle


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description="Export a student checkpoint to a deploy bundle.")
    parser.add_argument("--student", required=True, help="student checkpoint (student.pt)")
    parser.add_argument("--out", required=True, help="bundle folder to write")
    parser.add_argument("--int8", action="store_true", help="also quantise to INT8 (needs --calib-dir)")
    parser.add_argument("--calib-dir", default=None, help="dataset folder (dataset.json) for calibration/validation crops")
    parser.add_argument("--calib-crops", type=int, default=8)
    parser.add_argument("--val-crops", type=int, default=4)
    parser.add_argument("--max-dice-drop", type=float, default=0.01,
                        help="largest tolerated drop of mean foreground Dice for an INT8 model (default 0.01)")
    parser.add_argument("--min-fp32-dice", type=float, default=0.0,
                        help="below this FP32 Dice on the validation crops the drop bound is reported, not enforced")
    parser.add_argument("--max-restore-iterations", type=int, default=None,
                        help="cap on NNCF's layer-by-layer return to float (default: until within the bound)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--static-batch", action="store_true",
                        help="export batch 1 at once instead of trying a dynamic batch axis first")
    args = parser.parse_args(argv)
    if args.int8 and not args.calib_dir:
        parser.error("--int8 needs --calib-dir (INT8 calibrated on random data would be meaningless)")
    try:
        bundle = build_bundle(args.student, args.out, calibration=args.calib_dir, int8=args.int8,
                              max_dice_drop=args.max_dice_drop, calibration_crops=args.calib_crops,
                              validation_crops=args.val_crops, overlap=args.overlap, threads=args.threads,
                              min_fp32_dice=args.min_fp32_dice, max_restore_iterations=args.max_restore_iterations,
                              dynamic_batch=not args.static_batch)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = json.loads((bundle / "model.json").read_text())
    print(json.dumps({"bundle": str(bundle), "models": manifest["models"], "parity": manifest["parity"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
