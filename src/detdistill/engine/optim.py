"""Optimizers and learning-rate schedules by name: ``train.optimizer`` and ``train.schedule``.

Both are registries (:class:`~detdistill.registry.Registry`), like detectors
and methods, so a user's module (``imports:`` in a config) can add one and the
config accepts its name. An optimizer builder receives the parameter groups
(weight decay already split) and the ``train`` section; a schedule is a decay
of :mod:`detdistill.engine.schedule`, which adds the warmup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from detdistill.engine.config import TrainConfig, registered
from detdistill.engine.schedule import SCHEDULES, lr_factor
from detdistill.registry import Registry

__all__ = [
    "OPTIMIZERS",
    "build_optimizer",
    "build_schedule",
    "register_optimizer",
]

ParamGroups = list[dict[str, Any]]

#: ``train.optimizer`` names: a builder maps (parameter groups, train section) to an optimizer.
OPTIMIZERS: Registry[Callable[[ParamGroups, TrainConfig], torch.optim.Optimizer]] = Registry(
    "optimizer"
)
register_optimizer = OPTIMIZERS.register


@register_optimizer("sgd")
def _sgd(groups: ParamGroups, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


@register_optimizer("adamw")
def _adamw(groups: ParamGroups, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The ``train.optimizer``; no weight decay on norms and biases (1-D tensors), as is usual for detectors."""
    builder = registered(OPTIMIZERS, cfg.optimizer, "train.optimizer")
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return builder(groups, cfg)


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, iters_per_epoch: int
) -> LambdaLR:
    """The ``train.schedule`` over ``cfg.epochs`` epochs of ``iters_per_epoch``, stepped per iteration.

    The warmup is cut to the run's length, so a run shorter than
    ``warmup_iters`` still ends at the schedule's own rate.
    """
    registered(SCHEDULES, cfg.schedule, "train.schedule")  # an unknown name names the key
    total = cfg.epochs * iters_per_epoch
    factor = lr_factor(
        cfg.schedule,
        total,
        iters_per_epoch,
        min(cfg.warmup_iters, total),
        cfg.warmup_factor,
        cfg.milestones,
        cfg.gamma,
    )
    return LambdaLR(optimizer, factor)  # stepped per iteration: one state dict to resume
