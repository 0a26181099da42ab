"""``python -m distill.train``: train one student, running the data, teacher and cache stages it needs."""
from __future__ import annotations

import argparse
from typing import Sequence

from commands.args import add_run_arguments, run_config
from distill import train as stage
from distill.train import StudentResult


def main(argv: Sequence[str] | None = None) -> StudentResult:
    """Command line: train one student in ``runs/<run.name>`` (data and teacher stages as the pipeline runs them)."""
    from pipeline import Pipeline

    parser = argparse.ArgumentParser(prog="python -m distill.train", description=stage.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default=None, help="student name (default: the first of student.names)")
    parser.add_argument("--lambda", dest="lambda_kd", type=float, default=None, help="λ (default: distill.lambda_kd)")
    parser.add_argument("--out", default=None, help="run folder (default: runs/<run.name>)")
    parser.add_argument("--steps", type=int, default=None,
                        help="step budget (default: the pipeline's for this student: student.steps, else distill.steps)")
    add_run_arguments(parser)
    args = parser.parse_args(argv)

    cfg = run_config(args)
    name = args.student or cfg["student"]["names"][0]
    lambda_kd = float(cfg["distill"]["lambda_kd"] if args.lambda_kd is None else args.lambda_kd)
    from training.distributed import cleanup, is_main_process

    pipeline = Pipeline(cfg, out_dir=args.out, tracking_uri=args.tracking_uri)  # joins torchrun's process group
    with pipeline.tracking():
        pipeline.stage_data()
        cache_dir = teacher_ckpt = None
        if lambda_kd > 0:
            teacher_ckpt = pipeline.stage_teacher()
            if cfg["distill"]["mode"] == "cached":  # cfg is resolved (configs.load_config)
                cache_dir = pipeline.stage_cache(teacher_ckpt)
        result = pipeline.stage_student(name, lambda_kd, teacher_ckpt, cache_dir, steps=args.steps)
    if is_main_process():
        print(f"[student] best validation Dice {result.best_dice:.3f} at step {result.best_step}; {result.checkpoint}")
    cleanup()
    return result
