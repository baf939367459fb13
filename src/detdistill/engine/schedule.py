"""Learning-rate schedule: linear warmup, then cosine or step decay, per iteration.

A ``LambdaLR`` stepped every iteration keeps the whole schedule in one state
dict, so resuming mid-epoch restores it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(
    schedule: str,
    total_iters: int,
    iters_per_epoch: int,
    warmup_iters: int,
    warmup_factor: float,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> Callable[[int], float]:
    """Multiplier of the base learning rate at iteration ``it``."""
    if schedule not in ("cosine", "step"):
        raise ValueError(f"unknown schedule {schedule!r}; choose 'cosine' or 'step'")

    def factor(it: int) -> float:
        if schedule == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * min(it, total_iters) / max(total_iters, 1)))
        else:
            epoch = it // max(iters_per_epoch, 1)
            decay = gamma ** sum(epoch >= m for m in milestones)
        if it < warmup_iters:
            alpha = it / warmup_iters
            decay *= warmup_factor * (1 - alpha) + alpha
        return decay

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, factor: Callable[[int], float]) -> LambdaLR:
    return LambdaLR(optimizer, factor)
