"""What a distillation method receives for one batch: the teacher/student pair, whole.

A method sees both detectors' :class:`~detdistill.models.output.DetectorOutput`
as they came out of the pair's forward pass (``Distiller.run_pair``), the
student tensors it declared as taps (:mod:`detdistill.losses.taps`), adapted to
the teacher's channels, the targets in the batch tensor's coordinates, and the
frozen teacher itself. The last one
lets a method run (part of) the teacher's head on student features, as CrossKD
does: gradients reach the student through the features, while the teacher's
parameters have ``requires_grad=False`` and stay untouched.

Everything else here is derived from those fields once per batch
(``cached_property``), so two methods that read the same thing share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from detdistill.errors import DetDistillError
from detdistill.losses.taps import Tap
from detdistill.models.output import DetectorOutput

__all__ = ["Candidates", "DistillBatch", "IncompatibleModelsError"]


class IncompatibleModelsError(DetDistillError, ValueError):
    """Teacher and student disagree on what the distillation terms compare."""


class Candidates(NamedTuple):
    """Candidate boxes of the ground-truth objects, one entry per (object, anchor) pair."""

    images: Tensor  # (P,) image index in the batch
    anchors: Tensor  # (P,) anchor index in the image's flat anchor order
    classes: Tensor  # (P,) the object's class
    instances: Tensor  # (P,) object id, unique over the batch


@dataclass(eq=False)
class DistillBatch:
    """One batch of the pair. The teacher's output is detached (computed without grad).

    Attributes:
        student: the student's output, with the detector's own ``matched_idxs``
            and ``losses`` (the batch had targets).
        teacher: the teacher's output on the same batched tensor.
        targets: per image ``boxes`` (M, 4) and ``labels`` (M,) in batch
            tensor pixels, as the student's assigner saw them.
        images: the batched, normalised tensor both networks ran on.
        taps: the declared taps' adapted student tensors (the neck tap: a list
            per level in the teacher's channel count; a tower tap: ``(cls,
            reg)`` lists); read them with :meth:`tapped`.
        teacher_model: the frozen teacher (``None`` where no method needs it,
            e.g. in unit tests of losses on plain tensors).
    """

    student: DetectorOutput
    teacher: DetectorOutput
    targets: list[dict[str, Tensor]]
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
    def gt_boxes(self) -> list[Tensor]:
        return [t["boxes"] for t in self.targets]

    @property
    def gt_labels(self) -> list[Tensor]:
        return [t["labels"] for t in self.targets]

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        return [(x.shape[-2], x.shape[-1]) for x in self.student.cls_logits]

    @cached_property
    def candidates(self) -> Candidates:
        """Each object's positive anchors, as the student's own assigner chose them."""
        if self.student.matched_idxs is None:
            raise ValueError("the student's output has no assignment: run it with targets")
        images, anchors, classes, instances = [], [], [], []
        offset = 0
        for n, (matched, labels) in enumerate(
            zip(self.student.matched_idxs, self.gt_labels, strict=True)
        ):
            pos = torch.nonzero(matched >= 0).squeeze(1)
            gt_index = matched[pos]
            images.append(torch.full_like(pos, n))
            anchors.append(pos)
            classes.append(labels[gt_index].to(pos.dtype))
            instances.append(gt_index + offset)
            offset += labels.numel()
        return Candidates(*(torch.cat(x) for x in (images, anchors, classes, instances)))

    def top_iou_candidates(self, k: int) -> Candidates:
        """Each object's ``k`` anchors of highest IoU with its box (IoU > 0), over all levels.

        A bag as ATSS draws before thresholding: larger than the assigner's
        positives (3.8 per object for the ``digits`` student), and the same
        size for every object, so there is an order worth mimicking. The
        overlaps are the student's assigner's (``student.gt_ious``) where it
        computed them: computing them again took most of RM's time. The top-k
        runs on all objects of the batch at once.
        """
        counts = torch.tensor([b.shape[0] for b in self.gt_boxes])
        if int(counts.sum()) == 0:
            return self.candidates
        ious = self.student.gt_ious
        if ious is None:  # an assigner that never compares boxes with anchors (FCOS)
            ious = [
                box_iou(boxes.to(anchors.dtype), anchors)
                for boxes, anchors in zip(self.gt_boxes, self.student.anchors, strict=True)
            ]
        iou = torch.cat(ious)  # (objects, anchors): one batched tensor, one anchor count
        values, index = iou.topk(min(k, iou.shape[1]), dim=1)
        instances, rank = torch.nonzero(values > 0, as_tuple=True)
        chosen = index[instances, rank]
        image_of = torch.repeat_interleave(torch.arange(len(counts)), counts).to(chosen.device)
        classes = torch.cat(self.gt_labels)[instances].to(chosen.dtype)
        return Candidates(image_of[instances], chosen, classes, instances)
