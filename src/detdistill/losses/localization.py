r"""Localization Distillation (Zheng et al., "Localization Distillation for Dense Object
Detection", CVPR 2022).

A GFL-style head predicts each box edge as a distribution over ``B = reg_max + 1``
distance bins. LD distils those distributions as a classifier's logits are
distilled: with temperature ``T`` (10), for anchor ``r`` and edge ``e``::

    p_T = softmax(logits / T) over the bins
    KL_T(r, e) = T^2 * sum_i p^t_T,i (log p^t_T,i - log p^s_T,i)
    L_LD = sum_{r in R} w_r mean_e KL_T(r, e)  /  sum_{r in R} w_r

over a region ``R`` of anchors with weights ``w_r`` (the method chooses both:
:class:`LocalizationDistillation` below). The ``T^2``
keeps the gradient's size independent of ``T`` (Hinton et al., 2015).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from detdistill.losses.batch import DistillBatch, IncompatibleModelsError
from detdistill.losses.methods import DistillMethod, check_choice, register_method
from detdistill.models.assigners import atss_candidates

__all__ = ["LocalizationDistillation", "localization_distillation_loss"]


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


@register_method("ld")
class LocalizationDistillation(DistillMethod):
    """LD (Zheng et al., CVPR 2022): box-edge distributions, see :mod:`detdistill.losses.localization`.

    Region ``R`` and weights ``w_r``:

    * ``region="vlr"`` (default): the student's positive anchors plus the
      *valuable localisation region*, anchors whose IoU with a ground truth is
      at least ``alpha_vl`` times that box's ATSS threshold (mean + std of its
      candidates' IoUs; the paper measures DIoU, here IoU);
    * ``region="positives"``: the positive anchors only (MMDetection's LDHead).

    ``w_r`` is the teacher's highest class probability at the anchor, so that
    edges the teacher is unsure of count less. Needs a detector that regresses
    edge distributions (GFL); any other head is refused when the Distiller is
    built.
    """

    imitates = "outputs"

    def __init__(
        self,
        temperature: float = 10.0,
        region: Literal["vlr", "positives"] = "vlr",
        alpha_vl: float = 0.25,
    ):
        super().__init__()
        check_choice("ld", "region", region, ("vlr", "positives"))
        if temperature <= 0 or alpha_vl <= 0:
            raise ValueError(
                f"ld needs temperature > 0 and alpha_vl > 0, got {temperature}, {alpha_vl}"
            )
        self.temperature = temperature
        self.region = region
        self.alpha_vl = alpha_vl

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        bins = {
            "student": getattr(student, "reg_max", None),
            "teacher": getattr(teacher, "reg_max", None),
        }
        if None in bins.values():
            raise IncompatibleModelsError(
                "ld distils box-edge distributions: it needs detectors that regress them (gfl; yolo v8 and 11, not YOLO26), "
                f"got student {student.head_type!r} and teacher {teacher.head_type!r}"
            )
        if bins["student"] != bins["teacher"]:
            raise IncompatibleModelsError(f"ld needs the same reg_max in both models, got {bins}")

    def _region(self, batch: DistillBatch) -> Tensor:
        positives = torch.stack(batch.student.matched_idxs) >= 0
        if self.region == "positives":
            return positives
        sizes = batch.student.num_anchors_per_level()
        topk = getattr(batch.teacher_model, "topk", 9)
        regions = []
        for anchors, boxes in zip(batch.student.anchors, batch.gt_boxes, strict=True):
            if boxes.numel() == 0:
                regions.append(
                    torch.zeros(anchors.shape[0], dtype=torch.bool, device=anchors.device)
                )
                continue
            ious, _, thresholds = atss_candidates(anchors, sizes, boxes.to(anchors.dtype), topk)
            regions.append((ious >= self.alpha_vl * thresholds[None]).any(dim=1))
        return positives | torch.stack(regions)

    def forward(self, batch: DistillBatch) -> Tensor:
        region = self._region(batch)
        student_codes = batch.student.flat_bbox_regression()
        teacher_codes = batch.teacher.flat_bbox_regression()
        weights = batch.teacher.flat_cls_logits().sigmoid().amax(-1)
        return localization_distillation_loss(
            student_codes[region],
            teacher_codes[region],
            weights[region],
            bins=student_codes.shape[-1] // 4,
            temperature=self.temperature,
        )
