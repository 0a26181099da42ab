"""Distillation stage: KD loss, teacher-output cache, student training and the end-to-end pipeline.

- ``distill.loss.KDLoss``: ``λ · MSE(student, teacher) + (1 − λ) · DiceCE(student, label)``.
- ``distill.cache``: teacher soft targets computed once per case, stored compactly, keyed by teacher.
- ``distill.train.train_student``: one student trained with the shared engine (``training.loop.fit``).
- ``distill/run.py``: the pipeline (data → teacher → cache → students → evaluation → export → report).
"""
from distill.loss import KDLoss, KDLossError

__all__ = ["KDLoss", "KDLossError"]
