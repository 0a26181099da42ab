"""``python -m distill.kd_regimes``: does distillation pay, and where? The experiment drives the pipeline's
stages, so it lives above them: ``pipeline/kd_regimes.py`` (library) and ``commands/kd_regimes.py`` (this
command line). This module only keeps the documented command working."""

if __name__ == "__main__":
    import sys

    from commands.kd_regimes import main

    main(sys.argv[1:])
