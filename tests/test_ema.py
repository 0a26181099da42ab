"""Weight averaging (training/ema.py) alone and inside fit(): what is validated, saved and resumed."""
import pytest
import torch
from torch import nn

from training import TrainSettings, TrainSettingsError, fit, load_checkpoint
from training.ema import WeightAverage, WeightAverageError
from training_toy import TinySegNet, loss_fn, make_val_fn, random_batches


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def settings(**kw):
    base = dict(steps=20, lr=1e-2, weight_decay=1e-4, warmup_steps=2, schedule="poly", val_every=10, seed=3,
                progress=False, ema_decay=0.9)
    base.update(kw)
    return TrainSettings(**base)


def new_model():
    torch.manual_seed(0)
    return TinySegNet()


def test_the_average_follows_the_documented_recurrence_and_skips_frozen_weights():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[1].weight.requires_grad_(False)
    ema = WeightAverage(model, decay=0.9)
    assert "1.weight" not in ema.shadow and "0.weight" in ema.shadow
    expected = model[0].weight.detach().clone()
    for n in range(30):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        d = min(0.9, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        expected = d * expected + (1 - d) * model[0].weight.detach()
    assert torch.allclose(ema.shadow["0.weight"], expected, atol=1e-5)
    # the average lags the weights, which moved by 30 (by ~3 here: (1 + n) / (10 + n) < 0.9 for n < 80)
    assert (model[0].weight - ema.shadow["0.weight"]).min() > 2


def test_applied_swaps_the_average_in_and_gives_the_raw_weights_back_even_on_error():
    model = nn.Linear(4, 4)
    ema = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.mul_(3.0)
    raw = model.weight.detach().clone()
    with ema.applied(model):
        assert torch.equal(model.weight, ema.shadow["weight"])
    assert torch.equal(model.weight, raw)
    with pytest.raises(RuntimeError, match="boom"):
        with ema.applied(model):
            raise RuntimeError("boom")
    assert torch.equal(model.weight, raw)


def test_bad_decay_and_a_foreign_saved_average_are_named():
    with pytest.raises(WeightAverageError, match="ema_decay"):
        WeightAverage(nn.Linear(2, 2), decay=1.0)
    with pytest.raises(TrainSettingsError, match="ema_decay"):
        TrainSettings(steps=1, lr=1e-3, ema_decay=-0.1)
    state = WeightAverage(nn.Linear(2, 3), 0.9).state_dict()
    with pytest.raises(WeightAverageError, match="other shape"):
        WeightAverage(nn.Linear(2, 2), 0.9).load_state_dict(state, source="x.pt")


def test_fit_validates_and_keeps_the_average_as_best_and_resumes_it_exactly(tmp_path):
    straight = new_model()
    result = fit(straight, loss_fn, random_batches(), settings(), tmp_path / "straight", val_fn=make_val_fn())
    best, last = load_checkpoint(result.best_path), load_checkpoint(result.last_path)
    # last.pt: raw weights (the live model) plus the average; best.pt: the averaged weights that were validated
    for name, value in straight.state_dict().items():
        assert torch.equal(last["model"][name], value)
    shadow = last["ema"]["shadow"]
    assert last["ema"]["updates"] == 20
    if result.best_step == 20:
        for name, value in shadow.items():
            assert torch.equal(best["model"][name], value)
    assert any(not torch.equal(shadow[n], last["model"][n]) for n in shadow)
    scored = TinySegNet()
    scored.load_state_dict(best["model"])
    assert make_val_fn()(scored.eval())["dice"] == pytest.approx(result.best_metric)

    class Stop(Exception):
        pass

    def kill_at_10(step, metrics):
        if step == 10:
            raise Stop

    with pytest.raises(Stop):
        fit(new_model(), loss_fn, random_batches(), settings(), tmp_path / "killed", val_fn=make_val_fn(), on_validation=kill_at_10)
    resumed = fit(new_model(), loss_fn, random_batches(), settings(), tmp_path / "killed", val_fn=make_val_fn())
    assert resumed.resumed_from == 10
    again = load_checkpoint(resumed.last_path)
    for name, value in shadow.items():
        assert torch.equal(again["ema"]["shadow"][name], value)
    assert [h["dice"] for h in resumed.history] == [h["dice"] for h in result.history]


def test_without_ema_best_holds_the_raw_weights_and_last_has_no_average(tmp_path):
    model = new_model()
    result = fit(model, loss_fn, random_batches(), settings(ema_decay=0.0), tmp_path, val_fn=make_val_fn())
    last = load_checkpoint(result.last_path)
    assert "ema" not in last
    if result.best_step == 20:
        best = load_checkpoint(result.best_path)
        for name, value in model.state_dict().items():
            assert torch.equal(best["model"][name], value)
