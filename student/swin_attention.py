"""SwinUNETR window attention through one fused ``scaled_dot_product_attention`` call, in training too.

MONAI's ``WindowAttention`` computes ``softmax(q·kᵀ·scale + bias + mask) · v`` as separate ops: two
batched matmuls, two broadcast adds and a softmax, each a pass over a ``windows x heads x n x n`` tensor and
each kept for the backward. Its own ``use_flash_attention`` switch takes the fused path only when autograd is
off, so training never sees it. ``FusedWindowAttention`` computes the same function with the same parameters
(``qkv``, ``proj``, ``relative_position_bias_table``) and buffers in one fused call, forward and backward:
a state dict loads into either class unchanged, and the outputs agree to float rounding
(``tests/test_student_attention.py``).

It is a setting of ``python -m benchmarks.train_step`` (``fused_attention``), not of the students: with 4³
windows attention is ~6 % of a SwinUNETR-tiny training step (convolution backward is ~half of it), and the
fused call measured 0.98x the explicit one (0.293 against 0.287 s/step, 64 x 64 x 32, batch 1, 2 threads,
AVX-512 EPYC; 0.97x with oneDNN and ATen capped to AVX2). So the students keep MONAI's path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn


def fused_forward(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """MONAI ``WindowAttention.forward`` as one ``scaled_dot_product_attention`` call.

    Args:
        module: a MONAI ``WindowAttention`` (its ``qkv``, ``proj``, bias table and index are used).
        x: ``(B·windows) x n x C`` tokens of each window.
        mask: ``windows x n x n`` additive shifted-window mask (0 or -100), or None for unshifted blocks.
    """
    b, n, c = x.shape
    heads = module.num_heads
    qkv = module.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    index = module.relative_position_index[:n, :n].reshape(-1)
    bias = module.relative_position_bias_table[index].reshape(n, n, heads).permute(2, 0, 1)  # heads x n x n
    if mask is None:
        attn_mask = bias.unsqueeze(0)  # broadcast over every window
    else:
        windows = mask.shape[0]
        # Windows are the inner factor of the batch (MONAI's window_partition), as in its explicit path.
        attn_mask = (bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype))  # windows x heads x n x n
        attn_mask = attn_mask.unsqueeze(0).expand(b // windows, windows, heads, n, n).reshape(b, heads, n, n)
    dropout = module.attn_drop.p if module.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype), dropout_p=dropout,
                                         scale=module.scale)
    out = out.transpose(1, 2).reshape(b, n, c)
    return module.proj_drop(module.proj(out))


class FusedWindowAttention(WindowAttention):
    """MONAI's window attention, computed by one fused SDPA call (:func:`fused_forward`)."""

    def forward(self, x, mask):  # noqa: D102 - see fused_forward
        return fused_forward(self, x, mask)


def use_fused_attention(model: nn.Module) -> int:
    """Switch every MONAI ``WindowAttention`` in ``model`` to ``FusedWindowAttention``, in place.

    Parameters and buffers stay where they are (only the class changes), so optimisers and state dicts are
    unaffected. Returns the number of modules switched.
    """
    switched = 0
    for module in model.modules():
        if type(module) is WindowAttention:
            module.__class__ = FusedWindowAttention
            switched += 1
    return switched
