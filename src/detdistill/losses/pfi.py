"""Prediction-guided Feature Imitation (PFI), Li et al., AAAI 2022."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from detdistill.losses._levels import check_levels, check_spatial
from detdistill.losses.batch import DistillBatch
from detdistill.losses.methods import DistillMethod, check_choice, register_method
from detdistill.losses.normalize import FEATURE_NORMS, FeatureNorm, normalize_features
from detdistill.losses.taps import NECK

WeightNorm = Literal["none", "mean"]


def prediction_difference(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``P(n,h,w) = mean_{a,k} (sigmoid(z^t) - sigmoid(z^s))^2`` for one level, shape (N, H, W)."""
    return (teacher_logits.sigmoid() - student_logits.sigmoid()).pow(2).mean(dim=1)


def feature_difference(student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
    """``D(n,h,w) = mean_c (F^s - F^t)^2`` for one level, shape (N, H, W)."""
    return (student_feats - teacher_feats).pow(2).mean(dim=1)


def pfi_loss(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    student_logits: Sequence[Tensor],
    teacher_logits: Sequence[Tensor],
    norm: Literal["mean", "l2"] = "mean",
    detach_weight: bool = True,
    weight_norm: WeightNorm = "none",
    feature_norm: FeatureNorm = "none",
) -> Tensor:
    r"""Feature imitation weighted by where the two networks' predictions differ.

    Per FPN level ``l`` (student features already adapted to teacher channels)::

        P_l(n,h,w) = mean_{a,k} (sigmoid(z^t_l) - sigmoid(z^s_l))^2      (detached)
        D_l(n,h,w) = mean_c (phi_l(F^s_l) - F^t_l)^2
        L_PFI = (1/L) * sum_l mean_{n,h,w} (P_l * D_l)

    Source: Li et al., AAAI 2022, eq. for L_PFI. The paper's exact normalisation
    is not public; ``norm="l2"`` gives the alternative of a public port,
    ``||P_l * D_l||_2 / (N*H*W)``, and ``detach_weight=False`` lets gradients
    flow through ``P_l`` as that port does. The defaults are the formula above.

    Why: the locations where features differ most are not where predictions
    differ most, so weighting by ``P`` spends the imitation where it changes the
    output.

    The scale-free form (``weight_norm="mean", feature_norm="channel"``)::

        W_l(n,h,w) = P_l(n,h,w) / mean_{n,h,w} P_l                 (detached)
        D_hat_l(n,h,w) = mean_c (std_c(phi_l(F^s_l)) - std_c(F^t_l))^2
        L_PFI = (1/L) * sum_l mean_{n,h,w} (W_l * D_hat_l)

    with ``std_c`` the per-channel standardisation of
    :func:`~detdistill.losses.normalize.standardize_channels` (PKD's). The
    paper's form is a product of two small numbers whose sizes depend on the
    data and the models (P averages ~1e-4 for a tiny student, D the square of
    the teacher's activation scale), so its weight beta had to be searched
    (30000 on ``digits`` against the paper's 1.5 on COCO). In this form
    ``W_l`` averages 1 and keeps only *where* the predictions differ, and
    ``D_hat_l`` averages ``2 (1 - Pearson correlation)`` in [0, 4], so every
    level contributes on the same scale and a weight means the same on any
    data. Each option also works alone.

    Args:
        student_feats, teacher_feats: per level (N, C, H_l, W_l).
        student_logits, teacher_logits: per level (N, A*K, H_l, W_l).
        weight_norm: ``"none"`` (P as is) or ``"mean"`` (P over its per-level mean).
        feature_norm: ``"none"`` or ``"channel"`` (standardise each channel first).

    Returns:
        Scalar loss; exactly 0 when the student's logits equal the
        teacher's (``P = 0``) or its features equal the teacher's (``D = 0``).
        Levels may have any sizes; a level with zero locations contributes 0.
        Lists of different lengths or mismatched shapes raise ValueError naming
        the level.
    """
    check_levels("student_feats", student_feats, "teacher_feats", teacher_feats)
    check_levels("student_logits", student_logits, "teacher_logits", teacher_logits)
    check_spatial("student_feats", student_feats, "student_logits", student_logits)
    if norm not in ("mean", "l2"):
        raise ValueError(f"norm must be 'mean' or 'l2', got {norm!r}")
    if weight_norm not in ("none", "mean"):
        raise ValueError(f"weight_norm must be 'none' or 'mean', got {weight_norm!r}")
    student_feats, teacher_feats = normalize_features(student_feats, teacher_feats, feature_norm)

    per_level = []
    for f_s, f_t, z_s, z_t in zip(
        student_feats, teacher_feats, student_logits, teacher_logits, strict=True
    ):
        with torch.set_grad_enabled(not detach_weight and torch.is_grad_enabled()):
            weight = prediction_difference(z_s, z_t.detach())  # no graph kept when detached
        if weight_norm == "mean" and weight.numel() > 0:
            # Detached with P (the default); with detach_weight=False the mean is part of
            # the function whose gradient flows.
            weight = weight / weight.mean().clamp_min(torch.finfo(weight.dtype).tiny)
        weighted = weight * feature_difference(f_s, f_t)
        count = max(weighted.numel(), 1)
        if norm == "mean":
            per_level.append(weighted.sum() / count)
        else:
            per_level.append(torch.linalg.vector_norm(weighted) / count)
    return torch.stack(per_level).mean()


@register_method("pfi")
class PredictionGuidedImitation(DistillMethod):
    """Prediction-guided Feature Imitation (Li et al., AAAI 2022); see :func:`pfi_loss`.

    ``weight_norm="mean", feature_norm="channel"`` is the scale-free form.
    """

    taps = (NECK,)

    def __init__(
        self,
        norm: Literal["mean", "l2"] = "mean",
        detach_weight: bool = True,
        weight_norm: WeightNorm = "none",
        feature_norm: FeatureNorm = "none",
    ):
        super().__init__()
        check_choice("pfi", "norm", norm, ("mean", "l2"))
        check_choice("pfi", "weight_norm", weight_norm, ("none", "mean"))
        check_choice("pfi", "feature_norm", feature_norm, FEATURE_NORMS)
        self.norm = norm
        self.detach_weight = detach_weight
        self.weight_norm = weight_norm
        self.feature_norm = feature_norm

    def forward(self, batch: DistillBatch) -> Tensor:
        return pfi_loss(
            batch.tapped(NECK),
            batch.teacher.features,
            batch.student.cls_logits,
            batch.teacher.cls_logits,
            norm=self.norm,
            detach_weight=self.detach_weight,
            weight_norm=self.weight_norm,
            feature_norm=self.feature_norm,
        )
