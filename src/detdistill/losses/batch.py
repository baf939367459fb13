"""What a distillation method receives for one batch: the teacher/student pair, whole.

A method sees both detectors' :class:`~detdistill.models.output.DetectorOutput`
as they came out of the pair's forward pass (``Distiller.run_pair``), the
student tensors it declared as taps (:mod:`detdistill.losses.taps`), adapted to
the teacher's channels, the targets in the batch tensor's coordinates, and the
frozen teacher itself. The last one
lets a method run (part of) the teacher's head on student features, as CrossKD
does: gradients reach the student through the features, while the teacher's
parameters have ``requires_grad=False`` and stay untouched.

Its tensors are float32 whatever the autocast state: ``run_pair`` upcasts
autocast's (or a half teacher's) outputs and the methods run with autocast off
(``Distiller.loss_terms``), so a method never handles half precision, where the
small differences distillation is made of underflow and softmax/log of large
logits overflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from detdistill.errors import DetDistillError
from detdistill.losses.taps import Tap
from detdistill.models.output import DetectorOutput

__all__ = ["DistillBatch", "IncompatibleModelsError"]


class IncompatibleModelsError(DetDistillError, ValueError):
    """Teacher and student disagree on what the distillation terms compare."""


@dataclass(eq=False)
class DistillBatch:
    """One batch of the pair. The teacher's output is detached (computed without grad).

    Attributes:
        student: the student's output, with the detector's own ``matched_idxs``
            and ``losses`` (the batch had targets).
        teacher: the teacher's output on the same batched tensor.
        gt_boxes: per image the ground-truth boxes ``(M, 4)`` xyxy in batch
            tensor pixels, as the student's assigner saw them.
        gt_labels: per image their classes ``(M,)``.
        images: the batched, normalised tensor both networks ran on.
        taps: the declared taps' adapted student tensors (the neck tap: a list
            per level in the teacher's channel count; a tower tap: ``(cls,
            reg)`` lists); read them with :meth:`tapped`.
        teacher_model: the frozen teacher (``None`` where no method needs it,
            e.g. in unit tests of losses on plain tensors).
    """

    student: DetectorOutput
    teacher: DetectorOutput
    gt_boxes: list[Tensor]
    gt_labels: list[Tensor]
    images: Tensor
    taps: dict[Tap, Any]
    teacher_model: nn.Module | None = None

    def tapped(self, tap: Tap) -> Any:
        """The adapted student tensors of ``tap``; a tap no method declared is an error."""
        if tap not in self.taps:
            raise KeyError(
                f"no {tap.key!r} tap in this batch: a method reads only the taps it declares "
                f"(DistillMethod.taps); declared: {', '.join(t.key for t in self.taps) or 'none'}"
            )
        return self.taps[tap]

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        return [(x.shape[-2], x.shape[-1]) for x in self.student.cls_logits]
