r"""Localization Distillation (Zheng et al., "Localization Distillation for Dense Object
Detection", CVPR 2022).

A GFL-style head predicts each box edge as a distribution over ``B = reg_max + 1``
distance bins. LD distils those distributions as a classifier's logits are
distilled: with temperature ``T`` (10), for anchor ``r`` and edge ``e``::

    p_T = softmax(logits / T) over the bins
    KL_T(r, e) = T^2 * sum_i p^t_T,i (log p^t_T,i - log p^s_T,i)
    L_LD = sum_{r in R} w_r mean_e KL_T(r, e)  /  sum_{r in R} w_r

over a region ``R`` of anchors with weights ``w_r`` (the method chooses both:
:class:`detdistill.losses.methods.LocalizationDistillation`). The ``T^2``
keeps the gradient's size independent of ``T`` (Hinton et al., 2015).
"""

from __future__ import annotations

from torch import Tensor

from detdistill.losses._precision import float32_loss

__all__ = ["localization_distillation_loss"]


@float32_loss
def localization_distillation_loss(
    student_codes: Tensor,
    teacher_codes: Tensor,
    weights: Tensor,
    bins: int,
    temperature: float = 10.0,
) -> Tensor:
    """``L_LD`` on ``(M, 4 * bins)`` edge logits of the same anchors and ``(M,)`` weights.

    Returns an exact 0 that keeps the graph when the weights sum to 0 (no region).
    """
    if student_codes.shape != teacher_codes.shape or student_codes.shape[-1] != 4 * bins:
        raise ValueError(
            f"edge logits must both be (M, 4 * {bins}), got {tuple(student_codes.shape)} "
            f"and {tuple(teacher_codes.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student = (student_codes.reshape(-1, 4, bins) / temperature).log_softmax(-1)
    teacher = (teacher_codes.detach().reshape(-1, 4, bins) / temperature).log_softmax(-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1) * temperature**2  # (M, 4)
    weights = weights.detach()
    total = weights.sum()
    if total <= 0:
        return student_codes.sum() * 0.0
    return (weights * kl.mean(-1)).sum() / total
