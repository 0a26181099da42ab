"""Checkpoints: atomic save, weights-only load, restore into live objects, refusal of foreign ones."""
import random

import numpy as np
import pytest
import torch
from torch import nn

from training.checkpoint import (
    CheckpointError,
    IncompatibleCheckpointError,
    check_compatible,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
)
from training.rng import capture_rng_state, restore_rng_state
from training.schedule import build_optimizer, build_scheduler


def trained_pair():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.01)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=10, kind="poly")
    for _ in range(3):
        model(torch.randn(5, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def test_checkpoint_round_trip_restores_weights_optimizer_scheduler_and_meta(tmp_path):
    model, opt, sched = trained_pair()
    meta = {"labels": {0: "background", 1: "liver"}, "roi_size": (64, 64, 48), "spacing": np.float64(1.5)}
    path = save_checkpoint(tmp_path / "last.pt", model, opt, sched, step=3, best_metric=0.7, extra=meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind

    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 3 and ckpt["best_dice"] == 0.7
    assert ckpt["labels"] == {0: "background", 1: "liver"} and ckpt["roi_size"] == [64, 64, 48]
    assert ckpt["spacing"] == 1.5

    fresh = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    fresh_opt = build_optimizer(fresh, lr=1e-2, weight_decay=0.01)
    fresh_sched = build_scheduler(fresh_opt, warmup_steps=2, total_steps=10, kind="poly")
    restore_training_state(ckpt, fresh, fresh_opt, fresh_sched)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert fresh_sched.last_epoch == 3
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    state = fresh_opt.state[fresh[0].weight]
    assert torch.equal(state["exp_avg"], opt.state[model[0].weight]["exp_avg"])


def test_a_different_architecture_is_refused_with_the_offending_keys(tmp_path):
    model, opt, sched = trained_pair()
    save_checkpoint(tmp_path / "last.pt", model, opt, sched, step=3, best_metric=0.5)
    other = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    with pytest.raises(IncompatibleCheckpointError, match=r"last\.pt.*0\.weight: model \(8, 3\) vs checkpoint \(4, 3\)"):
        restore_training_state(load_checkpoint(tmp_path / "last.pt"), other, source=tmp_path / "last.pt")


def test_metadata_of_another_run_is_refused_but_the_config_may_change(tmp_path):
    model, opt, sched = trained_pair()
    save_checkpoint(tmp_path / "last.pt", model, opt, sched, 3, 0.5, extra={"arch": {"name": "swinunetr_tiny"}, "config": {"steps": 10}},
                    train_state={"settings": {"lr": 1e-3, "steps": 10}})
    ckpt = load_checkpoint(tmp_path / "last.pt")
    check_compatible(ckpt, {"arch": {"name": "swinunetr_tiny"}, "config": {"steps": 20}}, {"lr": 1e-3, "steps": 20})
    with pytest.raises(IncompatibleCheckpointError, match="'arch'.*swinunetr_tiny.*swinunetr_small"):
        check_compatible(ckpt, {"arch": {"name": "swinunetr_small"}}, source=tmp_path / "last.pt")
    with pytest.raises(IncompatibleCheckpointError, match="setting 'lr'"):
        check_compatible(ckpt, {}, {"lr": 5e-4})


def test_reserved_keys_in_extra_are_refused(tmp_path):
    model, opt, sched = trained_pair()
    with pytest.raises(CheckpointError, match=r"reserved keys \['step'\]"):
        save_checkpoint(tmp_path / "x.pt", model, opt, sched, 3, 0.5, extra={"step": 4})


def test_missing_or_corrupt_files_give_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_rng_state_replays_every_generator(tmp_path):
    state = capture_rng_state()
    first = (random.random(), float(np.random.rand()), float(np.random.randn()), float(torch.rand(1)))
    # through a weights-only checkpoint file, as a resumed run reads it
    model, opt, sched = trained_pair()
    save_checkpoint(tmp_path / "r.pt", model, opt, sched, 3, 0.5, rng_states=[state])
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"][0])
    again = (random.random(), float(np.random.rand()), float(np.random.randn()), float(torch.rand(1)))
    assert again == first
