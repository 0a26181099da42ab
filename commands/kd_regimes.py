"""``python -m distill.kd_regimes``: λ = 0 against KD students per label regime (``pipeline.kd_regimes``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from commands.args import add_run_arguments, run_config
from pipeline import kd_regimes
from pipeline.kd_regimes import REGIMES, VARIANTS, regimes_markdown, run_regimes


def main(argv: Sequence[str] | None = None) -> dict:

    parser = argparse.ArgumentParser(prog="python -m distill.kd_regimes", description=kd_regimes.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="run folder (default: runs/<run.name>_regimes)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--student", default=None)
    parser.add_argument("--variants", nargs="+", default=["lambda0", "kd_pseudo"], help=f"of {sorted(VARIANTS)}")
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES))
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    cfg = run_config(args)
    out = args.out or Path("runs") / f"{cfg['run']['name']}_regimes"
    results = run_regimes(cfg, out, args.variants, args.regimes, args.steps, args.student, args.tracking_uri)
    print(regimes_markdown(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
