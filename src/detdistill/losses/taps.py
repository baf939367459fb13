"""Taps: the student tensors a method reads beyond the detectors' outputs.

Every method gets both detectors' :class:`~detdistill.models.output.DetectorOutput`
(features, logits, box regression, quality, anchors, the student's assignment)
for free: the forward pass makes them anyway. What costs something is declared:
a *tap* is a student tensor taken inside the network and mapped to the
teacher's channel count by a trainable adapter per level. A method lists its
taps (``DistillMethod.taps``); the Distiller builds one set of adapters per
distinct tap, asks the student's forward pass to keep what the taps need, and
hands the adapted tensors to the methods in ``DistillBatch.taps``. A method
that declares nothing costs no adapter and no extra activation.

Two kinds exist:

* :data:`NECK`: the head's input features (one per level), adapted to the
  teacher's widths. What feature imitation (FitNet, FGFI, DeFeat, PFI, ...)
  compares with ``batch.teacher.features``.
* :func:`tower` ``(before_last=j)``: the head towers' features before their last
  ``j`` convs, ``(cls, reg)`` per level, adapted to the teacher's tower widths
  at the same point. What a method that runs the teacher's remaining tower
  convs on the student's features reads (CrossKD).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["NECK", "Tap", "tower"]


@dataclass(frozen=True)
class Tap:
    """One tensor a method reads: ``where`` in the student, and for towers, how deep."""

    where: Literal["neck", "tower"]
    before_last: int = 0

    def __post_init__(self) -> None:
        if self.where not in ("neck", "tower"):
            raise ValueError(f"a tap is taken at 'neck' or 'tower', not {self.where!r}")
        if self.before_last < 0 or (self.where == "neck" and self.before_last):
            raise ValueError(f"before_last must be >= 0 and 0 for the neck, got {self!r}")

    @property
    def key(self) -> str:
        """Its name among the Distiller's adapters (``neck``, ``tower1``, ...)."""
        return "neck" if self.where == "neck" else f"tower{self.before_last}"


NECK = Tap("neck")


def tower(before_last: int) -> Tap:
    """The head towers' features before their last ``before_last`` convs."""
    return Tap("tower", before_last)
