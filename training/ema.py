"""Exponential moving average of a model's trainable weights (Polyak averaging).

Validation and the best checkpoint use the averaged weights; training steps the raw ones::

    ema = WeightAverage(model, decay=0.99)
    ...optimizer.step(); ema.update(model)
    with ema.applied(model):
        metrics = validate(model)

The first updates use ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the average is not pinned to the
random initial weights of a short run (TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` rule).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch import nn


class WeightAverageError(ValueError):
    """An unusable decay or a saved average that does not fit the model; the message says which."""


class WeightAverage:
    """A float32 shadow copy of every trainable parameter, averaged after each optimizer step.

    Args:
        model: the unwrapped model; its parameters with ``requires_grad`` are averaged (frozen ones never change).
        decay: weight of the old average per update, in ``(0, 1)``; an average over ~``1 / (1 - decay)`` steps.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        decay = float(decay)
        if not (0.0 < decay < 1.0) or not math.isfinite(decay):
            raise WeightAverageError(f"ema_decay must be in (0, 1) (0 turns the average off), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        """The decay the next update uses (smaller during the first few dozen updates)."""
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards the model's current weights."""
        weight = 1.0 - self.current_decay()
        params = dict(model.named_parameters())
        for name, avg in self.shadow.items():
            avg.lerp_(params[name].detach().float(), weight)
        self.updates += 1

    @contextmanager
    @torch.no_grad()
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Put the averaged weights into ``model`` for the block, then give the raw ones back (even on error)."""
        params = dict(model.named_parameters())
        raw = {name: params[name].detach().clone() for name in self.shadow}
        try:
            for name, avg in self.shadow.items():
                params[name].copy_(avg)
            yield model
        finally:
            for name, value in raw.items():
                params[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: Mapping[str, Any], source: str = "checkpoint") -> None:
        """Take a saved average back; its parameter names and shapes must match this model's trainable ones."""
        shadow = state.get("shadow") or {}
        missing, extra = sorted(set(self.shadow) - set(shadow)), sorted(set(shadow) - set(self.shadow))
        wrong = sorted(n for n in set(shadow) & set(self.shadow) if tuple(shadow[n].shape) != tuple(self.shadow[n].shape))
        if missing or extra or wrong:
            raise WeightAverageError(
                f"{source}: the saved weight average does not fit the model "
                f"(missing {missing[:3]}, unexpected {extra[:3]}, other shape {wrong[:3]})")
        for name, avg in self.shadow.items():
            avg.copy_(shadow[name].to(avg.device, torch.float32))
        self.updates = int(state.get("updates", 0))
