"""Distillation of one detector into another: the pair, its adapters and its weights.

* :class:`Distiller` (``distiller``): the frozen teacher, the trainable student,
  the chosen methods and their weights; ``run_pair`` is the one path of a batch
  through both detectors.
* ``adapters``: the student-to-teacher channel maps of every declared tap.
* ``compat``: the checks that the two detectors can be compared at all.
* ``auto_weights``: the ``auto`` rule, its measurement and its guard.
"""

from detdistill.distill.adapters import (
    PointwiseAdapter,
    StudentWithTaps,
    build_adapters,
    build_tap_adapters,
)
from detdistill.distill.auto_weights import TermBalance, format_balance
from detdistill.distill.compat import check_compatible
from detdistill.distill.distiller import Distiller, trainable_parameters
from detdistill.losses import IncompatibleModelsError

__all__ = [
    "Distiller",
    "IncompatibleModelsError",
    "PointwiseAdapter",
    "StudentWithTaps",
    "TermBalance",
    "build_adapters",
    "build_tap_adapters",
    "check_compatible",
    "format_balance",
    "trainable_parameters",
]
