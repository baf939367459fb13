"""Learning-rate schedule: linear warmup, then a registered decay (cosine, step), per iteration.

:func:`lr_factor` is the multiplier of a ``LambdaLR`` stepped every iteration
(:func:`detdistill.engine.optim.build_schedule`), which keeps the whole schedule
in one state dict, so resuming mid-epoch restores it exactly. The decays are kept in
:data:`SCHEDULES` (``train.schedule`` names one), so a user's module can add
one with ``@register_schedule("name")``; the warmup is shared by all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from detdistill.registry import Registry

__all__ = [
    "SCHEDULES",
    "SchedulePlan",
    "lr_factor",
    "register_schedule",
]


@dataclass(frozen=True)
class SchedulePlan:
    """What a decay may depend on: the run's length and the ``train.*`` decay settings."""

    total_iters: int
    iters_per_epoch: int
    milestones: Sequence[int] = ()
    gamma: float = 0.1


#: ``train.schedule`` names: a decay maps (iteration, plan) to a multiplier of the base rate.
SCHEDULES: Registry[Callable[[int, SchedulePlan], float]] = Registry("schedule")
register_schedule = SCHEDULES.register


@register_schedule("cosine")
def cosine_decay(it: int, plan: SchedulePlan) -> float:
    """Half a cosine from 1 to 0 over the whole run."""
    return 0.5 * (1.0 + math.cos(math.pi * min(it, plan.total_iters) / max(plan.total_iters, 1)))


@register_schedule("step")
def step_decay(it: int, plan: SchedulePlan) -> float:
    """``gamma`` once per milestone epoch passed."""
    epoch = it // max(plan.iters_per_epoch, 1)
    return plan.gamma ** sum(epoch >= m for m in plan.milestones)


def lr_factor(
    schedule: str,
    total_iters: int,
    iters_per_epoch: int,
    warmup_iters: int,
    warmup_factor: float,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> Callable[[int], float]:
    """Multiplier of the base learning rate at iteration ``it``: the decay, ramped up by the warmup.

    An unknown ``schedule`` raises :class:`~detdistill.errors.UnknownNameError`
    listing the registered ones.
    """
    decay = SCHEDULES.get(schedule)
    plan = SchedulePlan(total_iters, iters_per_epoch, tuple(milestones), gamma)

    def factor(it: int) -> float:
        value = decay(it, plan)
        if it < warmup_iters:
            alpha = it / warmup_iters
            value *= warmup_factor * (1 - alpha) + alpha
        return value

    return factor
