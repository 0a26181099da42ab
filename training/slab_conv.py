"""Batch-1 3D convolutions on oneDNN: cut the volume into depth slabs and convolve them as one batch.

PyTorch picks the CPU kernel of a float32 convolution by a heuristic (ATen's ``ConvParams::use_mkldnn``): a
3 x 3 x 3 convolution of batch 1 whose ``N·C·D·H`` is at most 20480 skips oneDNN for ATen's own im2col + GEMM
path (``slow_conv3d``). In a SwinUNETR-tiny training step (batch 1, 64 x 64 x 32) that is 21 of its 28
forward convolutions, every one at 32 x 32 x 16 and below, and their backward: ~40 % of the step. One
12 -> 12 channel 3³ convolution at 32 x 32 x 16, forward + backward, 2 threads: 37.9 ms on that path, 5.1 ms
as two slabs on oneDNN (7.4x; oneDNN, ATen and MKL capped to AVX2 on an AMD EPYC; 18.6 against 3.9 ms
uncapped, with AVX-512).

:func:`slab_conv3d` computes the same convolution exactly: it zero-pads the depth axis as the convolution
would, cuts the input into ``slabs`` overlapping pieces (each with the halo its outputs read), stacks them on
the batch axis, convolves without depth padding and concatenates the outputs along depth. The batch is then
at least 2, so oneDNN takes the call; autograd runs through the pad, the slices and the concatenation, so the
gradients are the convolution's. The extra work is the halo: two voxels of depth per slab for a 3³ kernel.

:func:`route_convolutions` switches a model's ``nn.Conv3d`` modules to :class:`SlabConv3d`, in place. The
parameters and the state dict are unchanged; a call is slabbed only where ``torch._C._select_conv_backend``
says ATen would take its slow path and would take oneDNN for the slabs (decided once per shape), never under
ONNX export or tracing (exports see one convolution). ``training.loop.fit`` routes every model it trains on
a CPU; ``python -m benchmarks.train_step --settings window4 slab_conv`` measures it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_SLOW = {torch._C._ConvBackend.Slow3d, torch._C._ConvBackend.SlowDilated3d}
_decisions: dict[tuple, bool] = {}


def _slab_plan(depth: int, kernel: int, stride: int, padding: int, dilation: int, slabs: int
               ) -> list[tuple[int, int, int]] | None:
    """``(input_start, input_stop, keep_from)`` per slab over the depth-padded input, or None where the
    output is too shallow to cut. Every slab has the same output depth (so they stack); the last one starts
    early where the output depth does not divide, and ``keep_from`` drops the outputs it shares."""
    reach = dilation * (kernel - 1) + 1
    out = (depth + 2 * padding - reach) // stride + 1
    if out < slabs:
        return None
    length = -(-out // slabs)
    plan, done = [], 0
    for i in range(slabs):
        first = min(i * length, out - length)
        plan.append((first * stride, (first + length - 1) * stride + reach, done - first))
        done = first + length
    return plan


def slab_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                slabs: int = 2) -> torch.Tensor | None:
    """``F.conv3d(x, weight, bias, stride, padding, dilation, groups)`` computed as ``slabs`` depth slabs in
    one batch (zero padding only); None where the output depth is under ``slabs``."""
    plan = _slab_plan(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0], slabs)
    if plan is None:
        return None
    if padding[0]:
        x = F.pad(x, (0, 0, 0, 0, padding[0], padding[0]))
    pieces = torch.cat([x[:, :, start:stop] for start, stop, _ in plan], 0)
    y = F.conv3d(pieces, weight, bias, stride, (0, padding[1], padding[2]), dilation, groups)
    parts = y.split(x.shape[0], 0)
    return torch.cat([part[:, :, keep:] if keep else part for part, (_, _, keep) in zip(parts, plan)], 2)


def _worth_slabbing(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int], groups: int, slabs: int) -> bool:
    """True where ATen would run this call on its slow path and the slabs on oneDNN (cached per shape)."""
    key = (tuple(x.shape), tuple(weight.shape), tuple(stride), tuple(padding), tuple(dilation), groups, slabs,
           x.requires_grad or weight.requires_grad)
    decision = _decisions.get(key)
    if decision is None:
        decision = False
        args = (list(stride), list(padding), list(dilation), False, [0, 0, 0], groups, None)
        if torch._C._select_conv_backend(x, weight, None, *args) in _SLOW:
            plan = _slab_plan(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0], slabs)
            if plan is not None:
                start, stop, _ = plan[0]
                probe = x.new_empty((x.shape[0] * slabs, x.shape[1], stop - start, *x.shape[3:]))
                slab_args = (list(stride), [0, padding[1], padding[2]], *args[2:])
                decision = torch._C._select_conv_backend(probe, weight, None, *slab_args) \
                    == torch._C._ConvBackend.Mkldnn
        _decisions[key] = decision
    return decision


class SlabConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose slow-path calls run as depth slabs on oneDNN (:func:`slab_conv3d`); same
    parameters, same state dict, same outputs to float rounding."""

    slabs = 2

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if _bf16_kernel_overhangs(input, weight):
            # oneDNN's bf16 convolution backward on AVX512-BF16 CPUs without AMX returns garbage weight gradients
            # (up to 1e36, now and then NaN) where the kernel is larger than the input: 16 -> 16 channels, 3³, on
            # 2³ voxels, in 53 of 100 calls (AMD EPYC, torch 2.14.1; float32 0 of 100). The teacher's prompt
            # generator convolves such grids at its bottom. Such a convolution is tiny: it runs in float32.
            with torch.autocast("cpu", enabled=False):
                return super()._conv_forward(input.float(), weight.float(), None if bias is None else bias.float())
        if (self.padding_mode == "zeros" and not isinstance(self.padding, str) and input.device.type == "cpu"
                and input.dtype == torch.float32 and input.dim() == 5 and not torch.is_autocast_enabled("cpu")
                and not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
                         or torch.compiler.is_compiling() or torch.compiler.is_exporting())
                and _worth_slabbing(input, weight, self.stride, self.padding, self.dilation, self.groups,
                                    self.slabs)):
            out = slab_conv3d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups, self.slabs)
            if out is not None:
                return out
        return super()._conv_forward(input, weight, bias)


def _bf16_kernel_overhangs(input: torch.Tensor, weight: torch.Tensor) -> bool:
    """A CPU bf16-autocast call whose input is smaller than the kernel along some spatial axis."""
    return (input.device.type == "cpu" and input.dim() == 5 and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and any(n < k for n, k in zip(input.shape[2:], weight.shape[2:])))


def route_convolutions(model: nn.Module) -> int:
    """Switch every plain ``nn.Conv3d`` in ``model`` to :class:`SlabConv3d`, in place; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = SlabConv3d
            count += 1
    return count
