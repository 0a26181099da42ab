"""The training engine shared by teacher training (``teacher/train.py``) and distillation (``distill/train.py``).

A stage script stays a page long: it builds a model, an endless stream of batches, a loss and a
validation function, and hands them to :func:`fit`::

    from training import TrainSettings, Tracker, fit, setup_distributed

    info = setup_distributed()                       # torchrun or a single process
    settings = TrainSettings.from_config(cfg["teacher"], seed=cfg["run"]["seed"])
    model = build_teacher(cfg)                       # plain nn.Module; fit moves it and wraps DDP
    loss = monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)

    def loss_fn(model, batch):                       # -> (scalar loss, {name: float} for the logs)
        logits = model(batch["image"])               # B x K x X x Y x Z
        value = loss(logits, batch["label"])
        return value, {}

    def val_fn(model):                               # rank 0, eval mode, no_grad; higher dice is better
        return {"dice": mean_dice(model, val_cases)}

    tracker = Tracker(run_dir)                       # MLflow on sqlite:///<run_dir>/mlflow.db, rank 0 only
    with tracker.start_run("teacher", resume_key="teacher"):
        tracker.log_config(cfg)
        result = fit(model, loss_fn, batches, settings, run_dir / "teacher", val_fn=val_fn,
                     extra_meta={"labels": labels, "preprocess": spec, "config": cfg},
                     tracker=tracker, device=info.device)
    # result.best_path is the stage artifact (teacher.pt); result.history holds every validation.

Modules: ``schedule`` (AdamW groups, warm-up + constant/poly/cosine), ``checkpoint`` (atomic save, load,
restore, compatibility check), ``rng`` (seeding, RNG capture for exact resume), ``settings``
(``TrainSettings``), ``precision`` (the autocast dtype, native bf16), ``loop`` (``fit``), ``tracking``
(MLflow), ``distributed`` (torchrun/DDP).

Resume: a second ``fit`` call with the same ``out_dir`` continues from ``last.pt`` (model, optimizer,
scheduler, GradScaler, per-rank RNG, history); it is bit-identical to an uninterrupted run when the batch
stream draws only from the global RNGs (torch/NumPy/random). A finished run returns its result at once.
"""
from training.checkpoint import (
    CheckpointError,
    IncompatibleCheckpointError,
    check_compatible,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
)
from training.distributed import (
    DistInfo,
    barrier,
    cleanup,
    get_rank,
    get_world_size,
    is_main_process,
    rank_seed,
    setup_distributed,
    unwrap_model,
    wrap_model,
)
from training.loop import FitResult, fit
from training.rng import capture_rng_state, restore_rng_state, seed_everything
from training.schedule import build_optimizer, build_scheduler, lr_lambda
from training.settings import TrainSettings, TrainSettingsError
from training.tracking import Tracker, default_tracking_uri

__all__ = [
    "CheckpointError",
    "DistInfo",
    "FitResult",
    "IncompatibleCheckpointError",
    "Tracker",
    "TrainSettings",
    "TrainSettingsError",
    "barrier",
    "build_optimizer",
    "build_scheduler",
    "capture_rng_state",
    "check_compatible",
    "cleanup",
    "default_tracking_uri",
    "fit",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "load_checkpoint",
    "lr_lambda",
    "rank_seed",
    "restore_rng_state",
    "restore_training_state",
    "save_checkpoint",
    "seed_everything",
    "setup_distributed",
    "unwrap_model",
    "wrap_model",
]
