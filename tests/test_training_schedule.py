"""Learning-rate schedule and optimizer parameter groups."""
import math

import pytest
import torch
from torch import nn

from training.schedule import ScheduleError, build_optimizer, build_scheduler, lr_lambda


def test_warmup_ramps_linearly_to_the_base_rate():
    assert [lr_lambda(s, 4, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_constant_schedule_stays_at_the_base_rate_until_the_end():
    assert lr_lambda(99, 10, 100, "constant") == 1.0
    assert lr_lambda(0, 0, 100, "constant") == 1.0


def test_poly_decay_by_hand_and_ends_at_zero():
    # after 10 warm-up steps, t = (55 - 10) / 90 = 0.5 → (1 - 0.5) ** 0.9
    assert lr_lambda(55, 10, 100, "poly", power=0.9) == pytest.approx(0.5**0.9)
    assert lr_lambda(10, 10, 100, "poly") == 1.0
    assert lr_lambda(100, 10, 100, "poly") == 0.0
    values = [lr_lambda(s, 10, 100, "poly") for s in range(10, 101)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_cosine_decay_is_half_way_at_mid_run_and_ends_at_zero():
    assert lr_lambda(50, 0, 100, "cosine") == pytest.approx(0.5)
    assert lr_lambda(100, 0, 100, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_unknown_schedule_is_refused_with_its_name():
    with pytest.raises(ScheduleError, match="'linear'"):
        lr_lambda(0, 0, 10, "linear")


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(4, 4)
        self.backbone.requires_grad_(False)
        self.embed = nn.Embedding(10, 4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 8, 4))
        self.conv = nn.Conv3d(4, 4, 3)
        self.norm = nn.LayerNorm(4)


def test_optimizer_holds_only_trainable_params_and_spares_1d_and_embeddings_from_decay():
    model = Frozen()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    decayed, spared = opt.param_groups
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert decayed["weight_decay"] == 0.05 and spared["weight_decay"] == 0.0
    assert ids(decayed) == {id(model.conv.weight)}
    assert ids(spared) == {id(p) for p in (model.conv.bias, model.norm.weight, model.norm.bias, model.embed.weight, model.pos_embed)}
    assert not ({id(model.backbone.weight), id(model.backbone.bias)} & (ids(decayed) | ids(spared)))


def test_scheduler_sets_the_rate_used_by_each_optimizer_step():
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, lr=0.1, weight_decay=0.0)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=6, kind="poly", power=1.0)
    used = []
    for _ in range(6):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used == pytest.approx([0.05, 0.1, 0.1, 0.075, 0.05, 0.025])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)
    assert math.isclose(opt.param_groups[1]["lr"], 0.0, abs_tol=1e-12)


def test_model_without_trainable_params_is_refused():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ScheduleError, match="no trainable parameters"):
        build_optimizer(model, lr=1e-3, weight_decay=0.0)
