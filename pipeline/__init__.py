"""What runs the stages: the ordered stages with their skip/resume logic, the run folder and tracking
(``pipeline.pipeline.Pipeline``), and experiments built on them (``pipeline.kd_regimes``).

Imports run one way (tests/test_layering.py): commands (``commands/``, ``distill/run.py``) → pipeline →
stages (``teacher/``, ``distill/``, ``export/``, ``benchmarks/``) → shared pieces (``data/``, ``evaluation/``,
``training/``, ``student/``, ``configs/``) → ``deploy/``, which imports nothing of the project outside itself.
"""
from pipeline.pipeline import Pipeline, PipelineError

__all__ = ["Pipeline", "PipelineError"]
