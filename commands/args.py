"""The arguments every command line shares: the config, its ``key=value`` overrides, the MLflow store and, where
a teacher is used, a trained ``teacher.pt``; and the config they resolve to."""
from __future__ import annotations

import argparse

DEFAULT_CONFIG = "configs/demo.yaml"  # a preset name or path; configs/<name>.yaml is found from any folder


def add_run_arguments(parser: argparse.ArgumentParser, *, teacher: bool = True, example: str = "distill.steps=100",
                      tracking_default: str = "sqlite:///<run folder>/mlflow.db") -> None:
    """``--config``, ``--tracking-uri``, ``--teacher`` (when ``teacher``) and the ``overrides`` positionals."""
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML file or preset name (default: %(default)s)")
    parser.add_argument("--tracking-uri", default=None, help=f"MLflow store (default: {tracking_default})")
    if teacher:
        parser.add_argument("--teacher", default=None,
                            help="a trained teacher.pt to use instead of training one (sets teacher.checkpoint_file)")
    parser.add_argument("overrides", nargs="*", help=f"key=value config overrides, e.g. {example}")


def run_config(args: argparse.Namespace) -> dict:
    """The config the arguments name: the file, its overrides, and ``--teacher`` as ``teacher.checkpoint_file``."""
    from configs import load_config

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "teacher", None):
        cfg["teacher"]["checkpoint_file"] = args.teacher
    return cfg
