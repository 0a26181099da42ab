"""The training loop shared by teacher training and student distillation.

A stage script builds a model, an endless stream of batches and a loss, then calls :func:`fit`::

    settings = TrainSettings.from_config(cfg["teacher"], seed=cfg["run"]["seed"])
    result = fit(model, loss_fn, batches, settings, out_dir, val_fn=val_fn,
                 extra_meta={"labels": labels, "preprocess": spec, "config": cfg}, tracker=tracker)

``fit`` trains by steps, validates every ``val_every`` steps and at the end, writes ``last.pt`` after each
validation and ``best.pt`` when the validation Dice improves, and resumes from ``last.pt`` when it finds
one. Under ``torchrun`` it wraps the model in DDP, seeds each rank's data with ``seed + rank``, validates
and writes on rank 0 only, and shares rank 0's metrics with every rank.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from training.checkpoint import check_compatible, load_checkpoint, restore_training_state, save_checkpoint
from training.distributed import (
    resolve_device,
    all_gather_object,
    barrier,
    broadcast_object,
    get_rank,
    get_world_size,
    rank_seed,
    unwrap_model,
    wrap_model,
)
from training.ema import WeightAverage
from training.memory_format import to_channels_last_3d
from training.slab_conv import route_convolutions
from training.precision import autocast_dtype
from training.rng import capture_rng_state, restore_rng_state, seed_everything
from training.schedule import build_optimizer, build_scheduler, trainable_parameters
from training.settings import TrainSettings  # also imported from here by the stages (distill/train.py)

if TYPE_CHECKING:
    from training.tracking import Tracker

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]"]  # logs: floats or 0-d tensors
ValFn = Callable[[nn.Module], Mapping[str, float]]


@dataclass
class FitResult:
    """What a finished (or already finished) :func:`fit` reports.

    Attributes:
        best_metric: best validation Dice, None without validation.
        best_step: step of ``best_metric``.
        last_step: steps trained in total.
        history: one dict per validation: ``step``, ``train_loss`` (mean since the previous one), ``train_s``
            (training seconds up to that step, validation excluded), metrics.
        best_path: ``out_dir/best.pt`` if written.
        last_path: ``out_dir/last.pt``.
        wall_s: wall time of the whole run, across resumptions.
        s_per_step: mean time of a training step (validation and checkpointing excluded).
        resumed_from: the step it resumed at, None for a fresh start.
    """

    best_metric: float | None
    best_step: int | None
    last_step: int
    history: list[dict[str, float]]
    best_path: Path | None
    last_path: Path
    wall_s: float
    s_per_step: float | None
    resumed_from: int | None = None


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    cfg: TrainSettings,
    out_dir: str | Path,
    val_fn: ValFn | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    on_validation: Callable[[int, dict[str, float]], None] | None = None,
    tracker: "Tracker | None" = None,
    on_step: Callable[[int], None] | None = None,
    device: str | torch.device = "cpu",
    resume: bool = True,
) -> FitResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps, validating and checkpointing along the way.

    Args:
        model: the model; moved to ``device``; wrapped in DDP when a process group is active (pass a
            DDP model yourself to choose e.g. ``find_unused_parameters``).
        loss_fn: ``loss_fn(model, batch) -> (loss, logs)``; ``batch`` already on ``device``; ``loss`` a
            scalar tensor, ``logs`` a dict of floats averaged into the tracker's ``train/*`` metrics
            (a bare loss tensor is accepted too). Runs under autocast when AMP is on.
        batches: an endless iterator of batches (tensors, or dicts/tuples of them). A finite re-iterable
            (e.g. a DataLoader) is restarted when exhausted. An object with ``start(seed, step)``
            (``training.batches.crop_batches``) is started at the run's per-rank seed and its first step, so a
            resumed run draws the batches an uninterrupted one draws.
        cfg: training settings.
        out_dir: folder of ``last.pt`` and ``best.pt``.
        val_fn: ``val_fn(model) -> {"dice": float, ...}`` on the unwrapped model in eval mode under
            ``torch.no_grad()``, higher Dice is better; run on rank 0 only. None: no validation, no best.pt.
        extra_meta: stage metadata saved in the checkpoints (``config``, ``labels``, ``arch`` ...); on
            resume every key but ``config`` must match what ``last.pt`` holds.
        on_step: ``on_step(step)`` before each step's batch is drawn, with the steps already taken (0-based, the
            resumed step after a resume), for losses that follow the step (``distill.lambda_schedule``).
        on_validation: ``on_validation(step, metrics)`` after each validation, once ``last.pt`` is written,
            on every rank; an exception it raises (``optuna.TrialPruned``) propagates.
        tracker: a :class:`training.tracking.Tracker` inside an open run, or None.
        device: ``"cpu"``, ``"cuda"`` (this rank's GPU under torchrun), ``"cuda:1"``, ``"auto"``.
        resume: continue from ``out_dir/last.pt`` if present (a finished run returns at once).
    """
    out_dir = Path(out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    device = resolve_device(device)
    rank, world_size = get_rank(), get_world_size()
    main = rank == 0
    started = time.perf_counter()

    model = model.to(device)
    if device.type == "cpu" and cfg.slab_conv:
        route_convolutions(model)  # batch-1 3D convolutions on oneDNN, not ATen's slow path: training.slab_conv
    memory_format = torch.channels_last_3d if device.type == "cpu" and cfg.channels_last else None
    if memory_format is not None:
        to_channels_last_3d(model)
    net = wrap_model(model)
    plain = unwrap_model(net)
    optimizer = build_optimizer(plain, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps, cfg.schedule, cfg.poly_power)
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    extra_meta = dict(extra_meta or {})
    ema = WeightAverage(plain, cfg.ema_decay) if cfg.ema_decay else None

    step, best, best_step = 0, -math.inf, None
    history: list[dict[str, float]] = []
    wall_before, train_s = 0.0, 0.0
    resumed_from = None
    if resume and last_path.is_file():
        ckpt = load_checkpoint(last_path)
        check_compatible(ckpt, extra_meta, cfg.to_dict(), source=last_path)
        restore_training_state(ckpt, net, optimizer, scheduler, scaler, source=last_path)
        if ema is not None:
            if ckpt.get("ema") is not None:
                ema.load_state_dict(ckpt["ema"], source=str(last_path))
            else:  # a run started without the average: it starts from the weights trained so far
                ema = WeightAverage(plain, cfg.ema_decay)
        state = ckpt.get("train_state") or {}
        step, best = int(ckpt["step"]), float(ckpt["best_dice"])
        best_step, history = state.get("best_step"), list(state.get("history", []))
        wall_before, train_s = float(state.get("wall_s", 0.0)), float(state.get("train_s", 0.0))
        rng = ckpt.get("rng") or []
        if len(rng) == world_size:
            restore_rng_state(rng[rank])
        else:  # another world size: ranks cannot get their streams back; keep them distinct and seeded
            seed_everything(rank_seed(cfg.seed) + 1_000_003 * step)
        resumed_from = step
        del ckpt
    else:
        seed_everything(rank_seed(cfg.seed))

    def result() -> FitResult:
        return FitResult(
            best_metric=None if math.isinf(best) else best,
            best_step=best_step,
            last_step=step,
            history=history,
            best_path=best_path if best_path.is_file() else None,
            last_path=last_path,
            wall_s=wall_before + time.perf_counter() - started,
            s_per_step=train_s / step if step else None,
            resumed_from=resumed_from,
        )

    if step >= cfg.steps:
        if main and resumed_from is not None:  # killed after its last checkpoint: say so, nothing is left to do
            tqdm.write(f"fit {out_dir}: resumed at step {step}; all {cfg.steps} steps already trained")
        return result()

    progress = tqdm(
        total=cfg.steps,
        initial=step,
        disable=not (main and cfg.progress),
        mininterval=1.0 if sys.stderr.isatty() else 30.0,  # log files get a line now and then, not a flood
        dynamic_ncols=True,
        desc=out_dir.name or "train",
    )
    if main:
        n_train = sum(p.numel() for p in trainable_parameters(plain))
        progress.write(
            f"fit {out_dir}: {n_train:,} trainable params, steps {step}->{cfg.steps}, "
            f"{world_size} process(es) on {device.type}, amp {amp_dtype or 'off'}"
            + (f", resumed at step {step}" if resumed_from is not None else "")
        )

    # A stream that draws batch k from (seed, k) (training.batches.CropBatches) starts at this step: a resumed run
    # gets the batches an uninterrupted one would have; any other iterable draws as it will.
    start = getattr(batches, "start", None)
    stream = start(rank_seed(cfg.seed), step) if callable(start) else _batch_stream(batches)
    cpu_bf16 = device.type == "cpu" and amp_dtype == torch.bfloat16
    bf16_recomputed = 0  # CPU bf16 steps recomputed in float32
    # Loss and gradient norm stay on the device between log points: a host sync per step would stall
    # a GPU for nothing. Non-finite values are caught at the next log point or validation, before any
    # checkpoint is written.
    window = _Window(device)  # since the last tracker record
    since_val = _Window(device)  # since the last validation
    last_dice = f"{history[-1]['dice']:.3f}" if history and "dice" in history[-1] else "-"
    net.train()
    segment_start = time.perf_counter()  # training time excludes validation and checkpointing
    try:
        while step < cfg.steps:
            if on_step is not None:  # before the step: a loss may follow it (λ schedule)
                on_step(step)
            batch = _to_device(next(stream), device, memory_format)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss, logs = _unpack_loss(loss_fn(net, batch), step + 1)
            scaler.scale(loss).backward()
            # Under CPU bf16 the GradScaler is off (float16 only), so unscaling twice in a recomputed step is a no-op.
            norm = _clipped_norm(plain, optimizer, scaler, cfg.grad_clip, measure=cpu_bf16)
            if cpu_bf16 and not torch.isfinite(norm):
                # oneDNN's bf16 convolution backward on AVX512-BF16 CPUs without AMX returns garbage weight
                # gradients (up to 1e36, now and then NaN) where a kernel overhangs its input; training/slab_conv.py
                # computes those calls in float32, and any other non-finite step is recomputed in float32 here,
                # before the optimizer writes it into the weights (docs/measurements.md, "the bf16 NaN found").
                optimizer.zero_grad(set_to_none=True)
                loss, logs = _unpack_loss(loss_fn(net, batch), step + 1)
                loss.backward()
                norm = _clipped_norm(plain, optimizer, scaler, cfg.grad_clip, measure=False)
                bf16_recomputed += 1
                if main and bf16_recomputed == 1:
                    progress.write(f"fit {out_dir}: step {step + 1}: bf16 gradients not finite; recomputed in "
                                   "float32 (MLflow train/bf16_recomputed: the share of steps so)")
                logs = {**(logs or {}), "bf16_recomputed": 1.0}
            grad_norm = norm if cfg.grad_clip else None  # logged only where clipping computes it
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            if ema is not None:
                ema.update(plain)
            step += 1

            window.add(loss, grad_norm, lr, logs)
            since_val.add(loss)
            if step % cfg.log_every == 0 or step == cfg.steps:
                means = window.flush(step, out_dir)
                if tracker is not None:
                    tracker.log_metrics({f"train/{k}": v for k, v in means.items()}, step)
                progress.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.2e}", dice=last_dice, refresh=False)
            progress.update(1)

            if step == cfg.steps or (cfg.val_every and step % cfg.val_every == 0):
                train_loss = since_val.flush(step, out_dir)["loss"]  # waits for the device: time is honest
                train_s += time.perf_counter() - segment_start
                with _validated_weights(ema, plain):
                    metrics = _validate_on_main(plain, val_fn, step, main)
                # train_s: training seconds so far (validation excluded), for Dice-against-minutes curves.
                entry = {"step": step, "train_loss": train_loss, "train_s": round(train_s, 2), **metrics}
                history.append(entry)
                improved = "dice" in metrics and metrics["dice"] > best
                if improved:
                    best, best_step = metrics["dice"], step
                if "dice" in metrics:
                    last_dice = f"{metrics['dice']:.3f}"
                rng_states = all_gather_object(capture_rng_state())
                if main:
                    train_state = {
                        "best_step": best_step,
                        "history": history,
                        "wall_s": wall_before + time.perf_counter() - started,
                        "train_s": train_s,
                        "settings": cfg.to_dict(),
                    }
                    if improved:
                        with _validated_weights(ema, plain):
                            save_checkpoint(best_path, plain, optimizer, scheduler, step, best, extra_meta,
                                            scaler=scaler, rng_states=rng_states, train_state=train_state)
                    save_checkpoint(last_path, plain, optimizer, scheduler, step, best, extra_meta,
                                    scaler=scaler, rng_states=rng_states, train_state=train_state,
                                    ema=ema.state_dict() if ema is not None else None)
                    if tracker is not None:
                        tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step)
                    progress.write(
                        f"step {step}/{cfg.steps}: train loss {entry['train_loss']:.4f}"
                        + (f", val dice {metrics['dice']:.4f} (best {best:.4f} at step {best_step})" if "dice" in metrics else "")
                    )
                barrier()
                net.train()
                if on_validation is not None:
                    on_validation(step, dict(metrics))
                segment_start = time.perf_counter()
    finally:
        progress.close()
    if main and bf16_recomputed:
        print(f"fit {out_dir}: {bf16_recomputed} step(s) of this session recomputed in float32 (bf16 gradients not "
              "finite)", file=sys.stderr)
    if main and tracker is not None:
        done = result()
        tracker.log_metrics(
            {"best/dice": done.best_metric if done.best_metric is not None else math.nan, "time/s_per_step": done.s_per_step or math.nan},
            step,
        )
    return result()


def _clipped_norm(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, max_norm: float | None,
                  measure: bool) -> torch.Tensor | None:
    """The gradients' global norm, clipped to ``max_norm`` when it is set (the norm clipping computes anyway);
    without clipping, measured only when ``measure`` (the CPU bf16 finiteness check), else None."""
    if max_norm:
        scaler.unscale_(optimizer)
        return torch.nn.utils.clip_grad_norm_(list(trainable_parameters(model)), max_norm)
    if not measure:
        return None
    grads = [p.grad for p in trainable_parameters(model) if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


class _Window:
    """Running sums of training values between two reads; tensors are summed on their device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.grad_norm: torch.Tensor | None = None
        self.floats: dict[str, float | torch.Tensor] = {}  # a tensor value stays on its device until the flush
        self.count = 0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | None = None, lr: float | None = None,
            logs: Mapping[str, float | torch.Tensor] | None = None) -> None:
        self.loss = self.loss + loss.detach().float()
        if grad_norm is not None:
            norm = grad_norm.detach().float()
            self.grad_norm = norm if self.grad_norm is None else self.grad_norm + norm
        values = dict(logs or {})
        if lr is not None:
            values["lr"] = lr
        for k, v in values.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            self.floats[k] = self.floats.get(k, 0.0) + v
        self.count += 1

    def flush(self, step: int, source: Path) -> dict[str, float]:
        """Means since the last flush (one host sync); raises if the loss went non-finite."""
        n = max(1, self.count)
        first = step - self.count + 1
        loss = float(self.loss) / n
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss} within steps {first}-{step} ({source}); lower lr or check the data"
            )
        means = {"loss": loss, **{k: float(v) / n for k, v in self.floats.items()}}
        if self.grad_norm is not None:
            means["grad_norm"] = float(self.grad_norm) / n
        self._reset()
        return means


def _validated_weights(ema: WeightAverage | None, model: nn.Module) -> contextlib.AbstractContextManager:
    """The weights validation scores and ``best.pt`` keeps: the average while inside, when there is one."""
    return ema.applied(model) if ema is not None else contextlib.nullcontext(model)


def _validate_on_main(model: nn.Module, val_fn: ValFn | None, step: int, main: bool) -> dict[str, float]:
    """Rank 0 validates, every rank gets its metrics; a failure there stops every rank, not only rank 0."""
    outcome: tuple[str, Any] | None = None
    error: Exception | None = None
    if main:
        try:
            outcome = ("ok", _validate(model, val_fn, step))
        except Exception as exc:  # re-raised below, after the other ranks were told
            error, outcome = exc, ("error", f"{type(exc).__name__}: {exc}")
    outcome = broadcast_object(outcome)
    if error is not None:
        raise error
    if outcome[0] == "error":
        raise RuntimeError(f"validation failed on rank 0 at step {step}: {outcome[1]}")
    return outcome[1]


def _validate(model: nn.Module, val_fn: ValFn | None, step: int) -> dict[str, float]:
    if val_fn is None:
        return {}
    model.eval()
    with torch.no_grad():
        raw = val_fn(model)
    if not isinstance(raw, Mapping) or "dice" not in raw:
        raise ValueError(f"val_fn must return a dict with a 'dice' entry; got {raw!r} at step {step}")
    metrics: dict[str, float] = {}
    for k, v in raw.items():
        try:
            metrics[str(k)] = float(v)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"val_fn returned a non-numeric {k!r}={v!r} at step {step}") from exc
    return metrics


def _unpack_loss(out: Any, step: int) -> tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return out, {}
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor) and isinstance(out[1], Mapping):
        return out
    raise TypeError(f"loss_fn must return a scalar tensor or (loss, logs dict); got {type(out).__name__} at step {step}")



def _batch_stream(batches: Iterable[Any]) -> Iterator[Any]:
    iterator = iter(batches)
    restartable = iterator is not batches
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            if not restartable:
                raise ValueError("the batch iterator ran out; pass an endless iterator or a re-iterable loader") from None
            iterator = iter(batches)
            try:
                yield next(iterator)
            except StopIteration:
                raise ValueError("the batch loader yields no batches") from None


def _to_device(batch: Any, device: torch.device, memory_format: torch.memory_format | None = None) -> Any:
    """``batch`` on ``device``; with ``memory_format`` (channels_last_3d) its 5-D floating tensors in that layout."""
    if isinstance(batch, torch.Tensor):
        moved = batch.to(device, non_blocking=True)
        if memory_format is not None and moved.dim() == 5 and moved.is_floating_point():
            moved = moved.contiguous(memory_format=memory_format)
        return moved
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device, memory_format) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [_to_device(v, device, memory_format) for v in batch]
        return type(batch)(moved) if isinstance(batch, list) or type(batch) is tuple else type(batch)(*moved)
    return batch

