"""Distillation methods by name: each maps a teacher/student batch to one loss.

The losses themselves are pure tensor functions; these small modules only pick
their arguments out of a :class:`DistillBatch`, so that a config can say
``methods: {rm: 4.0, pfi: 1.5}`` and get ``L = L_det + 4 L_RM + 1.5 L_PFI``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from detdistill.losses.feature_imitation import (
    decoupled_feature_loss,
    feature_imitation_loss,
    score_weighted_imitation,
)
from detdistill.losses.masks import box_center_masks, fgfi_masks
from detdistill.losses.normalize import FeatureNorm
from detdistill.losses.pfi import WeightNorm, pfi_loss
from detdistill.losses.rank_mimicking import rank_mimicking_loss
from detdistill.losses.soft_label import soft_label_kd_loss
from detdistill.models.output import flatten_levels


class Candidates(NamedTuple):
    """Candidate boxes of the ground-truth objects, one entry per (object, anchor) pair."""

    images: Tensor  # (P,) image index in the batch
    anchors: Tensor  # (P,) anchor index in the image's flat anchor order
    classes: Tensor  # (P,) the object's class
    instances: Tensor  # (P,) object id, unique over the batch


@dataclass(eq=False)
class DistillBatch:
    """What the methods may read for one batch; teacher tensors are detached.

    ``student_feats`` are already adapted to the teacher's channels.
    ``anchors``/``matched_idxs`` follow ``DetectorOutput``: per image, anchors
    ordered level-major then h, w, a; ``matched_idxs`` >= 0 names the assigned
    ground truth, negative values are background or ignored.
    """

    student_feats: list[Tensor]
    teacher_feats: list[Tensor]
    student_logits: list[Tensor]
    teacher_logits: list[Tensor]
    anchors: list[Tensor]
    gt_boxes: list[Tensor]
    gt_labels: list[Tensor]
    matched_idxs: list[Tensor]
    num_anchors: int
    num_classes: int
    student_quality: list[Tensor] | None = None
    teacher_quality: list[Tensor] | None = None

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        return [(x.shape[-2], x.shape[-1]) for x in self.student_logits]

    @cached_property
    def student_flat_logits(self) -> Tensor:
        return flatten_levels(self.student_logits, self.num_classes)

    @cached_property
    def teacher_flat_logits(self) -> Tensor:
        return flatten_levels(self.teacher_logits, self.num_classes)

    @cached_property
    def candidates(self) -> Candidates:
        """Each object's positive anchors, as the detector's own assigner chose them."""
        images, anchors, classes, instances = [], [], [], []
        offset = 0
        for n, (matched, labels) in enumerate(zip(self.matched_idxs, self.gt_labels, strict=True)):
            pos = torch.nonzero(matched >= 0).squeeze(1)
            gt_index = matched[pos]
            images.append(torch.full_like(pos, n))
            anchors.append(pos)
            classes.append(labels[gt_index].to(pos.dtype))
            instances.append(gt_index + offset)
            offset += labels.numel()
        return Candidates(*(torch.cat(x) for x in (images, anchors, classes, instances)))

    def top_iou_candidates(self, k: int) -> Candidates:
        """Each object's ``k`` anchors of highest IoU with its box (IoU > 0), over all levels.

        A bag as ATSS draws before thresholding: larger than the assigner's
        positives (3.8 per object for the ``digits`` student), and the same
        size for every object, so there is an order worth mimicking.
        """
        images, anchors, classes, instances = [], [], [], []
        offset = 0
        for n, (boxes, labels, image_anchors) in enumerate(
            zip(self.gt_boxes, self.gt_labels, self.anchors, strict=True)
        ):
            if boxes.numel() == 0:
                continue
            iou = box_iou(boxes.to(image_anchors.dtype), image_anchors)
            values, index = iou.topk(min(k, image_anchors.shape[0]), dim=1)
            gt_index, rank = torch.nonzero(values > 0, as_tuple=True)
            chosen = index[gt_index, rank]
            images.append(torch.full_like(chosen, n))
            anchors.append(chosen)
            classes.append(labels[gt_index].to(chosen.dtype))
            instances.append(gt_index + offset)
            offset += labels.numel()
        if not images:
            return self.candidates
        return Candidates(*(torch.cat(x) for x in (images, anchors, classes, instances)))


class DistillMethod(nn.Module):
    """A distillation term; subclasses implement ``forward(batch) -> scalar``.

    ``imitates`` says what the term compares: ``"features"`` (neck features;
    the head is never reached) or ``"outputs"`` (the head's predictions). An
    ``auto`` weight uses the target ratio of that kind
    (:data:`detdistill.auto_weights.DEFAULT_RATIOS`).
    """

    imitates: ClassVar[Literal["features", "outputs"]] = "features"

    def forward(self, batch: DistillBatch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


_REGISTRY: dict[str, type[DistillMethod]] = {}


def register_method(name: str) -> Callable[[type[DistillMethod]], type[DistillMethod]]:
    def add(cls: type[DistillMethod]) -> type[DistillMethod]:
        if name in _REGISTRY:
            raise ValueError(f"distillation method {name!r} is already registered")
        _REGISTRY[name] = cls
        return cls

    return add


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def build_method(name: str, **options: object) -> DistillMethod:
    """Instantiate a registered method; unknown names or options name the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown distillation method {name!r}; choose from {', '.join(list_methods())}"
        )
    cls = _REGISTRY[name]
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

    def _scores(
        self,
        flat_logits: Tensor,
        quality: list[Tensor] | None,
        candidates: Candidates,
    ) -> Tensor:
        images, anchors, classes = candidates.images, candidates.anchors, candidates.classes
        logits = flat_logits[images, anchors, classes]
        if self.score == "logit":
            return logits
        if self.score == "prob":
            return logits.sigmoid()
        if quality is None:
            raise ValueError(
                "rm score='quality' needs a detector head with a quality branch (FCOS, ATSS)"
            )
        quality_logits = flatten_levels(quality, 1)[images, anchors, 0]
        return F.logsigmoid(logits) + F.logsigmoid(quality_logits)

    def forward(self, batch: DistillBatch) -> Tensor:
        candidates = self._candidates(batch)
        student = self._scores(batch.student_flat_logits, batch.student_quality, candidates)
        teacher = self._scores(batch.teacher_flat_logits, batch.teacher_quality, candidates)
        return rank_mimicking_loss(student, teacher, candidates.instances, self.temperature)


@register_method("pfi")
class PredictionGuidedImitation(DistillMethod):
    """Prediction-guided Feature Imitation (Li et al., AAAI 2022); see :func:`pfi_loss`.

    ``weight_norm="mean", feature_norm="channel"`` is the scale-free form.
    """

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
            batch.student_feats,
            batch.teacher_feats,
            batch.student_logits,
            batch.teacher_logits,
            norm=self.norm,
            detach_weight=self.detach_weight,
            weight_norm=self.weight_norm,
            feature_norm=self.feature_norm,
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
            batch.student_flat_logits, batch.teacher_flat_logits, self.temperature
        )


@register_method("fitnet")
class FitNet(DistillMethod):
    """Imitate the whole feature map (Romero et al., ICLR 2015)."""

    def __init__(self, feature_norm: FeatureNorm = "none"):
        super().__init__()
        self.feature_norm = feature_norm

    def forward(self, batch: DistillBatch) -> Tensor:
        return feature_imitation_loss(
            batch.student_feats, batch.teacher_feats, feature_norm=self.feature_norm
        )


@register_method("fgfi")
class FineGrainedImitation(DistillMethod):
    """Imitate only the locations of anchors near objects (Wang et al., CVPR 2019, psi = 0.5)."""

    def __init__(self, psi: float = 0.5, feature_norm: FeatureNorm = "none"):
        super().__init__()
        self.psi = psi
        self.feature_norm = feature_norm

    def forward(self, batch: DistillBatch) -> Tensor:
        masks = fgfi_masks(
            batch.anchors, batch.gt_boxes, batch.level_shapes, batch.num_anchors, self.psi
        )
        return feature_imitation_loss(
            batch.student_feats, batch.teacher_feats, masks, feature_norm=self.feature_norm
        )


@register_method("defeat")
class DecoupledFeatures(DistillMethod):
    """Foreground and background imitated separately (Guo et al., CVPR 2021)."""

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
            batch.anchors, batch.gt_boxes, batch.level_shapes, batch.num_anchors
        )
        return decoupled_feature_loss(
            batch.student_feats,
            batch.teacher_feats,
            masks,
            self.foreground_weight,
            self.background_weight,
            feature_norm=self.feature_norm,
        )


@register_method("scorel2")
class ScoreWeightedImitation(DistillMethod):
    """Imitation weighted by the teacher's top class probability (Ultralytics' form)."""

    def __init__(self, feature_norm: FeatureNorm = "none"):
        super().__init__()
        self.feature_norm = feature_norm

    def forward(self, batch: DistillBatch) -> Tensor:
        return score_weighted_imitation(
            batch.student_feats,
            batch.teacher_feats,
            batch.teacher_logits,
            feature_norm=self.feature_norm,
        )
