"""Adapters: the trainable maps from the student's channels to the teacher's, per declared tap.

A method's tap (:mod:`detdistill.losses.taps`) is a student tensor compared with
a teacher tensor of possibly different width. Each level gets its own 1x1
adapter (identity where the widths match): a YOLO neck is 64/128/256 wide
where an FPN is one width at every level. :class:`StudentWithTaps` is the
trainable branch, the student plus every tap's adapters, in one module so DDP
wraps exactly what trains.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from detdistill.losses import IncompatibleModelsError, Tap
from detdistill.models.output import DetectorOutput

__all__ = ["PointwiseAdapter", "StudentWithTaps", "build_adapters", "build_tap_adapters"]


class PointwiseAdapter(nn.Conv2d):
    """A 1x1 convolution computed as one batched matrix product (``baddbmm``) over the batch.

    Same parameters, initialisation and ``state_dict`` as ``nn.Conv2d(c_in,
    c_out, 1)`` (checkpoints load either way) and the same values to float
    rounding. Why: on CPU, oneDNN's 1x1 convolution forward and backward cost
    three times the ``baddbmm`` form's for the ``digits`` pair's adapters (32 -> 96 channels,
    128 px, batch 16: 6.2 ms against 2.1 ms forward and backward at 2 threads;
    at 1 thread and ResNet-sized maps the matmul is 5-15% faster), and the
    adapters are most of what distillation adds to a small student's step.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        weight = self.weight.view(1, self.out_channels, self.in_channels)
        out = torch.baddbmm(self.bias.view(1, -1, 1), weight.expand(n, -1, -1), x.flatten(2))
        return out.view(n, self.out_channels, h, w)


def build_adapters(
    student_channels: Sequence[int], teacher_channels: Sequence[int]
) -> nn.ModuleList:
    """One 1x1 conv per level (student -> teacher channels of that level), identity where they match.

    Channels are per level: a YOLO neck is 64/128/256 wide where an FPN is the
    same width at every level.
    """
    if len(student_channels) != len(teacher_channels):
        raise IncompatibleModelsError(
            f"feature levels: teacher {len(teacher_channels)} vs student {len(student_channels)}"
        )
    return nn.ModuleList(
        nn.Identity() if s == t else PointwiseAdapter(s, t)
        for s, t in zip(student_channels, teacher_channels, strict=True)
    )


def build_tower_adapters(student: nn.Module, teacher: nn.Module, convs: int) -> nn.ModuleList:
    """Adapters of the head tower features after ``convs`` convs: ``[cls, reg]``, each per level.

    A tower shared over levels (torchvision's heads) gets one adapter shared
    over levels, as the tower itself is; per-level towers (YOLO) get one each.
    """
    shared = student.towers_shared and teacher.towers_shared
    adapters = []
    for s_widths, t_widths in zip(
        student.tower_channels(convs), teacher.tower_channels(convs), strict=True
    ):
        branch = build_adapters(s_widths[:1], t_widths[:1]) if shared else build_adapters(
            s_widths, t_widths
        )  # fmt: skip
        adapters.append(branch)
    return nn.ModuleList(adapters)


def build_tap_adapters(tap: Tap, student: nn.Module, teacher: nn.Module) -> nn.ModuleList:
    """The adapters of one tap: per level for the neck; ``[cls, reg]`` for a tower tap.

    A tower shared over levels (torchvision's heads) gets one adapter shared
    over levels, as the tower itself is; per-level towers (YOLO) get one each.
    """
    if tap.where == "neck":
        return build_adapters(student.feature_channels, teacher.feature_channels)
    shared = student.towers_shared and teacher.towers_shared
    branches = zip(
        student.tower_channels(student.tower_depth - tap.before_last),
        teacher.tower_channels(teacher.tower_depth - tap.before_last),
        strict=True,
    )
    return nn.ModuleList(
        build_adapters(s[:1], t[:1]) if shared else build_adapters(s, t) for s, t in branches
    )


class StudentWithTaps(nn.Module):
    """The student and its taps' adapters: everything trainable, in one module.

    ``forward`` runs the student (keeping its tower features at ``keep_tower``
    convs when a tower tap asks) and returns its output with each tap's
    adapted tensors.
    """

    def __init__(
        self, student: nn.Module, teacher: nn.Module, taps: Iterable[Tap], keep_tower: int | None
    ):
        super().__init__()
        self.student = student
        self.taps = tuple(sorted(set(taps), key=lambda t: t.key))
        self.keep_tower = keep_tower
        self.adapters = nn.ModuleDict(
            {tap.key: build_tap_adapters(tap, student, teacher) for tap in self.taps}
        )

    def forward(
        self,
        images: Tensor,
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> tuple[DetectorOutput, dict[Tap, Any]]:
        output = self.student.forward_batch(images, image_sizes, targets, self.keep_tower)
        tapped: dict[Tap, Any] = {}
        for tap in self.taps:
            adapters = self.adapters[tap.key]
            if tap.where == "neck":
                tapped[tap] = [a(f) for a, f in zip(adapters, output.features, strict=True)]
            else:
                tapped[tap] = tuple(
                    [branch[min(i, len(branch) - 1)](f) for i, f in enumerate(feats)]
                    for branch, feats in zip(adapters, output.tower_features, strict=True)
                )
        return output, tapped
