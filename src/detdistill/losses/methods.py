"""Distillation methods by name: each maps a teacher/student batch to one loss.

The losses themselves are pure tensor functions; these small modules only pick
their arguments out of a :class:`DistillBatch`, so that a config can say
``methods: {rm: 4.0, pfi: 1.5}`` and get ``L = L_det + 4 L_RM + 1.5 L_PFI``.
"""

from __future__ import annotations

import inspect
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detdistill.losses.batch import Candidates, DistillBatch, IncompatibleModelsError
from detdistill.losses.feature_imitation import (
    decoupled_feature_loss,
    feature_imitation_loss,
    score_weighted_imitation,
)
from detdistill.losses.localization import localization_distillation_loss
from detdistill.losses.masks import box_center_masks, fgfi_masks
from detdistill.losses.normalize import FeatureNorm
from detdistill.losses.pfi import WeightNorm, pfi_loss
from detdistill.losses.rank_mimicking import rank_mimicking_loss
from detdistill.losses.soft_label import soft_label_kd_loss
from detdistill.losses.taps import NECK, Tap
from detdistill.models.assigners import atss_candidates
from detdistill.models.output import DetectorOutput
from detdistill.registry import Registry


class DistillMethod(nn.Module):
    """A distillation term; subclasses implement ``forward(batch) -> scalar``.

    ``imitates`` says what the term compares: ``"features"`` (neck features;
    the head is never reached) or ``"outputs"`` (the head's predictions). An
    ``auto`` weight uses the target ratio of that kind
    (:data:`detdistill.distill.auto_weights.DEFAULT_RATIOS`).

    ``taps`` declares the student tensors the term reads beyond the two
    detectors' outputs (:mod:`detdistill.losses.taps`): ``(NECK,)`` for neck
    features adapted to the teacher's widths, read with
    ``batch.tapped(NECK)``. The Distiller builds adapters for exactly the
    declared taps; a method that declares none costs none.
    """

    imitates: ClassVar[Literal["features", "outputs"]] = "features"
    taps: tuple[Tap, ...] = ()

    def forward(self, batch: DistillBatch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        """Raise :class:`IncompatibleModelsError` if the pair lacks what the term reads.

        Called once by the Distiller; the default accepts every detector.
        """


METHODS: Registry[type[DistillMethod]] = Registry("distillation method")
register_method = METHODS.register
list_methods = METHODS.names


def build_method(name: str, **options: object) -> DistillMethod:
    """Instantiate a registered method; unknown names or options name the valid ones."""
    cls = METHODS.get(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"method {name!r} has no option(s) {', '.join(unknown)}; "
            f"options are: {', '.join(accepted) or 'none'}"
        )
    return cls(**options)


@register_method("rm")
class RankMimicking(DistillMethod):
    """Rank Mimicking over each ground truth's candidate boxes (Li et al., AAAI 2022).

    ``score``: "logit" (default, the paper), "prob" (sigmoid, as the MMRazor
    port), or "quality": classification and localisation quality together,
    ``log(sigmoid(z_cls) * sigmoid(z_quality))``, for heads with a quality branch.
    ``candidates``: "topk" (default: each object's ``topk`` anchors of highest
    IoU with its box, see :meth:`DistillBatch.top_iou_candidates`) or
    "positives" (the assigner's positive anchors, the paper's choice). On
    ``digits`` the assigner gives 3.8 positives per object, too few to rank:
    RM over them lost 0.4 mAP at the auto weight, over the top-16 bag it
    gained 1.6 (``docs/weights.md``).
    """

    imitates = "outputs"

    def __init__(
        self,
        temperature: float = 1.0,
        score: Literal["logit", "prob", "quality"] = "logit",
        candidates: Literal["positives", "topk"] = "topk",
        topk: int = 16,
    ):
        super().__init__()
        if score not in ("logit", "prob", "quality"):
            raise ValueError(f"rm score must be 'logit', 'prob' or 'quality', got {score!r}")
        if candidates not in ("positives", "topk"):
            raise ValueError(f"rm candidates must be 'positives' or 'topk', got {candidates!r}")
        if topk < 2:
            raise ValueError(f"rm topk must be >= 2 (one candidate has no order), got {topk}")
        if temperature <= 0:
            raise ValueError(f"rm temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.score = score
        self.candidates = candidates
        self.topk = topk

    def _candidates(self, batch: DistillBatch) -> Candidates:
        if self.candidates == "topk":
            return batch.top_iou_candidates(self.topk)
        return batch.candidates

    def _scores(self, output: DetectorOutput, candidates: Candidates) -> Tensor:
        images, anchors, classes = candidates.images, candidates.anchors, candidates.classes
        logits = output.flat_cls_logits()[images, anchors, classes]
        if self.score == "logit":
            return logits
        if self.score == "prob":
            return logits.sigmoid()
        quality = output.flat_quality()
        if quality is None:
            raise ValueError(
                "rm score='quality' needs a detector head with a quality branch (FCOS, ATSS)"
            )
        quality_logits = quality[images, anchors]
        return F.logsigmoid(logits) + F.logsigmoid(quality_logits)

    def forward(self, batch: DistillBatch) -> Tensor:
        candidates = self._candidates(batch)
        student = self._scores(batch.student, candidates)
        teacher = self._scores(batch.teacher, candidates)
        return rank_mimicking_loss(student, teacher, candidates.instances, self.temperature)


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
        if region not in ("vlr", "positives"):
            raise ValueError(f"ld region must be 'vlr' or 'positives', got {region!r}")
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


@register_method("kd")
class SoftLabelKD(DistillMethod):
    """Soft-label distillation over every anchor's class probabilities (Hinton et al., 2015)."""

    imitates = "outputs"

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, batch: DistillBatch) -> Tensor:
        return soft_label_kd_loss(
            batch.student.flat_cls_logits(), batch.teacher.flat_cls_logits(), self.temperature
        )


@register_method("fitnet")
class FitNet(DistillMethod):
    """Imitate the whole feature map (Romero et al., ICLR 2015)."""

    taps = (NECK,)

    def __init__(self, feature_norm: FeatureNorm = "none"):
        super().__init__()
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
        self.feature_norm = feature_norm

    def forward(self, batch: DistillBatch) -> Tensor:
        return score_weighted_imitation(
            batch.tapped(NECK),
            batch.teacher.features,
            batch.teacher.cls_logits,
            feature_norm=self.feature_norm,
        )
