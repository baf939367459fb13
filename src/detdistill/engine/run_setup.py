"""Everything a run trains with, built from its config before the first step.

Data, the student (and, for distillation, the teacher in a
:class:`~detdistill.distill.Distiller`), DDP, the optimizer and its schedule,
mixed precision and EMA. Building is separate from the loop
(:mod:`detdistill.engine.trainer`) and from saving and resuming
(:mod:`detdistill.engine.run_state`), so each can be read alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Dataset

from detdistill.data.errors import DataError
from detdistill.distill import Distiller, trainable_parameters
from detdistill.engine.builders import DataSplits, build_datasets, build_model, load_detector
from detdistill.engine.checkpoint import file_sha256
from detdistill.engine.config import Config
from detdistill.engine.distributed import DistInfo, barrier, init_distributed
from detdistill.engine.optim import build_optimizer, build_schedule
from detdistill.engine.sampling import TrainingBatches
from detdistill.engine.validate import validate_config
from detdistill.errors import ConfigError

__all__ = ["RunSetup", "build_run", "check_has_boxes"]


@dataclass(eq=False)
class RunSetup:
    """The parts of one run. ``trainable`` is what the optimizer updates (the student, or
    the Distiller's branch with its adapters); ``runner`` is it, DDP-wrapped when distributed.
    """

    cfg: Config
    dist: DistInfo
    data: DataSplits
    batches: TrainingBatches
    model: nn.Module
    distiller: Distiller | None
    teacher_info: dict[str, str] | None
    trainable: nn.Module
    runner: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    amp: bool
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def eval_model(self) -> nn.Module:
        """What is evaluated and saved: the EMA weights when kept, else the student."""
        return self.ema.module if self.ema is not None else self.model


def check_has_boxes(train: Dataset) -> None:
    """A training split without a single box has nothing to teach: say so before training.

    Images without objects are legitimate negatives next to positives, but a
    split of negatives only would train to the end and report mAP 0.
    """
    base = train
    while hasattr(base, "dataset"):  # tiles and seeded augmentation wrap the data set
        base = base.dataset
    problems = getattr(base, "problems", None)
    if problems is not None and problems.info.get("annotations", 1) == 0:
        raise DataError(
            f"{problems.source}: the training split has {len(base)} images and no boxes at all "
            "(every annotation missing or dropped): there is nothing to learn"
        )


def _build_data(cfg: Config, dist: DistInfo) -> DataSplits:
    """Rank 0 first: embedded data is generated once, then every rank reads it."""
    if not dist.is_main:
        barrier()
    data = build_datasets(cfg.data)
    if dist.is_main:
        barrier()
    return data


def load_teacher(cfg: Config, device: torch.device) -> tuple[nn.Module, dict[str, str]]:
    """The teacher, loaded strictly from its checkpoint; returns it with its path and hash."""
    assert cfg.distill is not None
    path = Path(cfg.distill.teacher_checkpoint)
    loaded = load_detector(path, cfg.distill.teacher_model)
    return loaded.model.to(device), {"path": str(path.resolve()), "sha256": file_sha256(path)}


#: Updates over which the EMA's decay ramps up to ``train.ema_decay``.
EMA_RAMP = 2000.0


def ramped_ema(
    decay: float, ramp: float = EMA_RAMP
) -> Callable[[Sequence[Tensor], Sequence[Tensor], Tensor], None]:
    """``AveragedModel``'s update with decay ``decay * (1 - exp(-n / ramp))`` at update ``n``.

    A fixed decay of 0.9998 leaves the average at 0.9998^640 = 88% of the
    weights it started from after 640 steps: a short run saved a model close
    to untrained. Ramping the decay (Ultralytics' ``ModelEMA``, 2000 updates)
    lets the average follow training early and smooth it later. Integer
    buffers (BatchNorm's step counter) are copied.
    """

    @torch.no_grad()
    def update(averaged: Sequence[Tensor], current: Sequence[Tensor], updates: Tensor) -> None:
        pairs = list(zip(averaged, current, strict=True))
        floats = [(mean, value) for mean, value in pairs if mean.is_floating_point()]
        for mean, value in pairs:
            if not mean.is_floating_point():
                mean.copy_(value)
        if floats:  # torch's EMA step (one foreach lerp), at this update's decay
            ramped = decay * (1.0 - math.exp(-float(updates) / ramp))
            means, values = (list(group) for group in zip(*floats, strict=True))
            get_ema_multi_avg_fn(ramped)(means, values, updates)

    return update


def build_run(cfg: Config, data: DataSplits | None = None) -> RunSetup:
    """Validate ``cfg`` (names and options, before any data or model work) and build the run."""
    validate_config(cfg)
    dist = init_distributed(cfg.device)
    device = dist.device
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts)
    data = data or _build_data(cfg, dist)
    if cfg.model.num_classes != len(data.class_names):
        raise ConfigError(
            f"model.num_classes is {cfg.model.num_classes} but the data has "
            f"{len(data.class_names)} classes: {', '.join(data.class_names)}",
            "model.num_classes",
        )
    check_has_boxes(data.train)
    model = build_model(cfg.model, cfg.data.model_input_size).to(device)
    distiller, teacher_info = None, None
    trainable: nn.Module = model
    if cfg.distill is not None:
        teacher, teacher_info = load_teacher(cfg, device)
        distiller = Distiller(
            model,
            teacher,
            cfg.distill.methods,
            cfg.distill.method_options,
            teacher_half=cfg.distill.teacher_half,
            teacher_channels_last=cfg.distill.teacher_channels_last,
            teacher_compile=cfg.distill.teacher_compile,
            auto_ratio=cfg.distill.auto_ratio,
        ).to(device)
        trainable = distiller.branch
    runner = trainable
    if dist.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        runner = DistributedDataParallel(trainable, device_ids=device_ids)
        if distiller is not None:
            distiller.wrap_student(runner)
    optimizer = build_optimizer(trainable_parameters(trainable), cfg.train)
    batches = TrainingBatches(
        data.train,
        cfg.data.batch_size,
        cfg.seed,
        device=device,
        num_workers=cfg.data.num_workers,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    amp = cfg.train.amp and device.type == "cuda"
    ema = None
    if cfg.train.ema:
        average = ramped_ema(cfg.train.ema_decay)
        ema = AveragedModel(model, multi_avg_fn=average, use_buffers=True)
    return RunSetup(
        cfg=cfg,
        dist=dist,
        data=data,
        batches=batches,
        model=model,
        distiller=distiller,
        teacher_info=teacher_info,
        trainable=trainable,
        runner=runner,
        optimizer=optimizer,
        scheduler=build_schedule(optimizer, cfg.train, len(batches)),
        amp=amp,
        scaler=torch.amp.GradScaler("cuda", enabled=amp),
        ema=ema,
    )
