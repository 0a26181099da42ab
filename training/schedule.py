"""Optimizer and learning-rate schedule: AdamW with decoupled weight decay, linear warm-up then a decay.

The schedule is a multiplier of the base rate, a pure function of the step, so a resumed run (or a run
whose ``steps`` was raised) recomputes it exactly instead of trusting a pickled closure.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterable

import torch
from torch import nn

SCHEDULES = ("constant", "poly", "cosine")


class ScheduleError(ValueError):
    """A schedule or optimizer setting that cannot be used; the message names the value."""


def lr_lambda(step: int, warmup_steps: int, total_steps: int, kind: str = "constant", power: float = 0.9) -> float:
    """Multiplier of the base learning rate for the optimizer step with index ``step`` (0-based).

    Warm-up ramps linearly: step ``i < warmup_steps`` gets ``(i + 1) / warmup_steps`` (never 0, so the
    first step already moves). After warm-up, with ``t = (step - warmup_steps) / (total_steps - warmup_steps)``
    clamped to [0, 1]: ``constant`` → 1, ``poly`` → ``(1 - t) ** power``, ``cosine`` → ``(1 + cos(pi t)) / 2``.
    Both decays reach exactly 0 at ``step == total_steps``.

    Args:
        step: optimizer steps already taken.
        warmup_steps: length of the linear ramp (0 disables it).
        total_steps: steps of the whole run.
        kind: ``"constant"``, ``"poly"`` or ``"cosine"``.
        power: exponent of the poly decay.
    """
    if kind not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")
    if warmup_steps < 0 or total_steps < 1:
        raise ScheduleError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    t = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if kind == "poly":
        return (1.0 - t) ** power
    return 0.5 * (1.0 + math.cos(math.pi * t))


def is_no_decay(name: str, param: nn.Parameter, module: nn.Module | None = None) -> bool:
    """Whether a parameter is exempt from weight decay: 1-D tensors (norm scales, biases), embedding
    tables and positional tables (``pos_embed``, ``rel_pos*``, ``*_embed``/``*embedding`` leaves), whose
    scale carries meaning that decay would erode.

    Args:
        name: the parameter's qualified name (``blocks.0.norm1.weight``).
        param: the parameter.
        module: the module that owns it, if known.
    """
    leaf = name.rsplit(".", 1)[-1]
    if param.ndim <= 1 or isinstance(module, nn.Embedding):
        return True
    return leaf.startswith("rel_pos") or "pos_embed" in leaf or leaf.endswith(("_embed", "embedding", "_token", "_tokens"))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters of ``model`` into a decayed and a non-decayed group.

    Frozen parameters (``requires_grad=False``) are left out entirely, so AdamW keeps no state for them.
    Group order and parameter order follow ``model.named_modules()``, which makes optimizer state dicts
    of identically built models interchangeable (resume).

    Args:
        model: the model (DDP wrappers welcome).
        weight_decay: decay of the first group.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{leaf}" if module_name else leaf
            (no_decay if is_no_decay(name, param, module) else decay).append(param)
    if not decay and not no_decay:
        raise ScheduleError(f"{type(model).__name__} has no trainable parameters")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model``, without decay on norms, biases and embeddings.

    Args:
        model: the model.
        lr: base learning rate.
        weight_decay: decoupled weight decay of the matrices and kernels.
        betas: Adam's moment coefficients.
    """
    if lr <= 0 or weight_decay < 0:
        raise ScheduleError(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, kind: str = "constant", power: float = 0.9
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_lambda`; call ``scheduler.step()`` after every optimizer step.

    Args:
        optimizer: the optimizer whose groups are scheduled.
        warmup_steps: length of the linear warm-up.
        total_steps: steps of the whole run.
        kind: ``"constant"``, ``"poly"`` or ``"cosine"``.
        power: exponent of the poly decay.
    """
    lr_lambda(0, warmup_steps, total_steps, kind, power)  # validate now, not at the first step
    fn: Callable[[int], float] = functools.partial(
        lr_lambda, warmup_steps=warmup_steps, total_steps=total_steps, kind=kind, power=power
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def trainable_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    """The parameters an optimizer built here updates (for counting and grad clipping)."""
    return (p for p in model.parameters() if p.requires_grad)
