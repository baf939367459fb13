r"""CrossKD's losses on cross-head predictions (Wang et al., "CrossKD: Cross-Head Knowledge
Distillation for Object Detection", CVPR 2024).

CrossKD feeds the student's intermediate head features through the teacher's
remaining head layers and distils those *cross-head* predictions ``x`` into the
teacher's predictions ``t``; the student's own head keeps only its
ground-truth losses, so the two targets never pull one set of outputs in
different directions. Over every anchor ``r`` and class ``k`` of the batch::

    L_cls = sum_{r,k} |sigma(x_rk) - sigma(t_rk)|^beta * BCE(x_rk, sigma(t_rk))  /  max(N_pos, 1)

(the quality focal loss with the teacher's probability as the soft label,
``beta = 1``; ``N_pos`` is the number of the student's positive anchors) and::

    L_box = sum_r b_r (1 - GIoU(B(x_r), B(t_r)))  /  sum_r b_r,   b_r = w_r [t_r >= 1 px]

between the boxes both regressions decode to at the same anchor, weighted by
the teacher's top class probability ``w_r = max_k sigma(t_rk)``, and not at all
where the teacher's box is under a pixel wide or high (FCOS's clipped
distances far from objects: GIoU against such a box is about constant). Heads
with a quality branch (FCOS, ATSS) add
``L_quality = sum_r w_r BCE(q^x_r, sigma(q^t_r)) / sum_r w_r``, with the plain
``w_r``: a quality target needs no box.

The method (``crosskd``) is :class:`CrossHeadKD` at the end: it declares one
tap, the student's tower features before the last ``teacher_convs`` convs, and
needs nothing else from the pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from detdistill.losses.batch import DistillBatch
from detdistill.losses.methods import DistillMethod, register_method
from detdistill.losses.taps import tower
from detdistill.models.output import flatten_levels

__all__ = [
    "CrossHeadKD",
    "cross_head_box_loss",
    "cross_head_class_loss",
    "cross_head_quality_loss",
]


def cross_head_class_loss(
    cross_logits: Tensor, teacher_logits: Tensor, num_positives: int, beta: float = 1.0
) -> Tensor:
    """``L_cls`` above on ``(..., K)`` logits of the same anchors; 0 when they are equal."""
    if cross_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"cross logits {tuple(cross_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    target = teacher_logits.detach().sigmoid()
    modulation = (cross_logits.sigmoid() - target).abs().pow(beta)
    bce = F.binary_cross_entropy_with_logits(cross_logits, target, reduction="none")
    return (modulation * bce).sum() / max(int(num_positives), 1)


def _weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    return (weights * values).sum() / weights.sum().clamp(min=torch.finfo(weights.dtype).tiny)


def cross_head_box_loss(cross_boxes: Tensor, teacher_boxes: Tensor, weights: Tensor) -> Tensor:
    """``L_box`` above on ``(M, 4)`` xyxy boxes of the same anchors and ``(M,)`` weights."""
    if cross_boxes.shape != teacher_boxes.shape or cross_boxes.shape[:-1] != weights.shape:
        raise ValueError(
            f"boxes {tuple(cross_boxes.shape)} and {tuple(teacher_boxes.shape)} need (M, 4) "
            f"and weights (M,), got weights {tuple(weights.shape)}"
        )
    giou = generalized_box_iou_loss(cross_boxes, teacher_boxes.detach(), reduction="none")
    return _weighted_mean(giou, weights.detach())


def cross_head_quality_loss(
    cross_quality: Tensor, teacher_quality: Tensor, weights: Tensor
) -> Tensor:
    """``L_quality`` above on ``(M,)`` quality logits of the same anchors."""
    target = teacher_quality.detach().sigmoid()
    bce = F.binary_cross_entropy_with_logits(cross_quality, target, reduction="none")
    return _weighted_mean(bce, weights.detach())


@register_method("crosskd")
class CrossHeadKD(DistillMethod):
    """CrossKD (Wang et al., CVPR 2024): the teacher's head on the student's head features.

    The student's tower features before its last ``teacher_convs`` convs (the
    reference implementation's ``reused_teacher_head_idx = 3`` of 4 convs is
    ``teacher_convs=1``) go through the teacher's last ``teacher_convs`` tower
    convs and predictors; those cross-head predictions are distilled into the
    teacher's own with :func:`cross_head_class_loss`,
    :func:`cross_head_box_loss` (times ``box_weight``) and, for heads with a
    quality branch, :func:`cross_head_quality_loss` (formulas in
    :mod:`detdistill.losses.crosskd`). Works on every detector whose head has
    conv towers and a box decoder: RetinaNet, FCOS, ATSS, GFL and YOLO (v8, 11, 26).

    For ``auto`` weights CrossKD counts as a feature term: its gradient reaches
    only the student's features (backbone, neck, the tower convs before the
    cut), through the teacher's head, never the student's predictors. On
    ``digits`` RetinaNet (baseline 5.8 mAP) it reached 6.4 as an output term
    (ratio 0.3), 13.5 at the feature ratio (10) and 12.1 at the paper's weight
    1 (``benchmarks/results/digits_crosskd_weight.json``).
    """

    imitates = "features"

    def __init__(self, teacher_convs: int = 1, beta: float = 1.0, box_weight: float = 1.0):
        super().__init__()
        if teacher_convs < 0:
            raise ValueError(f"crosskd teacher_convs must be >= 0, got {teacher_convs}")
        if beta <= 0 or box_weight < 0:
            raise ValueError(
                f"crosskd needs beta > 0 and box_weight >= 0, got {beta}, {box_weight}"
            )
        self.teacher_convs = teacher_convs
        self.beta = beta
        self.box_weight = box_weight
        # The student's tower features where the teacher's last teacher_convs convs begin.
        self.taps = (tower(teacher_convs),)

    def forward(self, batch: DistillBatch) -> Tensor:
        teacher = batch.teacher_model
        if teacher is None:
            raise ValueError("crosskd runs the teacher's head: run it through the Distiller")
        dtype = next(teacher.parameters()).dtype  # a half-precision teacher takes half inputs
        cls_feats, reg_feats = ([f.to(dtype) for f in fs] for fs in batch.tapped(self.taps[0]))
        start = teacher.tower_depth - self.teacher_convs
        cross_cls, cross_reg, cross_quality = teacher.head_outputs(
            *teacher.run_towers(cls_feats, reg_feats, start)
        )
        # Compare in the student's precision (a half-precision teacher gives half outputs).
        dtype = batch.student.flat_cls_logits().dtype
        teacher_logits = batch.teacher.flat_cls_logits().to(dtype)
        num_positives = sum(int((m >= 0).sum()) for m in batch.student.matched_idxs)
        cross_logits = flatten_levels(cross_cls, batch.student.num_classes).to(dtype)
        loss = cross_head_class_loss(cross_logits, teacher_logits, num_positives, self.beta)
        weights = teacher_logits.sigmoid().amax(-1).reshape(-1)
        anchors = torch.cat(batch.student.anchors).to(dtype)
        code = batch.teacher.box_code_size
        cross_boxes = teacher.decode_boxes(
            flatten_levels(cross_reg, code).to(dtype).reshape(-1, code), anchors
        )
        teacher_boxes = teacher.decode_boxes(
            batch.teacher.flat_bbox_regression().to(dtype).reshape(-1, code), anchors
        )
        # A teacher box under a pixel wide or high (FCOS's clipped distances far from
        # any object) has no overlap worth imitating: GIoU against it is about constant
        # and its gradient is set by GIoU's epsilon.
        proper = (teacher_boxes[:, 2:] - teacher_boxes[:, :2] >= 1.0).all(dim=1)
        box_weights = weights * proper
        loss = loss + self.box_weight * cross_head_box_loss(cross_boxes, teacher_boxes, box_weights)
        if cross_quality is not None and batch.teacher.quality is not None:
            loss = loss + cross_head_quality_loss(
                flatten_levels(cross_quality, 1).to(dtype).reshape(-1),
                batch.teacher.flat_quality().to(dtype).reshape(-1),
                weights,
            )
        return loss
