"""``python -m teacher.train``: prepare the data (the pipeline's data stage), then train the teacher."""
from __future__ import annotations

import argparse
from typing import Sequence

from commands.args import add_run_arguments, run_config
from teacher import train as stage
from teacher.train import TeacherResult, train_teacher

def main(argv: Sequence[str] | None = None) -> TeacherResult:
    """Command line: prepare the data (the pipeline's data stage), then train the teacher in ``<run-dir>/teacher``."""
    from pipeline import Pipeline

    parser = argparse.ArgumentParser(prog="python -m teacher.train", description=stage.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=None, help="run folder (default: runs/<run.name>)")
    add_run_arguments(parser, teacher=False, example="teacher.steps=400", tracking_default="sqlite:///<run-dir>/mlflow.db")
    args = parser.parse_args(argv)

    cfg = run_config(args)
    pipeline = Pipeline(cfg, out_dir=args.run_dir, tracking_uri=args.tracking_uri)
    with pipeline.tracking():
        data = pipeline.stage_data()
        with pipeline.tracker.start_run("teacher training", resume_key=f"teacher:{pipeline.run_dir / 'teacher'}"):
            return train_teacher(cfg, pipeline.run_dir, data=data, tracker=pipeline.tracker)
