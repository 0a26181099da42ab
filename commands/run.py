"""The pipeline, end to end: ``python distill/run.py [--config configs/demo.yaml] [--out DIR] [key=value ...]``.

Data (phantoms by default) → teacher (trained, or ``teacher.checkpoint_file=...``) → teacher cache →
students (``student.names`` at ``distill.lambda_kd`` plus a λ = 0 baseline) → evaluation on held-out
cases → export bundles → benchmark → report (``runs/<run.name>/report.md``). Stages whose artifacts are up
to date are skipped, so running it again after a kill continues where it stopped.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from commands.args import add_run_arguments, run_config


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse arguments, load the config, run every stage; returns the report dict."""
    from pipeline import Pipeline
    from training.distributed import cleanup

    parser = argparse.ArgumentParser(prog="distill/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="run folder (default: runs/<run.name>)")
    add_run_arguments(parser)
    args = parser.parse_args(argv)

    cfg = run_config(args)
    print(f"[run] config {args.config} {' '.join(args.overrides)}".rstrip())
    try:
        return Pipeline(cfg, out_dir=args.out, tracking_uri=args.tracking_uri).run()
    finally:
        cleanup()
