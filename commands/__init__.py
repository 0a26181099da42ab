"""The command layer: argument parsing and the wiring of stages for each command line.

``distill/run.py`` (the product's main command) and ``python -m teacher.train | distill.train | distill.tune |
distill.kd_regimes`` land here; those stage modules only forward their ``__main__`` to this layer, so a stage
never imports the pipeline that runs it (tests/test_layering.py).
"""
