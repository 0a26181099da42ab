"""Train the 3D SAM teacher on labelled CT: automatic prompts, point prompts, or both.

    python -m teacher.train --config configs/demo.yaml [--run-dir runs/demo] [key=value ...]

Read top to bottom, ``train_teacher`` is the whole recipe: prepared cases → class-balanced random crops
(image and label cropped, flipped and rotated together) → the teacher (official SAM weights frozen under
PEFT, or a random encoder that trains whole) → DiceCE → the shared engine ``training.loop.fit`` (AdamW,
warm-up then constant/poly decay, gradient clipping, AMP and gradient checkpointing on GPU, validation Dice
by sliding window every ``val_every`` steps, best/last checkpoints written atomically, resume after a kill,
progress bar, MLflow) → ``teacher.pt`` holding the best validation weights (docs/interfaces.md).

Prompts (``teacher.prompt_mode``):
- ``auto``: the automatic prompt generator; the target is the full K-class label.
- ``points``: clicks drawn from the label (``teacher.point_sampling``): the clicked class against everything
  else, through the K-class output; validation is the Dice after one simulated click (``teacher.clicks``).
- ``both``: each batch is an automatic-prompt batch or a click batch, by a fair coin from the global RNG
  (so a resumed run draws the same sequence); validation is the automatic-prompt Dice, which is what the
  distillation cache uses.

Backbones (``teacher.backbone``): the adapted 2D SAM (default) or ``sam_med3d`` (teacher/sam_med3d/), whose
crop is fixed by its preset (``teacher.roi_size`` must equal it). With ``sam_med3d`` the click batches train
SAM-Med3D's own interactive path, one binary mask of the clicked organ with the previous logits as mask
prompt (``teacher.sam_med3d.interactive.interactive_training_loss``), and ``points`` validation runs it
through SAM-Med3D's click protocol (``teacher.clicks``).

Under ``torchrun`` the engine wraps the model in DDP (with ``find_unused_parameters``: the prompt branch a
batch does not use gets no gradient), every rank draws its own crops, rank 0 validates and writes.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from configs import resolve_config
from data.prepare import PreparedData
from teacher.model import PROMPT_MODES
from training.batches import crop_batches, preload

# The teacher section's keys that define the network (a resumed run must match them); the rest is schedule.
MODEL_KEYS = ("preset", "arch", "checkpoint", "peft", "lora_rank", "prompt_mode", "roi_size")
SAM_MED3D_MODEL_KEYS = ("backbone", "apg_hidden")


class TeacherTrainError(ValueError):
    """A teacher training setting or artifact that cannot be used; the message names the key or file."""


@dataclass
class TeacherResult:
    """What one teacher run produced.

    Attributes:
        checkpoint: ``teacher.pt`` (best validation weights, docs/interfaces.md format).
        out_dir: the run's folder (``teacher.pt``, ``best.pt``, ``last.pt``).
        best_metric: best validation Dice (mean over foreground classes; after one click in ``points`` mode).
        best_step: step of that validation.
        last_step: steps trained.
        per_class_dice: ``{class name: Dice}`` at the best validation.
        seconds_per_step: mean wall seconds per training step (validation excluded).
        wall_seconds: wall time of the run across resumptions.
        trainable_params: parameters the optimizer updates.
        resumed_from: step the run resumed at, None for a fresh start.
        history: the engine's validation history.
    """

    checkpoint: str
    out_dir: str
    best_metric: float
    best_step: int
    last_step: int
    per_class_dice: dict[str, float]
    seconds_per_step: float
    wall_seconds: float
    trainable_params: int
    resumed_from: int | None = None
    history: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_section(tcfg: Mapping[str, Any]) -> None:
    """Checks of a resolved ``teacher`` section beyond its types."""
    mode = tcfg["prompt_mode"]
    if mode not in PROMPT_MODES:
        raise TeacherTrainError(f"teacher.prompt_mode must be one of {PROMPT_MODES}, got {mode!r}")
    for key in ("batch_size", "crops_per_case"):
        value = tcfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TeacherTrainError(f"teacher.{key} must be a positive integer, got {value!r}")
    for key, minimum in (("max_positive_clicks", 1), ("max_negative_clicks", 0)):
        value = tcfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise TeacherTrainError(f"teacher.{key} must be an integer >= {minimum}, got {value!r}")


def _sam_med3d_crop(tcfg: Mapping[str, Any]) -> tuple[list[int], dict]:
    """The crop ``[S, S, S]`` a SAM-Med3D preset takes, and the preset (checked against ``teacher.roi_size``)."""
    from teacher.sam_med3d.model import SAM_MED3D_PRESETS

    preset = tcfg["preset"]
    if preset not in SAM_MED3D_PRESETS:
        raise TeacherTrainError(f"teacher.preset={preset!r} is not a SAM-Med3D preset; choose from {sorted(SAM_MED3D_PRESETS)}")
    crop = [int(SAM_MED3D_PRESETS[preset]["img_size"])] * 3
    roi = tcfg["roi_size"]
    if roi is not None and [int(r) for r in roi] != crop:
        raise TeacherTrainError(f"teacher.roi_size={list(roi)}: the SAM-Med3D preset {preset!r} takes {crop} crops "
                                f"(set teacher.roi_size={crop})")
    return crop, dict(SAM_MED3D_PRESETS[preset])


def train_teacher(
    cfg: Mapping[str, Any],
    run_dir: str | Path,
    data: PreparedData | None = None,
    tracker: Any = None,
    progress: bool = True,
    *,
    out_dir: str | Path | None = None,
    steps: int | None = None,
    on_validation: Callable[[int, dict], None] | None = None,
) -> TeacherResult:
    """Train the teacher the config describes and write ``teacher.pt``.

    Args:
        cfg: run config (``run``, ``teacher``, ``evaluation`` are read), whole or partial: it is resolved against
            ``configs/schema.py`` first (missing keys take their default) and saved so in ``teacher.pt``.
        run_dir: the pipeline's run folder; ``run_dir/data/data.json`` is read unless ``data`` is given.
        data: prepared data (training and validation cases, labels, preprocessing spec).
        tracker: a ``training.tracking.Tracker`` inside an open run (params, validation metrics and the
            checkpoint go there), or None.
        progress: show the progress bar and a summary line.
        out_dir: where checkpoints go; default ``run_dir/teacher``.
        steps: overrides ``teacher.steps``.
        on_validation: ``(step, metrics)`` callback after each validation (an exception it raises stops
            the run, e.g. a time budget or Optuna pruning).

    Returns:
        A :class:`TeacherResult`; its ``checkpoint`` is ``out_dir/teacher.pt``.
    """
    from monai.data import Dataset
    from monai.losses import DiceCELoss

    from data.checks import DataError
    from data.transforms import AUGMENT_KEYS, check_augmentation, load_transforms, random_crop_transforms
    from evaluation.validation import as_plain_tensor, validation_dice
    from training.distributed import resolve_device
    from teacher.build import build_teacher, teacher_arch
    from teacher.checkpoint import save_teacher
    from teacher.clicks import evaluate_clicks, summarize_clicks
    from teacher.model import count_parameters
    from teacher.point_sampling import sample_clicks
    from teacher.sam_med3d.interactive import interactive_training_loss
    from training.checkpoint import load_checkpoint
    from training.distributed import get_rank, is_distributed, wrap_model
    from training.loop import fit
    from training.settings import TrainSettings

    cfg = resolve_config(cfg)
    run_dir = Path(run_dir)
    tcfg = dict(cfg["teacher"])
    if steps is not None:
        tcfg["steps"] = int(steps)
    _check_section(tcfg)
    data = data or PreparedData.load(run_dir / "data" / "data.json")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "teacher"
    num_classes = data.num_classes
    sam_med3d = tcfg["backbone"] == "sam_med3d"
    if sam_med3d:
        roi_size, arch_params = _sam_med3d_crop(tcfg)
    else:
        arch = teacher_arch(tcfg)
        roi_size, arch_params = list(arch.roi_size), arch.to_dict()
    flip_prob, rotate_prob = tcfg["flip_prob"], tcfg["rotate_prob"]
    augment = {k: tcfg[k] for k in AUGMENT_KEYS}
    try:  # before any data is loaded or the model is built
        check_augmentation(roi_size, flip_prob, rotate_prob, **augment)
    except DataError as exc:
        raise TeacherTrainError(f"teacher: {exc}") from exc
    mode = tcfg["prompt_mode"]
    device = resolve_device(str(cfg["run"]["device"]))
    seed = int(cfg["run"]["seed"])
    overlap = float(cfg["evaluation"]["overlap"])

    torch.manual_seed(seed)  # the same initial weights for the same seed
    model = build_teacher(tcfg, num_classes).to(device)
    # Recomputing activations saves GPU memory; on a CPU it would only cost time.
    model.grad_checkpointing = device.type == "cuda" and bool(tcfg["grad_checkpointing"])
    net = wrap_model(model, find_unused_parameters=True) if is_distributed() else model

    cases = preload(data.train, load_transforms(data.preprocess, keys=("image", "label")))
    val_cases = preload(data.val, load_transforms(data.preprocess, keys=("image", "label")))
    crops = Dataset(cases, transform=random_crop_transforms(
        roi_size, num_classes, num_samples=int(tcfg["crops_per_case"]), class_balanced=bool(tcfg["class_balanced"]),
        flip_prob=flip_prob, rotate_prob=rotate_prob, **augment))
    batches = crop_batches(crops, int(tcfg["batch_size"]), int(tcfg["num_workers"]))

    dice_terms = {"lambda_dice": float(tcfg["lambda_dice"]), "lambda_ce": float(tcfg["lambda_ce"]),
                  "batch": bool(tcfg["dice_batch"])}
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, **dice_terms)
    max_pos, max_neg = int(tcfg["max_positive_clicks"]), int(tcfg["max_negative_clicks"])
    # SAM-Med3D answers clicks with one binary mask (the clicked organ): a sigmoid DiceCE on it.
    binary_dice_ce = DiceCELoss(sigmoid=True, **dice_terms)

    def loss_fn(model: torch.nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        # Plain tensors: a MONAI MetaTensor routes every op of the network through its metadata hooks
        # (measured: 0.80 -> 0.57 s/step for the demo teacher on 2 cores).
        image = as_plain_tensor(batch["image"]).to(device, non_blocking=True)
        label = as_plain_tensor(batch["label"]).to(device, non_blocking=True).long()
        with_points = mode == "points" or (mode == "both" and bool(torch.rand(()) < 0.5))
        if with_points and sam_med3d:
            return interactive_training_loss(model, image, label, binary_dice_ce, max_pos, max_neg), {"point_batches": 1.0}
        if with_points:
            clicks = sample_clicks(label, max_pos, max_neg)
            logits = model(image, points=(clicks.coords, clicks.labels), use_auto_prompt=False)
            return dice_ce(logits.float(), clicks.target), {"point_batches": 1.0}
        return dice_ce(model(image).float(), label), {"point_batches": 0.0}

    spacing = data.preprocess["spacing_mm"]

    def val_fn(model: torch.nn.Module) -> dict[str, float]:
        if mode != "points":
            return validation_dice(model, val_cases, roi_size, num_classes, overlap, device)
        rows = evaluate_clicks(model, val_cases, data.labels, spacing, roi_size, n_clicks=(1,),
                               modes=("points",), device=device, progress=False)
        table = summarize_clicks(rows)
        out = {"dice": table["mean"]["points"]["dice"][1]}
        out.update({f"dice_{c}": v["points"]["dice"][1] for c, v in table["per_class"].items()})
        return out

    settings = TrainSettings.from_config(tcfg, seed=seed, progress=progress)
    meta = {
        "teacher_model": {k: tcfg.get(k) for k in MODEL_KEYS + (SAM_MED3D_MODEL_KEYS if sam_med3d else ())},
        "num_classes": num_classes,
        "labels": data.labels,
        "preprocess": data.preprocess,
        "roi_size": roi_size,
        "config": dict(cfg),
    }
    counts = count_parameters(model)
    resuming = (out_dir / "last.pt").is_file()
    if progress and get_rank() == 0:
        print(f"[teacher] {tcfg['preset']} ({mode} prompts): {len(cases)} training and "
              f"{len(val_cases)} validation cases, {settings.steps} steps, batch {tcfg['batch_size']} of "
              f"{roi_size}, {counts['trainable'] / 1e6:.2f}M trainable / {counts['frozen'] / 1e6:.2f}M frozen params, "
              f"device {device} -> {out_dir}")
    if tracker is not None and not resuming:
        # Params are written once: MLflow refuses to change one, and a resumed run may raise ``steps``.
        tracker.log_params({"teacher": tcfg, "teacher_arch": arch_params, "teacher_params": counts,
                            "num_classes": num_classes, "train_cases": len(cases), "val_cases": len(val_cases)})

    result = fit(net, loss_fn, batches, settings, out_dir, val_fn=val_fn, extra_meta=meta,
                 on_validation=on_validation, tracker=tracker, device=device)
    if result.best_path is None:
        raise TeacherTrainError(f"{out_dir}: training ended without a validated best checkpoint")
    best_entry = next(e for e in result.history if e["step"] == result.best_step)
    per_class = {data.labels[c]: float(best_entry.get(f"dice_{c}", math.nan)) for c in sorted(data.labels) if c}
    teacher_ckpt = out_dir / "teacher.pt"
    if get_rank() == 0:
        best = load_checkpoint(result.best_path)
        model.load_state_dict(best["model"])
        save_teacher(teacher_ckpt, model, {
            "teacher_cfg": tcfg,
            "num_classes": num_classes,
            "labels": data.labels,
            "preprocess": data.preprocess,
            "roi_size": roi_size,
            "step": int(best["step"]),
            "optimizer": best.get("optimizer"),
            "scheduler": best.get("scheduler"),
            "best_dice": float(best["best_dice"]),
            "config": dict(cfg),
        })
        if tracker is not None:
            tracker.log_metrics({f"best/dice_{name}": v for name, v in per_class.items()}, result.best_step)
            tracker.log_artifact(teacher_ckpt, "teacher")
    if progress and get_rank() == 0:
        print(f"[teacher] best validation Dice {result.best_metric:.3f} at step {result.best_step} "
              f"({', '.join(f'{k} {v:.2f}' for k, v in per_class.items())}); "
              f"{result.s_per_step or math.nan:.2f} s/step, {result.wall_s:.0f} s; {teacher_ckpt}")
    return TeacherResult(
        checkpoint=str(teacher_ckpt),
        out_dir=str(out_dir),
        best_metric=float(result.best_metric),
        best_step=int(result.best_step),
        last_step=int(result.last_step),
        per_class_dice=per_class,
        seconds_per_step=float(result.s_per_step or math.nan),
        wall_seconds=float(result.wall_s),
        trainable_params=int(counts["trainable"]),
        resumed_from=result.resumed_from,
        history=list(result.history),
    )


if __name__ == "__main__":  # the command line is commands.teacher_train (the command layer)
    from commands.teacher_train import main

    main(sys.argv[1:])
