"""Train one student by knowledge distillation (or, with λ = 0, by plain supervision).

    python -m distill.train --config configs/demo.yaml --student swinunetr_tiny --lambda 0.5 [key=value ...]

Read top to bottom, ``train_student`` is the whole recipe: cases → teacher targets (cache or online
teacher) → random crops that carry image, label and teacher together → student → KD loss → the shared
engine ``training.loop.fit`` (AdamW, warm-up then decay, AMP on GPU, validation Dice by sliding window,
best/last checkpoints, resume after a kill, progress bar, MLflow) → ``student.pt``.

Under ``torchrun`` the engine wraps the model in DDP; every rank draws its own crops (seed + rank) and
only rank 0 writes checkpoints and MLflow records.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from distill.cache import AttachTeacherd, TeacherCache
from data.prepare import PreparedData
from distill.loss import KDLoss, lambda_at
from distill.sampling import LabelledShareSampler, check_share
from evaluation.validation import as_plain_tensor, validation_dice
from training.distributed import resolve_device
from training.batches import crop_batches, preload

MODES = ("cached", "online")
POSTPROCESS_KINDS = ("largest_component", "none")


class DistillConfigError(ValueError):
    """A distillation setting that cannot be used; the message names the key and value."""


@dataclass
class StudentResult:
    """What one student run produced.

    Attributes:
        name: student architecture name.
        lambda_kd: λ it was trained with.
        out_dir: its folder (``best.pt``, ``last.pt``, ``student.pt``).
        checkpoint: ``student.pt`` (best validation Dice weights, docs/interfaces.md format).
        best_dice: best validation mean foreground Dice.
        best_step: step of that validation.
        last_step: steps trained.
        seconds_per_step: mean wall seconds per training step.
        wall_seconds: wall time of the run (0 when it was already finished).
        params: parameter count.
        history: the engine's validation history.
        labelled: cases it learnt from with their label.
        unlabelled: cases it learnt from through the teacher only (0 for λ = 0).
    """

    name: str
    lambda_kd: float
    out_dir: str
    checkpoint: str
    best_dice: float
    best_step: int
    last_step: int
    seconds_per_step: float
    wall_seconds: float
    params: int
    history: list = field(default_factory=list)
    labelled: int = 0
    unlabelled: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def case_weights(labelled: int, unlabelled: int, labelled_fraction: float | None) -> list[float] | None:
    """Sampling weights that put ``labelled_fraction`` of the crops on the labelled cases (None: every case
    alike, so 8 labelled among 40 cases get 20 % of the crops)."""
    if labelled_fraction is None or not labelled or not unlabelled:
        return None
    f = float(labelled_fraction)
    if not 0.0 < f < 1.0:
        raise DistillConfigError(f"distill.labelled_fraction must lie in (0, 1) or be null, got {labelled_fraction!r}")
    return [f / labelled] * labelled + [(1.0 - f) / unlabelled] * unlabelled


def train_student(
    cfg: Mapping[str, Any],
    run_dir: str | Path,
    student_name: str,
    lambda_kd: float,
    teacher_ckpt: str | Path | None = None,
    cache_dir: str | Path | None = None,
    tracker: Any = None,
    on_validation: Callable[[int, dict], None] | None = None,
    *,
    out_dir: str | Path | None = None,
    steps: int | None = None,
    data: PreparedData | None = None,
    progress: bool = True,
) -> StudentResult:
    """Train one student with ``L = λ·MSE(student, teacher) + (1−λ)·DiceCE(student, label)``.

    Args:
        cfg: run config (``run``, ``student``, ``distill``, ``evaluation``, ``data`` are read).
        run_dir: the pipeline's run folder; ``run_dir/data/data.json`` is read unless ``data`` is given.
        student_name: a name of ``student.STUDENTS`` (e.g. ``swinunetr_tiny``).
        lambda_kd: λ in [0, 1]; 0 trains without any teacher.
        teacher_ckpt: teacher checkpoint; needed when λ > 0 in online mode.
        cache_dir: a teacher cache folder (``distill.cache``); needed when λ > 0 in cached mode.
        tracker: a ``training.tracking.Tracker`` (MLflow) or None.
        on_validation: ``(step, metrics)`` callback after each validation (Optuna pruning raises from it).
        out_dir: where checkpoints go; default ``run_dir/students/<name>`` (``<name>_lambda0`` for λ = 0).
        steps: overrides ``distill.steps`` (the step budget of a tuning trial).
        data: prepared data, instead of reading it from ``run_dir``.
        progress: show the progress bar.

    Returns:
        A ``StudentResult``; its ``checkpoint`` is ``student.pt`` holding the best validation weights.
    """
    from data.transforms import load_transforms, random_crop_transforms
    from monai.transforms import Compose
    from student import arch_options, build_student, check_roi, count_params, save_student
    from training.checkpoint import load_checkpoint
    from training.loop import fit

    from configs import resolve_config

    run_dir = Path(run_dir)
    cfg = resolve_config(cfg)  # every key present, its default from configs/schema.py (partial dicts are filled)
    dcfg, scfg = cfg["distill"], cfg["student"]
    lambda_kd = float(lambda_kd)
    mode = str(dcfg["mode"])
    if mode not in MODES:
        raise DistillConfigError(f"distill.mode must be one of {MODES}, got {mode!r}")
    data = data or PreparedData.load(run_dir / "data" / "data.json")
    num_classes = data.num_classes
    roi_size = [int(s) for s in scfg["roi_size"]]
    check_roi(student_name, roi_size)
    device = resolve_device(str(cfg["run"]["device"]))
    # distill.seed: the student's own seed (initialisation, crops), to measure the seed-to-seed spread on the same
    # data and teacher; null = run.seed (which also seeds the phantoms and the splits).
    seed = int(cfg["run"]["seed"] if dcfg["seed"] is None else dcfg["seed"])
    torch.manual_seed(seed)
    if out_dir is None:
        out_dir = run_dir / "students" / (student_name if lambda_kd > 0 else f"{student_name}_lambda0")
    out_dir = Path(out_dir)

    uses_teacher = lambda_kd > 0
    cache = teacher = None
    if uses_teacher and mode == "cached":
        if cache_dir is None:
            raise DistillConfigError(f"lambda_kd={lambda_kd} in cached mode needs cache_dir (build it with distill.cache)")
        cache = TeacherCache(cache_dir)
        if cache.num_classes != num_classes:
            raise DistillConfigError(f"{cache_dir}: cache has {cache.num_classes} classes, data has {num_classes}")
    elif uses_teacher:
        if teacher_ckpt is None:
            raise DistillConfigError(f"lambda_kd={lambda_kd} in online mode needs teacher_ckpt")
        from teacher.checkpoint import load_teacher
        from teacher.compat import check_teacher_fits

        teacher, teacher_meta = load_teacher(teacher_ckpt, device=device)
        # teacher_ckpt may come from anywhere (a tuning study, mode_cost): it must fit this data (labels, ROI, spec).
        tcfg = cfg["teacher"]
        check_teacher_fits(teacher_meta, data.labels, data.preprocess, tcfg["roi_size"],
                           allow_preprocess_mismatch=tcfg["allow_preprocess_mismatch"], source=teacher_ckpt)
        teacher.eval().requires_grad_(False)

    # Unlabelled cases can only be learnt from the teacher's cached targets: the KD term alone.
    # The site's cases when data.site is set (the scenario KD is for), else the training split (data.prepare).
    site_labelled, site_unlabelled = data.student_cases()
    labelled = [{**c, "has_label": True} for c in site_labelled]
    unlabelled = [{**c, "has_label": False} for c in site_unlabelled] if (cache is not None and cfg["data"]["use_unlabeled"]) else []
    if not labelled and not unlabelled:
        raise DistillConfigError(f"{student_name} λ={lambda_kd}: no case to learn from (no labelled case"
                                 f"{'' if uses_teacher else ', and λ = 0 uses no unlabelled one'}; see data.site.labelled)")
    cases = preload(labelled, load_transforms(data.preprocess, keys=("image", "label")))
    if unlabelled:
        cases += preload(unlabelled, load_transforms(data.preprocess, keys=("image",)))
    val_cases = preload(data.val, load_transforms(data.preprocess, keys=("image", "label")))

    extra_keys = ("teacher",) if cache is not None else ()
    # With a teacher, crops carry the inside-the-volume mask: padding is left out of the KD term (data.transforms).
    inside_key = "inside" if uses_teacher else None
    random_part = random_crop_transforms(
        roi_size, num_classes, keys=("image", "label"), extra_keys=extra_keys, num_samples=int(dcfg["crops_per_case"]),
        inside_key=inside_key,
        flip_prob=dcfg["flip_prob"],
        # A rotated crop with X != Y would change shape; such crops are flipped but not rotated.
        rotate_prob=dcfg["rotate_prob"] if roi_size[0] == roi_size[1] else 0.0,
    )
    chain = ([AttachTeacherd(cache)] if cache is not None else []) + [random_part]
    from monai.data import Dataset

    crops = Dataset(cases, transform=Compose(chain))
    # Labelled cases come first in ``cases``; distill.labelled_fraction sets their share of the crops.
    # distill.labelled_fraction_end moves that share linearly over the run (distill/sampling.py).
    if dcfg["labelled_fraction_end"] is not None:  # before any step, even where no unlabelled case draws it
        if dcfg["labelled_fraction"] is None:
            raise DistillConfigError(f"distill.labelled_fraction_end={dcfg['labelled_fraction_end']!r} needs "
                                     f"distill.labelled_fraction (the share at step 0), which is null")
        check_share("labelled_fraction_end", dcfg["labelled_fraction_end"], allow_one=True)
    weights = case_weights(len(labelled), len(unlabelled), dcfg["labelled_fraction"])
    settings = _train_settings(dcfg, steps, seed, progress)  # the run's step budget, which the share moves over
    share_sampler = None
    if dcfg["labelled_fraction_end"] is not None and weights is not None:
        share_sampler = LabelledShareSampler(len(labelled), len(unlabelled), float(dcfg["labelled_fraction"]),
                                             float(dcfg["labelled_fraction_end"]), settings.steps)
        weights = None
    batches = crop_batches(crops, int(dcfg["batch_size"]), int(dcfg["num_workers"]), weights, sampler=share_sampler)

    # Pseudo-labels come from the teacher, so a λ = 0 student (no teacher) never has them.
    kd_loss = KDLoss(lambda_kd, kd_target=str(dcfg["kd_target"]),
                     temperature=float(dcfg["temperature"]), num_classes=num_classes,
                     pseudo_labels=bool(dcfg["pseudo_labels"]) and cache is not None,
                     kd_weighting=str(dcfg["kd_weighting"]))
    lambda_schedule = str(dcfg["lambda_schedule"])
    end_ratio = float(dcfg["lambda_end_ratio"])
    lambda_at(lambda_kd, 0, 1, lambda_schedule, end_ratio)  # a bad schedule name or ratio fails here, before any step
    check_postprocess_kind(str(dcfg["postprocess"]))  # before any step, not after training

    def on_step(step: int) -> None:
        kd_loss.lambda_kd = lambda_at(lambda_kd, step, settings.steps, lambda_schedule, end_ratio)

    def loss_fn(model: torch.nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        image = as_plain_tensor(batch["image"]).to(device, non_blocking=True)
        label = as_plain_tensor(batch["label"]).to(device, non_blocking=True).long()
        has_label = torch.as_tensor(batch.get("has_label", torch.ones(image.shape[0]))).to(device).bool()
        student_logits = model(image)
        teacher_logits = None
        if cache is not None:
            teacher_logits = as_plain_tensor(batch["teacher"]).to(device, non_blocking=True)
        elif teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(image).float()
        kd_mask = as_plain_tensor(batch["inside"]).to(device, non_blocking=True) if inside_key else None
        loss, logs = kd_loss(student_logits.float(), teacher_logits, label, has_label, kd_mask)
        # The share of labelled crops (train/labelled in MLflow): constant, or following distill.labelled_fraction_end.
        return loss, {**logs, "labelled": has_label.float().mean()}

    overlap = float(cfg["evaluation"]["overlap"])

    def val_fn(model: torch.nn.Module) -> dict[str, float]:
        return validation_dice(model, val_cases, roi_size, num_classes, overlap, device)

    options = arch_options(student_name, scfg.get("arch"))  # student.arch over the registry's defaults
    model = build_student(student_name, num_classes, options=options).to(device)
    meta = {
        "arch": {"name": student_name, "num_classes": num_classes, "in_channels": 1, "options": options},
        "roi_size": roi_size,
        "preprocess": data.preprocess,
        "labels": data.labels,
        "lambda_kd": lambda_kd,
        "distill_mode": mode if uses_teacher else "supervised",
        "config": dict(cfg),
    }
    if progress:
        print(f"[student] {student_name} λ={lambda_kd} ({meta['distill_mode']}): {len(labelled)} labelled + "
              f"{len(unlabelled)} unlabelled cases, {settings.steps} steps, batch {dcfg['batch_size']} of {roi_size}, "
              f"{count_params(model) / 1e6:.2f}M params{f' {options}' if options else ''}, device {device} -> {out_dir}")
    result = fit(model, loss_fn, batches, settings, out_dir, val_fn=val_fn, extra_meta=meta,
                 on_validation=on_validation, tracker=tracker, device=device, on_step=on_step)
    student_ckpt = out_dir / "student.pt"
    if result.best_path is None:
        raise DistillConfigError(f"{out_dir}: training ended without a validated best checkpoint")
    if _rank() == 0:
        best = load_checkpoint(result.best_path)
        model_cpu = build_student(student_name, num_classes, options=options)
        model_cpu.load_state_dict(best["model"])
        postprocess = choose_postprocess(model_cpu.to(device), val_cases, roi_size, num_classes, overlap,
                                         str(dcfg["postprocess"]), device)
        model_cpu.cpu()
        if progress and postprocess:
            print(f"[student] {student_name} λ={lambda_kd}: {_postprocess_line(postprocess, data.labels)}")
        save_student(student_ckpt, model_cpu, {**meta, "step": int(result.best_step), "best_dice": float(result.best_metric),
                                               "postprocess": postprocess})
    return StudentResult(
        name=student_name,
        lambda_kd=lambda_kd,
        out_dir=str(out_dir),
        checkpoint=str(student_ckpt),
        best_dice=float(result.best_metric),
        best_step=int(result.best_step),
        last_step=int(result.last_step),
        seconds_per_step=float(result.s_per_step or math.nan),
        wall_seconds=float(result.wall_s),
        params=count_params(model),
        history=list(result.history),
        labelled=len(labelled),
        unlabelled=len(unlabelled),
    )


def check_postprocess_kind(kind: str) -> None:
    """Refuse a ``distill.postprocess`` value that is not one of ``POSTPROCESS_KINDS``."""
    if kind not in POSTPROCESS_KINDS:
        raise DistillConfigError(f"distill.postprocess must be one of {POSTPROCESS_KINDS}, got {kind!r}")


def choose_postprocess(model: torch.nn.Module, val_cases: Sequence[Mapping[str, Any]], roi_size: Sequence[int],
                       num_classes: int, overlap: float, kind: str, device: torch.device | str = "cpu") -> dict | None:
    """The student's postprocessing, chosen on the validation cases (``deploy.postprocess``): the classes whose
    mean validation Dice rises when only their largest connected piece is kept. None for ``distill.postprocess:
    none`` or without validation cases."""
    check_postprocess_kind(kind)
    if kind == "none" or not val_cases:
        return None
    from deploy.postprocess import choose_largest_component
    from evaluation.sliding_window import predict_logits
    from evaluation.validation import as_plain_tensor

    logits, refs = [], []
    for case in val_cases:
        logits.append(np.asarray(predict_logits(model, as_plain_tensor(case["image"]), roi_size, num_classes,
                                                overlap=overlap, device=device)))
        refs.append(as_plain_tensor(case["label"])[0].numpy())
    return choose_largest_component(logits, refs, num_classes)


def _postprocess_line(postprocess: Mapping[str, Any], labels: Mapping[Any, str]) -> str:
    names = {int(k): str(v) for k, v in labels.items()}
    val = postprocess["validation"]
    chosen = [f"{names.get(k, k)} {val[str(k)]['raw']:.3f} -> {val[str(k)]['cleaned']:.3f}"
              for k in postprocess["largest_component"]]
    return (f"largest connected piece kept for {', '.join(chosen)} (validation Dice, {postprocess['cases']} cases)"
            if chosen else f"no class gains from keeping its largest piece (validation, {postprocess['cases']} cases)")


def budget_free(dcfg: Mapping[str, Any]) -> bool:
    """Whether a student's learning rate, λ and labelled share of crops at a step do not depend on its step budget
    (constant lr, constant λ, no ``labelled_fraction_end``), so that a shorter run of the same settings is a prefix
    of a longer one and can be continued."""
    moving_share = dcfg.get("labelled_fraction_end") is not None and dcfg.get("labelled_fraction") is not None
    return dcfg["schedule"] == "constant" and dcfg["lambda_schedule"] == "constant" and not moving_share


def _train_settings(dcfg: Mapping[str, Any], steps: int | None, seed: int, progress: bool = True) -> Any:
    """The engine's settings from the ``distill`` section, with an optional step budget override."""
    from training.loop import TrainSettings

    section = dict(dcfg)
    if steps is not None:
        section["steps"] = int(steps)
        section["val_every"] = min(int(section.get("val_every", steps)), int(steps))
    return TrainSettings.from_config(section, seed=seed, progress=progress)


if __name__ == "__main__":  # the command line is commands.student_train (the command layer)
    from commands.student_train import main

    main(sys.argv[1:])
