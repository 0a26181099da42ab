"""LoRA on SAM-Med3D's fused qkv projections, with the project's LoRA (``teacher.adapter.LoRAQV``: SAMed's
rank-r updates of q and v, B zero-initialised, so a freshly wrapped layer computes what the base did).

SAM-Med3D's attention calls ``self.qkv(x)`` once; wrapping that linear keeps its attention code unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from teacher.adapter import LoRAQV


class LoRAQKV(nn.Module):
    """``base(x)`` with ``LoRAQV``'s deltas added to the q and v thirds (k untouched).

    Args:
        base: the fused ``dim → 3·dim`` projection (freeze it outside).
        rank: LoRA rank r.
    """

    def __init__(self, base: nn.Linear, rank: int = 4) -> None:
        super().__init__()
        if base.out_features != 3 * base.in_features:
            raise ValueError(f"LoRAQKV wraps a fused qkv layer (out = 3 x in), got {base.in_features}→{base.out_features}")
        self.base = base
        self.lora = LoRAQV(base.in_features, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``... x dim`` → ``... x 3·dim``."""
        dq, dv = self.lora(x)
        return self.base(x) + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)


def inject_lora_qkv(module: nn.Module, rank: int = 4) -> list[LoRAQKV]:
    """Wrap every attention's ``qkv`` linear under ``module`` with ``LoRAQKV``; returns the wrappers."""
    wrapped = []
    for sub in list(module.modules()):
        qkv = getattr(sub, "qkv", None)
        if isinstance(qkv, nn.Linear):
            sub.qkv = LoRAQKV(qkv, rank)
            wrapped.append(sub.qkv)
    return wrapped
