"""The distillation method's base class and the registry of methods by name.

A method maps a teacher/student batch (:class:`DistillBatch`) to one loss, so
that a config can say ``methods: {rm: 4.0, pfi: 1.5}`` and get
``L = L_det + 4 L_RM + 1.5 L_PFI``. Each registered method lives in the module
of its loss, next to the pure tensor function it calls: ``rm`` in
:mod:`~detdistill.losses.rank_mimicking`, ``pfi`` in :mod:`~detdistill.losses.pfi`,
the feature-imitation baselines in :mod:`~detdistill.losses.feature_imitation`,
``ld`` in :mod:`~detdistill.losses.localization`, ``kd`` in
:mod:`~detdistill.losses.soft_label`, ``crosskd`` in :mod:`~detdistill.losses.crosskd`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import ClassVar, Literal

from torch import Tensor, nn

from detdistill.losses.batch import DistillBatch
from detdistill.losses.taps import Tap
from detdistill.registry import Registry

__all__ = [
    "METHODS",
    "DistillMethod",
    "build_method",
    "check_choice",
    "list_methods",
    "register_method",
]


class DistillMethod(nn.Module):
    """A distillation term; subclasses implement ``forward(batch) -> scalar``.

    ``imitates`` says what the term compares: ``"features"`` (neck features;
    the head is never reached) or ``"outputs"`` (the head's predictions). An
    ``auto`` weight uses the target ratio of that kind
    (:data:`detdistill.distill.auto_weights.DEFAULT_RATIOS`).

    ``taps`` declares the student tensors the term reads beyond the two
    detectors' outputs (:mod:`detdistill.losses.taps`): ``(NECK,)`` for neck
    features adapted to the teacher's widths, read with
    ``batch.tapped(NECK)``. The Distiller builds adapters for exactly the
    declared taps; a method that declares none costs none.
    """

    imitates: ClassVar[Literal["features", "outputs"]] = "features"
    taps: tuple[Tap, ...] = ()

    def forward(self, batch: DistillBatch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        """Raise :class:`IncompatibleModelsError` if the pair lacks what the term reads.

        Called once by the Distiller; the default accepts every detector.
        """


def check_choice(method: str, option: str, value: object, choices: Sequence[str]) -> None:
    """Refuse an option value the method does not know when it is built, not at its first step."""
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        raise ValueError(f"{method} {option} must be {listed}, got {value!r}")


METHODS: Registry[type[DistillMethod]] = Registry("distillation method")
register_method = METHODS.register
list_methods = METHODS.names


def build_method(name: str, **options: object) -> DistillMethod:
    """Instantiate a registered method; unknown names or options name the valid ones."""
    cls = METHODS.get(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"method {name!r} has no option(s) {', '.join(unknown)}; "
            f"options are: {', '.join(accepted) or 'none'}"
        )
    return cls(**options)
