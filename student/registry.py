"""Student factory: named MONAI networks mapping ``B x C x X x Y x Z`` to logits ``B x K x X x Y x Z``.

A registry of named configurations built by small private functions (as ``build_sam`` does): a new
student is a few lines here, not a new code path elsewhere.

Architecture options (``ARCH_OPTIONS``: SwinUNETR's attention ``window_size`` and ``use_v2``) have their
defaults here, are set per run by ``student.arch`` in the config, and are recorded in every student
checkpoint (``meta["arch"]["options"]``), so export, deploy and the benchmarks rebuild exactly what was
trained. A checkpoint without options was trained with the defaults.
"""
from __future__ import annotations

from typing import Callable, Mapping

from torch import nn


class UnknownStudentError(ValueError):
    """A student name that is not in the registry; the message lists the known names."""


def _swinunetr(feature_size: int) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, window_size: int = 7, use_v2: bool = False) -> nn.Module:
        from monai.networks.nets import SwinUNETR

        # monai >= 1.5 dropped ``img_size``: the network works at any size divisible by 32.
        return SwinUNETR(
            in_channels=in_channels,
            out_channels=num_classes,
            feature_size=feature_size,
            spatial_dims=3,
            window_size=int(window_size),
            use_v2=bool(use_v2),
            use_checkpoint=False,
        )

    return build


def _unet_small(num_classes: int, in_channels: int) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=(16, 32, 64, 128),
        strides=(2, 2, 2),
        num_res_units=2,
        norm="instance",
    )


def _basic_unet(num_classes: int, in_channels: int) -> nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes, features=(16, 16, 32, 64, 128, 16))


STUDENTS: dict[str, Callable[..., nn.Module]] = {
    "swinunetr_tiny": _swinunetr(12),
    "swinunetr_small": _swinunetr(24),
    "unet_small": _unet_small,
    "basic_unet": _basic_unet,
}

# Architecture options each student takes, with their defaults (MONAI's). SwinUNETR's 7³ windows pad a
# 32 x 32 x 16 token grid (64 x 64 x 32 ROI) to 35 x 35 x 21; 4³ windows tile it exactly (benchmarks.train_step).
_SWIN_OPTIONS = {"window_size": 7, "use_v2": False}
ARCH_OPTIONS: dict[str, dict[str, object]] = {
    "swinunetr_tiny": _SWIN_OPTIONS, "swinunetr_small": _SWIN_OPTIONS, "unet_small": {}, "basic_unet": {},
}

# Modules whose operations an INT8 export keeps in float32 by default (export.int8_fp32_modules: null). SwinUNETR's
# decoder2 convolves the concatenation of the upsampled decoder features with the first encoder stage's, at the
# highest resolution but one; one INT8 scale does not fit both. NNCF's accuracy control reverted exactly these two
# convolutions for the demo's KD tiny student capped to AVX2 (INT8 drop 0.024 -> 0.0037 on the validation crops,
# after ranking 70 quantizer groups in 70 s); keeping them float32 from the start gives the same INT8 model in
# 33 s of export instead of 107, and costs a student that needed nothing reverted +2 % INT8 latency (21.7 ->
# 22.2 ms per 64 x 64 x 32 window; docs/measurements.md, "INT8 without the ranking").
_SWIN_INT8_FP32 = ("decoder2.conv_block.conv1", "decoder2.conv_block.conv3")
INT8_FP32_MODULES: dict[str, tuple[str, ...]] = {"swinunetr_tiny": _SWIN_INT8_FP32, "swinunetr_small": _SWIN_INT8_FP32}

# Spatial sizes of a ROI must be multiples of this (SwinUNETR: patch 2 x four 2x merges = 32).
ROI_MULTIPLE: dict[str, int] = {"swinunetr_tiny": 32, "swinunetr_small": 32, "unet_small": 8, "basic_unet": 16}


def arch_options(name: str, options: Mapping[str, object] | None = None) -> dict[str, object]:
    """The full architecture options of a named student: its defaults with ``options`` on top.

    Options the student does not take are ignored when they belong to another student (``student.arch`` is
    one section for every student of a run: ``window_size`` means nothing to a U-Net), and refused by name
    when no student takes them (a typo).
    """
    if name not in STUDENTS:
        raise UnknownStudentError(f"unknown student {name!r}; known: {sorted(STUDENTS)}")
    known_anywhere = {k for opts in ARCH_OPTIONS.values() for k in opts}
    given = dict(options or {})
    unknown = sorted(set(given) - known_anywhere)
    if unknown:
        raise ValueError(f"student.arch: unknown option(s) {unknown}; known: {sorted(known_anywhere)}")
    defaults = ARCH_OPTIONS.get(name, {})
    out = {**defaults, **{k: v for k, v in given.items() if k in defaults}}
    if "window_size" in out and (isinstance(out["window_size"], bool) or not isinstance(out["window_size"], int)
                                 or out["window_size"] < 1):
        raise ValueError(f"student {name!r}: window_size must be a positive integer, got {out['window_size']!r}")
    if "use_v2" in out and not isinstance(out["use_v2"], bool):
        raise ValueError(f"student {name!r}: use_v2 must be true or false, got {out['use_v2']!r}")
    return out


def build_student(name: str, num_classes: int, in_channels: int = 1,
                  options: Mapping[str, object] | None = None) -> nn.Module:
    """Build a named student network (random initialisation).

    Args:
        name: one of ``STUDENTS`` (``swinunetr_tiny``, ``swinunetr_small``, ``unet_small``, ``basic_unet``).
        num_classes: K, output channels including background.
        in_channels: image channels (1 for CT).
        options: architecture options over the student's defaults (``arch_options``), e.g. ``{"window_size": 4}``.

    Returns:
        an ``nn.Module`` mapping ``B x in_channels x X x Y x Z`` to logits ``B x K x X x Y x Z``.
    """
    resolved = arch_options(name, options)
    if int(num_classes) < 2:
        raise ValueError(f"student {name!r}: num_classes must be >= 2 (background + one class), got {num_classes}")
    if int(in_channels) < 1:
        raise ValueError(f"student {name!r}: in_channels must be >= 1, got {in_channels}")
    return STUDENTS[name](int(num_classes), int(in_channels), **resolved)


def check_roi(name: str, roi_size: list[int] | tuple[int, ...]) -> None:
    """Refuse a ROI the named student cannot run at (e.g. SwinUNETR needs multiples of 32).

    Args:
        name: student name.
        roi_size: ``[X, Y, Z]``.
    """
    multiple = ROI_MULTIPLE.get(name, 1)
    if len(roi_size) != 3 or any(int(s) <= 0 or int(s) % multiple for s in roi_size):
        raise ValueError(f"student {name!r}: roi_size {list(roi_size)} must be 3 positive multiples of {multiple}")
    bottleneck = 1
    for s in roi_size:
        bottleneck *= int(s) // multiple
    if bottleneck < 2:
        # Instance norm at the deepest stage needs more than one voxel (32^3 leaves a 1^3 bottleneck).
        raise ValueError(f"student {name!r}: roi_size {list(roi_size)} leaves a single voxel at the bottleneck; "
                         f"use at least {multiple * 2} along one axis")
