"""fit(): learning, checkpoints, validation callbacks, exact resume, refusal of foreign checkpoints."""
import pytest
import torch

from configs import load_config
from training import IncompatibleCheckpointError, TrainSettings, TrainSettingsError, fit, load_checkpoint
from training_toy import TinySegNet, loss_fn, make_val_fn, random_batches


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def settings(**kw):
    base = dict(steps=20, lr=1e-2, weight_decay=1e-4, warmup_steps=2, schedule="poly", val_every=10, seed=3, progress=False)
    base.update(kw)
    return TrainSettings(**base)


def new_model():
    torch.manual_seed(0)
    return TinySegNet()


class Stop(Exception):
    """Stands in for a kill (or optuna.TrialPruned) raised from on_validation."""


def test_fit_learns_the_toy_task_and_writes_loadable_best_and_last(tmp_path):
    meta = {"arch": {"name": "tiny_seg", "num_classes": 2}, "labels": {0: "background", 1: "bright"}, "config": {"a": 1}}
    result = fit(new_model(), loss_fn, random_batches(), settings(steps=80, val_every=20), tmp_path, val_fn=make_val_fn(), extra_meta=meta)

    losses = [h["train_loss"] for h in result.history]
    assert [h["step"] for h in result.history] == [20, 40, 60, 80]
    # Training seconds up to each validation (for Dice-against-minutes curves): increasing, within the wall time.
    seconds = [h["train_s"] for h in result.history]
    assert all(0 < a < b for a, b in zip(seconds, seconds[1:])) and seconds[-1] <= result.wall_s
    assert losses[-1] < 0.5 * losses[0]
    assert result.best_metric > 0.9 and result.best_metric == max(h["dice"] for h in result.history)
    assert result.last_step == 80 and result.s_per_step > 0 and result.wall_s > 0

    best = load_checkpoint(result.best_path)
    assert best["step"] == result.best_step and best["best_dice"] == pytest.approx(result.best_metric)
    assert best["arch"] == meta["arch"] and best["labels"] == meta["labels"] and best["config"] == meta["config"]
    model = TinySegNet()
    model.load_state_dict(best["model"])
    assert make_val_fn()(model.eval())["dice"] == pytest.approx(result.best_metric)
    assert load_checkpoint(result.last_path)["step"] == 80


def test_resumed_run_ends_identical_to_an_uninterrupted_one(tmp_path):
    straight = new_model()
    fit(straight, loss_fn, random_batches(), settings(), tmp_path / "straight", val_fn=make_val_fn())

    def kill_at_10(step, metrics):
        if step == 10:
            raise Stop

    with pytest.raises(Stop):
        fit(new_model(), loss_fn, random_batches(), settings(), tmp_path / "killed", val_fn=make_val_fn(), on_validation=kill_at_10)
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["step"] == 10  # saved before the callback raised

    resumed = new_model()
    result = fit(resumed, loss_fn, random_batches(), settings(), tmp_path / "killed", val_fn=make_val_fn())
    assert result.resumed_from == 10 and result.last_step == 20
    assert [h["step"] for h in result.history] == [10, 20]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_on_step_sees_every_step_index_once_and_a_resume_continues_from_its_step(tmp_path):
    seen = []

    def kill_at_10(step, metrics):
        if step == 10:
            raise Stop

    with pytest.raises(Stop):
        fit(new_model(), loss_fn, random_batches(), settings(), tmp_path, val_fn=make_val_fn(),
            on_validation=kill_at_10, on_step=seen.append)
    assert seen == list(range(10))
    fit(new_model(), loss_fn, random_batches(), settings(), tmp_path, val_fn=make_val_fn(), on_step=seen.append)
    assert seen == list(range(20))  # the λ schedule of a resumed student picks up where it stopped


def test_a_finished_run_returns_its_result_without_training(tmp_path, capsys):
    first = fit(new_model(), loss_fn, random_batches(), settings(steps=10), tmp_path, val_fn=make_val_fn())

    def no_batches():
        raise AssertionError("a finished run must not draw batches")
        yield

    again = fit(new_model(), loss_fn, no_batches(), settings(steps=10), tmp_path, val_fn=make_val_fn())
    assert again.resumed_from == 10 and again.best_metric == first.best_metric and again.history == first.history
    # A process killed after its last checkpoint (e.g. an Optuna trial before it was marked complete) says it
    # resumed even though nothing is left to train.
    assert "resumed at step 10; all 10 steps already trained" in capsys.readouterr().out


def test_raising_steps_extends_a_finished_run(tmp_path):
    fit(new_model(), loss_fn, random_batches(), settings(steps=10), tmp_path, val_fn=make_val_fn())
    longer = fit(new_model(), loss_fn, random_batches(), settings(steps=20), tmp_path, val_fn=make_val_fn())
    assert longer.resumed_from == 10 and longer.last_step == 20


def test_resume_with_another_architecture_or_recipe_is_refused(tmp_path):
    fit(new_model(), loss_fn, random_batches(), settings(steps=10), tmp_path, val_fn=make_val_fn(), extra_meta={"arch": "w8"})
    with pytest.raises(IncompatibleCheckpointError, match="'arch'"):
        fit(new_model(), loss_fn, random_batches(), settings(steps=20), tmp_path, extra_meta={"arch": "w16"})
    with pytest.raises(IncompatibleCheckpointError, match="shape mismatch"):
        fit(TinySegNet(width=4), loss_fn, random_batches(), settings(steps=20), tmp_path, extra_meta={"arch": "w8"})
    with pytest.raises(IncompatibleCheckpointError, match="setting 'lr'"):
        fit(new_model(), loss_fn, random_batches(), settings(steps=20, lr=1e-3), tmp_path, extra_meta={"arch": "w8"})


def test_without_validation_only_last_is_written(tmp_path):
    result = fit(new_model(), loss_fn, random_batches(), settings(steps=6, val_every=0), tmp_path)
    assert result.best_path is None and result.best_metric is None
    assert [h["step"] for h in result.history] == [6] and (tmp_path / "last.pt").is_file()


def test_bad_validation_output_and_diverging_loss_fail_loudly(tmp_path):
    with pytest.raises(ValueError, match="'dice'"):
        fit(new_model(), loss_fn, random_batches(), settings(steps=2, val_every=1), tmp_path / "a", val_fn=lambda m: {"acc": 1.0})

    def nan_loss(model, batch):
        return model(batch["image"]).sum() * float("nan"), {}

    with pytest.raises(FloatingPointError, match=r"loss became nan within steps 1-2"):
        fit(new_model(), nan_loss, random_batches(), settings(steps=2), tmp_path / "b")


def test_finite_loader_is_restarted_but_an_exhausted_iterator_is_an_error(tmp_path):
    loader = [next(random_batches()) for _ in range(3)]  # a re-iterable, like a DataLoader
    assert fit(new_model(), loss_fn, loader, settings(steps=7, val_every=0), tmp_path / "a").last_step == 7
    with pytest.raises(ValueError, match="ran out"):
        fit(new_model(), loss_fn, iter(loader), settings(steps=7, val_every=0), tmp_path / "b")


def test_settings_come_from_a_config_section():
    cfg = load_config("demo")
    s = TrainSettings.from_config(cfg["teacher"], seed=cfg["run"]["seed"])
    assert (s.steps, s.lr, s.warmup_steps, s.schedule, s.grad_clip, s.amp) == (
        cfg["teacher"]["steps"], cfg["teacher"]["lr"], cfg["teacher"]["warmup_steps"], cfg["teacher"]["schedule"], 1.0, cfg["teacher"]["amp"])
    assert TrainSettings.from_config({"steps": 5, "lr": "1e-3"}).lr == 1e-3  # PyYAML reads 1e-3 as a string
    with pytest.raises(TrainSettingsError, match="schedule"):
        TrainSettings.from_config({"steps": 5, "lr": 1e-3, "schedule": "step"})
    with pytest.raises(TrainSettingsError, match="'lr'"):
        TrainSettings.from_config({"steps": 5})
    for switch in ("slab_conv", "channels_last"):  # a YAML "yes" string is not a boolean
        with pytest.raises(TrainSettingsError, match=f"{switch} must be true or false, got 'yes'"):
            TrainSettings.from_config({"steps": 5, "lr": 1e-3, switch: "yes"})
    assert TrainSettings.from_config(cfg["distill"], seed=0).channels_last is True  # the demo's students: channels-last
    assert s.channels_last is True  # and its teacher (configs/demo.yaml: 1.14x per step capped to AVX2)
    with pytest.raises(TrainSettingsError, match="steps"):
        TrainSettings(steps=0, lr=1e-3)


def test_bf16_on_cpu_is_opt_in_and_only_where_the_cpu_has_it(tmp_path):
    from training.precision import cpu_has_native_bf16

    def recording(dtypes):
        def fn(model, batch):
            dtypes.add(model(batch["image"]).dtype)
            return loss_fn(model, batch)
        return fn

    default, opted = set(), set()
    fit(new_model(), recording(default), random_batches(), settings(steps=4, amp=True), tmp_path / "default")
    assert default == {torch.float32}  # amp: true means CUDA AMP; a CPU run stays float32
    result = fit(new_model(), recording(opted), random_batches(), settings(steps=80, val_every=20, amp="bf16"),
                 tmp_path / "bf16", val_fn=make_val_fn())
    assert opted == ({torch.bfloat16} if cpu_has_native_bf16() else {torch.float32})
    assert result.best_metric > 0.9  # learns under bf16 autocast as in float32


class _NaNGradUnderBf16(torch.autograd.Function):
    """Identity whose backward returns NaN when the forward ran under CPU bf16 autocast: a stand-in for oneDNN's
    bf16 convolution backward on AVX512-BF16 CPUs without AMX, which does so now and then for finite inputs."""

    @staticmethod
    def forward(ctx, x):
        ctx.bf16 = torch.is_autocast_enabled("cpu")
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan") if ctx.bf16 else grad


@pytest.mark.parametrize("grad_clip", [1.0, None])  # the check reads clipping's norm, or measures one without it
def test_a_bf16_step_with_non_finite_gradients_is_recomputed_in_float32(tmp_path, monkeypatch, capsys, grad_clip):
    import training.precision

    monkeypatch.setattr(training.precision, "cpu_has_native_bf16", lambda: True)  # autocast bf16 on any CPU
    calls = []  # (autocast on, step of the call)

    def faulty(model, batch):
        calls.append(torch.is_autocast_enabled("cpu"))
        bf16_calls = sum(calls)
        loss, logs = loss_fn(model, batch)
        if calls[-1] and bf16_calls in (3, 5):  # the 3rd and 5th bf16 steps get NaN gradients
            loss = _NaNGradUnderBf16.apply(loss)
        return loss, logs

    model = new_model()
    result = fit(model, faulty, random_batches(), settings(steps=8, val_every=4, amp="bf16", grad_clip=grad_clip), tmp_path,
                 val_fn=make_val_fn())
    assert calls == [True, True, True, False, True, True, False, True, True, True], calls  # 8 steps, 2 recomputed
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.best_metric is not None
    assert "2 step(s) of this session recomputed in float32" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cuda_learns_and_resumes(tmp_path, amp):
    result = fit(new_model(), loss_fn, random_batches(), settings(steps=80, amp=amp), tmp_path, val_fn=make_val_fn(), device="cuda")
    assert result.best_metric > 0.9
    ckpt = load_checkpoint(result.last_path)
    assert (ckpt["scaler"] is not None) == (amp == "fp16")
    again = fit(new_model(), loss_fn, random_batches(), settings(steps=90, amp=amp), tmp_path, val_fn=make_val_fn(), device="cuda")
    assert again.resumed_from == 80 and again.last_step == 90


def test_loss_fn_with_a_wrong_return_type_is_named(tmp_path):
    with pytest.raises(TypeError, match="loss_fn must return"):
        fit(new_model(), lambda m, b: [m(b["image"]).mean()], random_batches(), settings(steps=2), tmp_path)
    bare = fit(new_model(), lambda m, b: loss_fn(m, b)[0], random_batches(), settings(steps=2), tmp_path / "bare")
    assert bare.last_step == 2


def test_logged_values_may_be_device_tensors_and_are_averaged_at_the_flush():
    """A loss_fn may log 0-d tensors (KDLoss's kd/sup, the sampler's labelled share): the window sums them where
    they are and reads them once per flush, so a GPU is not waited for every step."""
    from training.loop import _Window

    window = _Window(torch.device("cpu"))
    window.add(torch.tensor(1.0), logs={"kd": torch.tensor(0.5), "share": 1.0})
    window.add(torch.tensor(3.0), logs={"kd": torch.tensor(1.5, dtype=torch.bfloat16), "share": 0.0})
    assert isinstance(window.floats["kd"], torch.Tensor), "kept as a tensor until the flush"
    assert window.flush(2, "run") == {"loss": 2.0, "kd": 1.0, "share": 0.5}
