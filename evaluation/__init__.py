"""Evaluation stage: how every model in the flow is scored, the same way.

- ``evaluation.metrics``: Dice, NSD and HD95 per class (spacing-aware), and their summary over cases.
- ``evaluation.sliding_window``: one MONAI sliding window for torch modules and numpy callables alike,
  and whole-NIfTI prediction mapped back to the input's geometry.
- ``evaluation.clicks``: simulated clicks and the click-by-click interactive protocol.
- ``evaluation.report``: the per case x class CSV and the summary table.

Submodules are imported explicitly (``from evaluation.metrics import case_metrics``) so that importing
one does not pull in the others' dependencies.
"""
