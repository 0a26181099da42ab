"""Measure what one teacher training step costs: seconds per step and peak accelerator memory.

The paper-size teachers are trained on a GPU; this answers "does batch 2 of 128^3 fit, and how long does a
step take" before a user commits to a schedule. Weights are SAM-format state dicts made on the spot (random
values, official key names and shapes), loaded through the real checkpoint path, so the frozen/trainable
split is the one a user with ``sam_vit_b_01ec64.pth`` gets::

    python -m teacher.step_cost --backbone sam2d --preset vit_b --batch 2 --amp bf16 --checkpointing
    python -m teacher.step_cost --backbone sam_med3d --preset vit_b_ori --batch 2 --amp bf16
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SAM_BUILDERS = {"vit_b": "build_sam_vit_b", "vit_l": "build_sam_vit_l", "vit_h": "build_sam_vit_h"}


def sam_format_checkpoint(preset: str, folder: Path) -> Path:
    """Write a SAM-format state dict (random values, official keys and shapes) for ``preset`` and return its path."""
    import segment_anything

    sam = getattr(segment_anything, SAM_BUILDERS[preset])(checkpoint=None)
    path = folder / f"sam_{preset}_random.pth"
    torch.save(sam.state_dict(), path)
    return path


def sam_med3d_format_checkpoint(preset: str, folder: Path) -> Path:
    """Write a SAM-Med3D-format checkpoint (weights under ``model_state_dict``) made by our own module."""
    from teacher.sam_med3d.model import build_sam_med3d

    path = folder / f"sam_med3d_{preset}_random.pth"
    torch.save({"model_state_dict": build_sam_med3d(None, preset=preset).state_dict()}, path)
    return path


def build_for_cost(backbone: str, preset: str, num_classes: int, roi: int, checkpointing: bool, folder: Path) -> torch.nn.Module:
    """Build a teacher with PEFT freezing applied, as it would be with an official checkpoint."""
    if backbone == "sam2d":
        from teacher.build import build_teacher

        cfg = {"preset": preset, "peft": "adapter", "roi_size": [roi] * 3, "grad_checkpointing": checkpointing}
        return build_teacher(cfg, num_classes, checkpoint=str(sam_format_checkpoint(preset, folder)))
    if backbone == "sam_med3d":
        from teacher.sam_med3d.build import build_sam_med3d_teacher

        cfg = {"backbone": "sam_med3d", "preset": preset, "peft": "lora", "roi_size": [roi] * 3}
        return build_sam_med3d_teacher(cfg, num_classes, checkpoint=str(sam_med3d_format_checkpoint(preset, folder)))
    raise ValueError(f"--backbone must be sam2d or sam_med3d, got {backbone!r}")


def measure_step_cost(
    backbone: str = "sam2d",
    preset: str = "vit_b",
    batch: int = 2,
    roi: int = 128,
    num_classes: int = 14,
    amp: str = "bf16",
    checkpointing: bool = True,
    steps: int = 5,
    warmup: int = 2,
    device: str | None = None,
) -> dict[str, Any]:
    """Time ``steps`` full training steps (forward, DiceCE, backward, clip, AdamW) after ``warmup`` ones.

    Args:
        backbone: ``sam2d`` (3D-adapted SAM) or ``sam_med3d``.
        preset: teacher preset (``vit_b`` … / ``vit_b_ori``).
        batch: crops per step.
        roi: crop edge in voxels.
        num_classes: K, background included.
        amp: ``bf16``, ``fp16`` or ``none`` (autocast on CUDA only).
        checkpointing: gradient checkpointing of the encoder blocks (sam2d).
        steps: timed steps; warmup: untimed steps first.
        device: ``cuda`` when available, else ``cpu``.

    Returns:
        a dict with the median step time, peak memory (GiB, CUDA only) and parameter counts.
    """
    from monai.losses import DiceCELoss

    from teacher.model import count_parameters

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        model = build_for_cost(backbone, preset, num_classes, roi, checkpointing, Path(tmp)).to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    use_amp = dev.type == "cuda" and dtype is not None
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16)
    image = torch.randn(batch, 1, roi, roi, roi, device=dev)
    label = torch.randint(0, num_classes, (batch, 1, roi, roi, roi), device=dev)
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=use_amp):
            loss = loss_fn(model(image).float(), label)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    counts = count_parameters(model)
    return {
        "backbone": backbone,
        "preset": preset,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "batch": batch,
        "roi": roi,
        "amp": amp if use_amp else "none",
        "grad_checkpointing": checkpointing,
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        "trainable_params": counts["trainable"],
        "frozen_params": counts["frozen"],
        "loss": float(loss.detach()),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="sam2d", choices=["sam2d", "sam_med3d"])
    parser.add_argument("--preset", default="vit_b")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--roi", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=14)
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"])
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    result = measure_step_cost(args.backbone, args.preset, args.batch, args.roi, args.num_classes, args.amp,
                               args.checkpointing, args.steps, args.warmup, args.device)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
