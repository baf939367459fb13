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

    L_box = sum_r w_r (1 - GIoU(B(x_r), B(t_r)))  /  sum_r w_r,   w_r = max_k sigma(t_rk)

between the boxes both regressions decode to at the same anchor, weighted by
the teacher's top class probability (zero where the teacher's box is under a
pixel wide or high: FCOS's clipped distances far from objects). Heads with a quality branch (FCOS, ATSS)
add ``L_quality = sum_r w_r BCE(q^x_r, sigma(q^t_r)) / sum_r w_r``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from detdistill.losses._precision import float32_loss

__all__ = ["cross_head_box_loss", "cross_head_class_loss", "cross_head_quality_loss"]


@float32_loss
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


@float32_loss
def cross_head_box_loss(cross_boxes: Tensor, teacher_boxes: Tensor, weights: Tensor) -> Tensor:
    """``L_box`` above on ``(M, 4)`` xyxy boxes of the same anchors and ``(M,)`` weights."""
    if cross_boxes.shape != teacher_boxes.shape or cross_boxes.shape[:-1] != weights.shape:
        raise ValueError(
            f"boxes {tuple(cross_boxes.shape)} and {tuple(teacher_boxes.shape)} need (M, 4) "
            f"and weights (M,), got weights {tuple(weights.shape)}"
        )
    giou = generalized_box_iou_loss(cross_boxes, teacher_boxes.detach(), reduction="none")
    return _weighted_mean(giou, weights.detach())


@float32_loss
def cross_head_quality_loss(
    cross_quality: Tensor, teacher_quality: Tensor, weights: Tensor
) -> Tensor:
    """``L_quality`` above on ``(M,)`` quality logits of the same anchors."""
    target = teacher_quality.detach().sigmoid()
    bce = F.binary_cross_entropy_with_logits(cross_quality, target, reduction="none")
    return _weighted_mean(bce, weights.detach())
