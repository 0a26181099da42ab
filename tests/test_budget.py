"""run.time_budget_minutes (pipeline/budget.py): the projection that decides whether a later student trains, the step
it measures, and which students the pipeline then exports."""
import math

import pytest

from pipeline.budget import COST_FACTOR, TAIL_FRACTION, BudgetDecision, probe_seconds_per_step, project


def test_a_student_trains_when_the_projected_run_fits_and_is_left_out_when_not():
    # The demo capped to AVX2 here: 660 s elapsed when the small student is due, 0.9 s/step x 300.
    fits = project(30, 660.0, "swinunetr_small", 0.9, 300)
    assert fits.train
    assert fits.projected_minutes == pytest.approx((660 * (1 + TAIL_FRACTION) + COST_FACTOR * 0.9 * 300) / 60)
    assert fits.without_minutes == pytest.approx(660 * (1 + TAIL_FRACTION) / 60)
    # The AVX2-only CPU of 2026-12-02 by estimate: ~1280 s elapsed, ~2 s/step.
    slow = project(30, 1280.0, "swinunetr_small", 2.0, 300)
    assert not slow.train and slow.projected_minutes > 30 > slow.without_minutes
    # A comparison student still to train counts against the budget whatever is decided.
    pending = project(30, 660.0, "swinunetr_small", 0.9, 300, pending_s=900.0)
    assert pending.projected_minutes == pytest.approx(fits.projected_minutes + 15.0) and not pending.train
    assert "left out" in slow.sentence() and "30 min" in slow.sentence() and "2.00 s/step" in slow.sentence()
    assert slow.to_dict()["name"] == "swinunetr_small" and slow.to_dict()["train"] is False


def test_the_probe_times_the_students_training_step_as_the_run_trains_it():
    import torch

    from configs import load_config

    torch.set_num_threads(2)
    cfg = load_config("demo", ["student.roi_size=[32, 32, 32]"])
    seconds = probe_seconds_per_step(cfg, "unet_small", 8, steps=2)
    assert math.isfinite(seconds) and 0.0 < seconds < 30.0


def test_the_deliverables_are_the_named_students_trained_not_those_left_out_nor_the_comparison(tmp_path):
    from configs import load_config
    from pipeline.pipeline import Pipeline

    cfg = load_config("demo", ["student.names=[swinunetr_tiny, swinunetr_small, unet_small]", "run.device=cpu"])
    pipeline = Pipeline(cfg, out_dir=tmp_path / "run", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                        log=lambda *_: None)
    results = ["tiny", "unet", "tiny λ=0"]  # stage_students' order: the named students trained, then the comparison
    pipeline.budget_decisions = [BudgetDecision("swinunetr_small", False, 30, 20, 2.0, 300, 41, 26),
                                 BudgetDecision("unet_small", True, 30, 20, 0.3, 400, 29, 26)]
    assert pipeline.named_students(results) == ["tiny", "unet"]
    pipeline.budget_decisions = []
    assert pipeline.named_students(["tiny", "small", "unet", "tiny λ=0"]) == ["tiny", "small", "unet"]
