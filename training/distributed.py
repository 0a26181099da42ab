"""Data-parallel training under ``torchrun``: process group setup, rank queries, DDP wrapping.

Every function also works in a plain single process (no ``torchrun``), where it is a no-op or returns
the obvious answer (rank 0 of 1), so the same script runs either way::

    info = setup_distributed()            # reads RANK, WORLD_SIZE, LOCAL_RANK if torchrun set them
    model = wrap_model(build_model().to(info.device))
    ...
    cleanup()
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class DistributedSetupError(ValueError):
    """The torchrun environment is inconsistent (e.g. RANK without WORLD_SIZE)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its global rank, the number of processes, its local rank and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError as exc:
        raise DistributedSetupError(f"environment variable {name}={raw!r} is not an integer") from exc


def setup_distributed(backend: str | None = None, timeout_minutes: float = 60.0, device: str | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    NCCL is used when CUDA is available, gloo otherwise. On CUDA each process binds to ``cuda:LOCAL_RANK``.
    Calling it twice is harmless. Without ``WORLD_SIZE`` > 1 it only reports a single process.

    Args:
        backend: force a backend (``"gloo"``, ``"nccl"``); default picks by device.
        timeout_minutes: collective timeout; generous because rank 0 validates while the others wait.
        device: ``"cpu"`` to stay on CPU even where CUDA exists; default picks CUDA when available.
    """
    world_size = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0
    local_rank = _env_int("LOCAL_RANK") or 0
    if not 0 <= rank < world_size:
        raise DistributedSetupError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=backend or ("nccl" if use_cuda else "gloo"),
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **({"device_id": dev} if use_cuda else {}),
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_distributed() -> bool:
    """Whether a process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0, the one process that writes checkpoints, logs and MLflow records."""
    return get_rank() == 0


def rank_seed(seed: int) -> int:
    """The seed this rank should use for its data, so ranks draw different crops: ``seed + rank``."""
    return seed + get_rank()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects; no-op in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap ``model`` (already on its device) in DDP when distributed; return it unchanged otherwise.

    DDP broadcasts rank 0's weights at construction, so ranks may build the model with different seeds.

    Args:
        model: the model, on ``cuda:LOCAL_RANK`` or CPU.
        find_unused_parameters: set when some trainable parameters get no gradient in a step
            (e.g. a prompt branch that is only used in some modes).
    """
    if not is_distributed() or isinstance(model, DistributedDataParallel):
        return model
    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and/or ``torch.compile`` wrappers (the one whose state dict is saved)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def cleanup() -> None:
    """Leave the process group (no-op when none is active)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; a bare ``"cuda"`` is this rank's GPU under torchrun.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``.
    """
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # Under torchrun each rank owns cuda:LOCAL_RANK (setup_distributed made it current), not cuda:0.
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_initialized()
                              else int(os.environ.get("LOCAL_RANK", 0)))
    return device
