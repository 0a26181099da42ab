"""A tiny learnable segmentation task for the training-engine tests (imported by tests/test_training_*).

Run under torchrun it is also the DDP worker of tests/test_training_ddp.py::

    python -m torch.distributed.run --nproc_per_node 2 tests/training_toy.py OUT_DIR RUN_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

SIZE = 16  # voxels per side of a crop


class TinySegNet(nn.Module):
    """Two Conv3d layers: ``B x 1 x X x Y x Z`` → ``B x 2 x X x Y x Z`` logits."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, width, 3, padding=1)
        self.norm = nn.GroupNorm(2, width)
        self.head = nn.Conv3d(width, 2, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv1(image))))


def make_case(batch: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Noise whose bright voxels (> 0.5) are the foreground class: ``image`` B x 1 x 16³, ``label`` same."""
    image = torch.randn(batch, 1, SIZE, SIZE, SIZE, generator=generator)
    return {"image": image, "label": (image > 0.5).long()}


def random_batches(batch: int = 2) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches drawn from torch's global generator, so a restored RNG replays them exactly."""
    while True:
        yield make_case(batch)


_DICE_CE: list[nn.Module] = []


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """MONAI DiceCE, the segmentation loss the stages use."""
    if not _DICE_CE:  # imported on first use: MONAI's import costs the DDP worker processes seconds
        from monai.losses import DiceCELoss

        _DICE_CE.append(DiceCELoss(to_onehot_y=True, softmax=True))
    logits = model(batch["image"])
    loss = _DICE_CE[0](logits.float(), batch["label"])
    return loss, {"foreground_fraction": float(batch["label"].float().mean())}


def ce_loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain cross-entropy (torch only), for the DDP worker processes."""
    logits = model(batch["image"])
    return nn.functional.cross_entropy(logits, batch["label"][:, 0]), {}


def foreground_dice(model: nn.Module, case: dict[str, torch.Tensor]) -> float:
    device = next(model.parameters()).device
    pred = model(case["image"].to(device)).argmax(1, keepdim=True).cpu()
    truth = case["label"]
    inter = (pred.bool() & truth.bool()).sum().item()
    return 2.0 * inter / max(1, pred.sum().item() + truth.sum().item())


def make_val_fn(seed: int = 123):
    """Validation on two fixed cases (own generator: validation must not consume training randomness)."""
    case = make_case(2, torch.Generator().manual_seed(seed))
    return lambda model: {"dice": foreground_dice(model, case)}


_MLFLOW_TEMPLATE: list[Path] = []


def fresh_mlflow_store(run_dir: Path) -> Path:
    """Put an empty, already migrated ``mlflow.db`` in ``run_dir`` (what ``Tracker(run_dir)`` opens).

    Creating the sqlite schema runs MLflow's migrations (5-15 s on a busy 2-core machine); the tests
    pay it once per session and copy the result.
    """
    import shutil
    import tempfile

    from mlflow import MlflowClient

    if not _MLFLOW_TEMPLATE:
        template = Path(tempfile.mkdtemp(prefix="mlflow-template-")) / "mlflow.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()
        _MLFLOW_TEMPLATE.append(template)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(_MLFLOW_TEMPLATE[0], run_dir / "mlflow.db"))


def _ddp_worker(out_dir: Path, run_dir: Path) -> None:
    """Two fits under torchrun: 4 steps, then resumed to 6; records what each rank saw and wrote."""
    import training.checkpoint as checkpoint
    from training import Tracker, TrainSettings, cleanup, fit, setup_distributed

    info = setup_distributed(device="cpu")
    torch.set_num_threads(1)
    saves: list[str] = []
    real_save = checkpoint.save_torch_atomic

    def counting_save(obj, path):  # the real writer, counted per rank
        saves.append(Path(path).name)
        return real_save(obj, path)

    checkpoint.save_torch_atomic = counting_save
    first_batch_sums: list[float] = []

    def batches():
        for i, b in enumerate(random_batches()):
            if i == 0:
                first_batch_sums.append(float(b["image"].sum()))
            yield b

    torch.manual_seed(info.rank)  # ranks build different initial weights; DDP must broadcast rank 0's
    model = TinySegNet()
    tracker = Tracker(run_dir)
    settings = dict(lr=1e-2, val_every=2, log_every=1, seed=7, progress=False)
    with tracker.start_run("ddp-toy"):
        first = fit(model, ce_loss_fn, batches(), TrainSettings(steps=4, **settings), out_dir,
                    val_fn=make_val_fn(), tracker=tracker, extra_meta={"arch": "tiny"})
        second = fit(model, ce_loss_fn, batches(), TrainSettings(steps=6, **settings), out_dir,
                     val_fn=make_val_fn(), tracker=tracker, extra_meta={"arch": "tiny"})
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out_dir / f"weights_rank{info.rank}.pt")
    report = {
        "rank": info.rank,
        "world_size": info.world_size,
        "tracker_enabled": tracker.enabled,
        "saves": saves,
        "first_batch_sums": first_batch_sums,
        "first_last_step": first.last_step,
        "second_resumed_from": second.resumed_from,
        "second_last_step": second.last_step,
        "best_metric": second.best_metric,
        "history_steps": [h["step"] for h in second.history],
    }
    (out_dir / f"report_rank{info.rank}.json").write_text(json.dumps(report))
    cleanup()


if __name__ == "__main__":
    _ddp_worker(Path(sys.argv[1]), Path(sys.argv[2]))
