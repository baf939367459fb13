"""One batch through the teacher/student pair: the one path training, ``doctor`` and ``analyze`` share.

The student's transform normalises, resizes and pads the images into one
batched tensor, and the teacher runs on *that* tensor: both networks see the
same pixels, so their levels, locations and anchors correspond one to one,
which is what RM's candidates and PFI's locations compare. The targets get the
same checks as in plain training (:meth:`OneStageDetector.check_targets`)
before either network runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from detdistill.losses.batch import DistillBatch
from detdistill.models.output import DetectorOutput

__all__ = ["StudentForward", "TeacherForward", "TowerFeatures", "run_pair"]

TowerFeatures = tuple[list[Tensor], list[Tensor]]
# (batched images, image sizes, targets) -> (output with losses, adapted neck features,
# adapted head tower features or None)
StudentForward = Callable[
    [Tensor, list[tuple[int, int]], list[dict[str, Tensor]]],
    tuple[DetectorOutput, list[Tensor], TowerFeatures | None],
]
# (batched images, image sizes) -> output, computed without autograd
TeacherForward = Callable[[Tensor, list[tuple[int, int]]], DetectorOutput]


def _plain_student(student: nn.Module) -> StudentForward:
    def forward(images, image_sizes, targets):
        output = student.forward_batch(images, image_sizes, targets)
        return output, output.features, None

    return forward


def _plain_teacher(teacher: nn.Module) -> TeacherForward:
    @torch.inference_mode()
    def forward(images, image_sizes):
        return teacher.forward_batch(images, image_sizes)

    return forward


def run_pair(
    student: nn.Module,
    teacher: nn.Module,
    images: list[Tensor],
    targets: list[dict[str, Tensor]],
    *,
    student_forward: StudentForward | None = None,
    teacher_forward: TeacherForward | None = None,
) -> DistillBatch:
    """Both detectors on one batch of images (each ``(3, H, W)``) and their targets.

    ``student_forward`` runs the student on the batched tensor and returns its
    output, its neck features adapted to the teacher's channels and (when a
    method asked for them) its adapted head tower features; the Distiller
    passes its adapter branch, possibly DDP-wrapped. By default: the student
    alone, features unadapted, no tower features. ``teacher_forward`` defaults to the
    teacher's ``forward_batch`` under ``torch.inference_mode``. The student's output carries the
    assignment and the detection losses.
    """
    student.check_targets(images, targets)
    image_list, batch_targets = student.transform(images, targets)
    tensors, sizes = image_list.tensors, image_list.image_sizes
    # Teacher first: its activations are freed as it goes (inference mode), so it
    # runs on a quiet heap. After the student's forward, whose activations stay
    # alive for backward, the YOLO11n teacher's forward took 57 ms instead of 49
    # (CPU, 128 px, batch 16): the step is 6% faster this way, the RetinaNet pairs
    # are unchanged (0.996x, 0.997x), and the peak is lower.
    teacher_output = (teacher_forward or _plain_teacher(teacher))(tensors, sizes)
    output, adapted, tower = (student_forward or _plain_student(student))(
        tensors, sizes, batch_targets
    )
    return DistillBatch(
        student=output,
        teacher=teacher_output,
        student_feats=adapted,
        targets=batch_targets,
        images=tensors,
        teacher_model=teacher,
        student_tower_feats=tower,
    )
