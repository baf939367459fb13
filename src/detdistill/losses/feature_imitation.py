"""Feature imitation baselines: FitNet, FGFI, DeFeat and teacher-score weighting.

All of them compare adapted student features with teacher features through the
same per-location difference ``D_l = mean_c (phi_l(F^s_l) - F^t_l)^2`` that PFI
uses (channels averaged, not summed, so method weights are comparable across
methods); they differ only in where they look and how they normalise.

Each takes ``feature_norm``: ``"none"`` compares the features as they are (the
published forms), ``"channel"`` standardises every channel of both first
(:mod:`detdistill.losses.normalize`), so ``D_l`` becomes
``D_hat_l = mean_c (std_c(phi_l(F^s_l)) - std_c(F^t_l))^2``, which averages
``2 (1 - Pearson correlation)`` on any data and any level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from detdistill.losses._levels import check_levels, check_spatial
from detdistill.losses.batch import DistillBatch
from detdistill.losses.masks import box_center_masks, fgfi_masks
from detdistill.losses.methods import DistillMethod, check_choice, register_method
from detdistill.losses.normalize import FEATURE_NORMS, FeatureNorm, normalize_features
from detdistill.losses.pfi import feature_difference
from detdistill.losses.taps import NECK


def feature_imitation_loss(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    masks: Sequence[Tensor] | None = None,
    feature_norm: FeatureNorm = "none",
) -> Tensor:
    r"""Mean squared feature difference, everywhere or inside a mask.

    Without masks (FitNet, Romero et al., ICLR 2015)::

        L = (1/L) * sum_l mean_{n,h,w} D_l(n,h,w)

    With masks ``m_l`` of shape (N, H_l, W_l) (FGFI, Wang et al., CVPR 2019;
    DeFeat's foreground or background part, Guo et al., CVPR 2021)::

        L = sum_l sum_{n,h,w} m_l * D_l  /  max(sum_l sum_{n,h,w} m_l, 1)

    i.e. normalised by the number of masked locations, as FGFI's ``1/N_p``
    (FGFI sums channels and halves; that constant ``C/2`` is left to the
    method weight).

    Returns:
        Scalar loss; 0 for identical features; with an all-zero mask, an
        exact 0 that keeps the graph.
    """
    check_levels("student_feats", student_feats, "teacher_feats", teacher_feats)
    student_feats, teacher_feats = normalize_features(student_feats, teacher_feats, feature_norm)
    diffs = [
        feature_difference(f_s, f_t) for f_s, f_t in zip(student_feats, teacher_feats, strict=True)
    ]
    if masks is None:
        return torch.stack([d.mean() for d in diffs]).mean()
    if len(masks) != len(diffs):
        raise ValueError(f"masks has {len(masks)} levels but the features have {len(diffs)}")
    for level, (mask, diff) in enumerate(zip(masks, diffs, strict=True)):
        if mask.shape != diff.shape:
            raise ValueError(
                f"level {level}: mask has shape {tuple(mask.shape)} but the features need "
                f"(N, H, W) = {tuple(diff.shape)}"
            )
    masked = sum((m.to(d.dtype) * d).sum() for m, d in zip(masks, diffs, strict=True))
    count = sum(m.to(d.dtype).sum() for m, d in zip(masks, diffs, strict=True))
    return masked / count.clamp(min=1.0)


def decoupled_feature_loss(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    foreground_masks: Sequence[Tensor],
    foreground_weight: float = 1.0,
    background_weight: float = 1.0,
    feature_norm: FeatureNorm = "none",
) -> Tensor:
    r"""DeFeat's feature part: foreground and background imitated separately.

    ``L = w_fg * L_mask(m) + w_bg * L_mask(1 - m)`` with ``L_mask`` the masked
    :func:`feature_imitation_loss`, so each region is normalised by its own
    size and the large background cannot drown the objects (Guo et al.,
    "Distilling Object Detectors via Decoupled Features", CVPR 2021).
    """
    check_levels("student_feats", student_feats, "teacher_feats", teacher_feats)
    student_feats, teacher_feats = normalize_features(student_feats, teacher_feats, feature_norm)
    background = [~m.bool() for m in foreground_masks]
    fg = feature_imitation_loss(student_feats, teacher_feats, foreground_masks)
    bg = feature_imitation_loss(student_feats, teacher_feats, background)
    return foreground_weight * fg + background_weight * bg


def score_weighted_imitation(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    teacher_logits: Sequence[Tensor],
    feature_norm: FeatureNorm = "none",
) -> Tensor:
    r"""Feature imitation weighted by the teacher's confidence (``scorel2``).

    ``w_l(n,h,w) = max_{a,k} sigmoid(z^t_l)`` and
    ``L = (1/L) * sum_l mean_{n,h,w} (w_l * D_l)``: the form Ultralytics ships
    for YOLO distillation (teacher-score-weighted L2), normalised like PFI so
    the two are directly comparable: PFI weights by where predictions
    *differ*, this by where the teacher is *confident*.

    Returns:
        Scalar loss; 0 for identical features.
    """
    check_levels("student_feats", student_feats, "teacher_feats", teacher_feats)
    check_spatial("teacher_feats", teacher_feats, "teacher_logits", teacher_logits)
    student_feats, teacher_feats = normalize_features(student_feats, teacher_feats, feature_norm)
    per_level = []
    for f_s, f_t, z_t in zip(student_feats, teacher_feats, teacher_logits, strict=True):
        weight = z_t.detach().sigmoid().amax(dim=1)
        per_level.append((weight * feature_difference(f_s, f_t)).mean())
    return torch.stack(per_level).mean()


@register_method("fitnet")
class FitNet(DistillMethod):
    """Imitate the whole feature map (Romero et al., ICLR 2015)."""

    taps = (NECK,)

    def __init__(self, feature_norm: FeatureNorm = "none"):
        super().__init__()
        check_choice("fitnet", "feature_norm", feature_norm, FEATURE_NORMS)
        self.feature_norm = feature_norm

    def forward(self, batch: DistillBatch) -> Tensor:
        return feature_imitation_loss(
            batch.tapped(NECK), batch.teacher.features, feature_norm=self.feature_norm
        )


@register_method("pkd")
class PearsonImitation(DistillMethod):
    r"""PKD: imitation of standardised features (Cao et al., NeurIPS 2022)::

        L = sum_l mean_c (1 - rho_{l,c}),   rho_{l,c} = Pearson correlation of
            channel c of phi_l(F^s_l) and F^t_l over (n, h, w)

    computed as the paper does: standardise every channel of both to zero mean
    and unit variance over N, H, W, then ``MSE / 2`` per level, summed over
    levels (``mean_c mean_{n,h,w} (s_hat - t_hat)^2 = 2 mean_c (1 - rho_c)``).
    It is :class:`FitNet` with ``feature_norm="channel"`` scaled by
    ``num_levels / 2``; the scale keeps PKD's published weights meaningful.
    No adapter is needed for the *scale* of the features, only for channels.
    """

    taps = (NECK,)

    def forward(self, batch: DistillBatch) -> Tensor:
        levels = len(batch.tapped(NECK))
        fitnet = feature_imitation_loss(
            batch.tapped(NECK), batch.teacher.features, feature_norm="channel"
        )
        return fitnet * (levels / 2)


@register_method("fgfi")
class FineGrainedImitation(DistillMethod):
    """Imitate only the locations of anchors near objects (Wang et al., CVPR 2019, psi = 0.5)."""

    taps = (NECK,)

    def __init__(self, psi: float = 0.5, feature_norm: FeatureNorm = "none"):
        super().__init__()
        if not 0 < psi < 1:  # 0 or 1 and above select no location: the term would be 0
            raise ValueError(f"fgfi psi must be in (0, 1), got {psi}")
        check_choice("fgfi", "feature_norm", feature_norm, FEATURE_NORMS)
        self.psi = psi
        self.feature_norm = feature_norm

    def forward(self, batch: DistillBatch) -> Tensor:
        masks = fgfi_masks(
            batch.student.anchors,
            batch.gt_boxes,
            batch.level_shapes,
            batch.student.num_anchors_per_location,
            self.psi,
        )
        return feature_imitation_loss(
            batch.tapped(NECK), batch.teacher.features, masks, feature_norm=self.feature_norm
        )


@register_method("defeat")
class DecoupledFeatures(DistillMethod):
    """Foreground and background imitated separately (Guo et al., CVPR 2021)."""

    taps = (NECK,)

    def __init__(
        self,
        foreground_weight: float = 1.0,
        background_weight: float = 1.0,
        feature_norm: FeatureNorm = "none",
    ):
        super().__init__()
        if foreground_weight < 0 or background_weight < 0:
            raise ValueError(
                f"defeat weights must be >= 0, got {foreground_weight}, {background_weight}"
            )
        check_choice("defeat", "feature_norm", feature_norm, FEATURE_NORMS)
        self.foreground_weight = foreground_weight
        self.background_weight = background_weight
        self.feature_norm = feature_norm

    def forward(self, batch: DistillBatch) -> Tensor:
        masks = box_center_masks(
            batch.student.anchors,
            batch.gt_boxes,
            batch.level_shapes,
            batch.student.num_anchors_per_location,
        )
        return decoupled_feature_loss(
            batch.tapped(NECK),
            batch.teacher.features,
            masks,
            self.foreground_weight,
            self.background_weight,
            feature_norm=self.feature_norm,
        )


@register_method("scorel2")
class ScoreWeightedImitation(DistillMethod):
    """Imitation weighted by the teacher's top class probability (Ultralytics' form)."""

    taps = (NECK,)

    def __init__(self, feature_norm: FeatureNorm = "none"):
        super().__init__()
        check_choice("scorel2", "feature_norm", feature_norm, FEATURE_NORMS)
        self.feature_norm = feature_norm

    def forward(self, batch: DistillBatch) -> Tensor:
        return score_weighted_imitation(
            batch.tapped(NECK),
            batch.teacher.features,
            batch.teacher.cls_logits,
            feature_norm=self.feature_norm,
        )
