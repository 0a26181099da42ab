"""The pipeline, end to end: ``python distill/run.py [--config configs/demo.yaml] [--out DIR] [key=value ...]``.

Data (phantoms by default) → teacher (trained, or ``teacher.checkpoint_file=...``) → teacher cache →
students (``student.names`` at ``distill.lambda_kd`` plus a λ = 0 baseline) → evaluation on held-out
cases → export bundles → benchmark → report (``runs/<run.name>/report.md``). Stages whose artifacts are up
to date are skipped, so running it again after a kill continues where it stopped.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse arguments, load the config, run every stage; returns the report dict."""
    from configs import load_config
    from pipeline import Pipeline
    from training.distributed import cleanup

    parser = argparse.ArgumentParser(prog="distill/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="YAML file or preset name")
    parser.add_argument("--out", default=None, help="run folder (default: runs/<run.name>)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite:///<run folder>/mlflow.db)")
    parser.add_argument("--teacher", default=None,
                        help="a trained teacher.pt to use instead of training one (sets teacher.checkpoint_file)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. distill.steps=100")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    if args.teacher:
        cfg["teacher"]["checkpoint_file"] = args.teacher
    print(f"[run] config {args.config} {' '.join(args.overrides)}".rstrip())
    try:
        return Pipeline(cfg, out_dir=args.out, tracking_uri=args.tracking_uri).run()
    finally:
        cleanup()
