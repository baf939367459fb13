"""Soft-label distillation on sigmoid classification heads (baseline ``kd``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from detdistill.losses.batch import DistillBatch
from detdistill.losses.methods import DistillMethod, register_method


def soft_label_kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    r"""Per-anchor binary KL between softened teacher and student class probabilities.

    With ``p^t = sigmoid(z^t / T)`` and ``p^s = sigmoid(z^s / T)`` per anchor
    ``r`` and class ``k``::

        L_KD = T^2 * (1/R) * sum_r sum_k [ BCE(p^s_{r,k}, p^t_{r,k}) - H(p^t_{r,k}) ]

    i.e. the binary cross-entropy used for sigmoid one-stage heads (Hinton et
    al., 2015, adapted per class as in Chen et al., NeurIPS 2017), minus the
    teacher's entropy. The entropy does not depend on the student, so the
    gradient is that of the plain BCE, but the loss is 0 when the networks
    agree. ``T^2`` keeps gradient size independent of ``T``.

    Args:
        student_logits, teacher_logits: (..., K) logits, any leading shape; every
            leading position is one anchor.

    Returns:
        Scalar loss averaged over anchors; 0 (with a graph) for no anchors.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.numel() == 0:
        return student_logits.sum() * 0.0
    z_s = student_logits / temperature
    z_t = teacher_logits.detach() / temperature
    p_t = z_t.sigmoid()
    # The binary KL written with log-sigmoids: no cancellation of two large
    # cross-entropies, so near-identical networks give a tiny non-negative value.
    kl = p_t * (F.logsigmoid(z_t) - F.logsigmoid(z_s)) + (1 - p_t) * (
        F.logsigmoid(-z_t) - F.logsigmoid(-z_s)
    )
    num_anchors = student_logits.numel() // student_logits.shape[-1]
    return kl.sum() * temperature**2 / num_anchors


@register_method("kd")
class SoftLabelKD(DistillMethod):
    """Soft-label distillation over every anchor's class probabilities (Hinton et al., 2015)."""

    imitates = "outputs"

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"kd temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, batch: DistillBatch) -> Tensor:
        return soft_label_kd_loss(
            batch.student.flat_cls_logits(), batch.teacher.flat_cls_logits(), self.temperature
        )
