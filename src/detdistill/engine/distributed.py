"""Thin helpers over ``torch.distributed`` for runs launched by ``torchrun``.

``torchrun`` starts the processes and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; this module only reads
them. Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) everything is a
single-process no-op, so the same training code runs with and without
torchrun. Every helper also works when no process group exists.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from detdistill.errors import ConfigError

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "barrier",
    "cleanup",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "reduce_dict_mean",
    "resolve_device",
    "unwrap_model",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job and which device it drives."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` → this process's GPU when CUDA is available, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a device: auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: CUDA is not available here (use auto or cpu)")
    return torch.device("cuda", local_rank) if device == "cuda" else resolved


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) and pick the device.

    Single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``): no process group,
    just the resolved device. Calling it again after the group exists only
    reports the existing group.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        extra: dict[str, Any] = {}
        if (
            backend == "nccl"
            and "device_id" in inspect.signature(dist.init_process_group).parameters
        ):
            extra["device_id"] = resolved  # binds the rank to its GPU (torch >= 2.3)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **extra)
        world_size, rank = dist.get_world_size(), dist.get_rank()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that logs, saves and prints."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process.

    Meant for small things such as per-rank detections for evaluation.
    """
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def reduce_dict_mean(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean of scalar tensors over ranks, for logging (the values are detached).

    Every rank must pass the same keys; they are reduced in sorted order in one
    ``all_reduce`` so the order in which ranks built the dict does not matter.
    """
    detached = {k: torch.as_tensor(v).detach() for k, v in values.items()}
    if not is_distributed() or not detached:
        return detached
    for key, value in detached.items():
        if value.numel() != 1:
            raise ValueError(
                f"reduce_dict_mean: '{key}' has {value.numel()} elements, expected a scalar"
            )
    keys = sorted(detached)
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    stacked = torch.stack([detached[k].reshape(()).float().to(device) for k in keys])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    stacked /= dist.get_world_size()
    reduced = dict(zip(keys, stacked.unbind(0), strict=True))
    return {k: reduced[k] for k in values}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (what checkpoints must store), else the model."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
