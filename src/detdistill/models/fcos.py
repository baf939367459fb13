"""FCOS (Tian et al., ICCV 2019) on torchvision's parts.

Head modules and the loss (focal + GIoU + centerness BCE) are torchvision's
``FCOSHead``. The assignment is torchvision's ``FCOS.compute_loss`` matching (centre
sampling, inside-box, per-level scale ranges, smallest-area tie break), copied here
because torchvision computes it inline in its loss and never returns it.

Points are stored as anchors: square boxes of side ``stride`` centred on each point
(torchvision's convention; the box side normalises the ltrb regression).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead

from .base import OneStageDetector
from .output import Assignment, DetectorOutput
from .registry import register_detector

__all__ = ["FCOS", "fcos_assign"]


def fcos_assign(
    anchors: Tensor,
    num_anchors_per_level: list[int],
    gt_boxes: Tensor,
    center_sampling_radius: float = 1.5,
) -> Tensor:
    """torchvision's FCOS matching for one image: ``(R,)`` gt index or ``-1``.

    A point is positive for a box when it lies inside the box, within
    ``radius * stride`` of its centre, and the box's largest ltrb distance falls in
    the level's range ``(4 * stride, 8 * stride)`` (open at the first and last
    level). Among several boxes the smallest one wins.
    """
    if gt_boxes.numel() == 0:
        return torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
    gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    anchor_sizes = anchors[:, 2] - anchors[:, 0]
    pairwise_match = (anchor_centers[:, None, :] - gt_centers[None, :, :]).abs_().max(
        dim=2
    ).values < center_sampling_radius * anchor_sizes[:, None]
    x, y = anchor_centers.unsqueeze(dim=2).unbind(dim=1)
    x0, y0, x1, y1 = gt_boxes.unsqueeze(dim=0).unbind(dim=2)
    pairwise_dist = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)
    pairwise_match &= pairwise_dist.min(dim=2).values > 0
    lower_bound = anchor_sizes * 4
    lower_bound[: num_anchors_per_level[0]] = 0
    upper_bound = anchor_sizes * 8
    upper_bound[-num_anchors_per_level[-1] :] = float("inf")
    max_dist = pairwise_dist.max(dim=2).values
    pairwise_match &= (max_dist > lower_bound[:, None]) & (max_dist < upper_bound[:, None])
    gt_areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    score = pairwise_match.to(torch.float32) * (1e8 - gt_areas[None, :])
    best, matched = score.max(dim=1)
    matched[best < 1e-5] = -1
    return matched


def centerness_head_predict(
    head: nn.Module, cls_feature: Tensor, reg_feature: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """torchvision's FCOS predictors (class logits, box regression, centerness) on one level."""
    reg_head = head.regression_head
    return (
        head.classification_head.cls_logits(cls_feature),
        reg_head.bbox_reg(reg_feature),
        reg_head.bbox_ctrness(reg_feature),
    )


@register_detector("fcos")
class FCOS(OneStageDetector):
    """FCOS with a distillation interface (see :class:`OneStageDetector`).

    Args:
        center_sampling_radius: in strides (torchvision: 1.5).
        num_convs: head tower depth (4).
        score_thresh, nms_thresh, detections_per_img, topk_candidates:
            torchvision's FCOS defaults (0.2, 0.6, 100, 1000); scores are
            ``sqrt(sigmoid(cls) * sigmoid(centerness))``.
    """

    head_type = "fcos"
    has_quality = True

    def __init__(
        self,
        num_classes: int,
        backbone: Any = "resnet50",
        *,
        center_sampling_radius: float = 1.5,
        num_convs: int = 4,
        score_thresh: float = 0.2,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_classes,
            backbone,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            topk_candidates=topk_candidates,
            **kwargs,
        )
        self._init_anchor_generator(tuple((s,) for s in self.strides), (1.0,))
        self.center_sampling_radius = center_sampling_radius
        # torchvision's FCOSHead (box coder + loss) with its sub-heads rebuilt so the
        # GroupNorm also fits necks whose width is not a multiple of 32.
        c, norm = self.out_channels, partial(nn.GroupNorm, math.gcd(32, self.out_channels))
        self.head = FCOSHead(c, 1, num_classes, num_convs=0)
        self.head.classification_head = FCOSClassificationHead(
            c, 1, num_classes, num_convs, norm_layer=norm
        )
        self.head.regression_head = FCOSRegressionHead(c, 1, num_convs, norm_layer=norm)

    def head_predict(
        self, cls_feature: Tensor, reg_feature: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        cls_logits, bbox_regression, quality = centerness_head_predict(
            self.head, cls_feature, reg_feature
        )
        return cls_logits, nn.functional.relu(bbox_regression), quality  # ltrb distances >= 0

    def assign(self, output: DetectorOutput, targets: list[dict[str, Tensor]]) -> Assignment:
        sizes = output.num_anchors_per_level()
        matched = [
            fcos_assign(anchors, sizes, t["boxes"], self.center_sampling_radius)
            for anchors, t in zip(output.anchors, targets, strict=True)
        ]
        return Assignment(matched, None)  # FCOS assigns by location, not by overlap

    def compute_loss(
        self, output: DetectorOutput, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """torchvision's ``FCOSHead.compute_loss`` (float32); ``bbox_ctrness`` renamed ``centerness``."""
        matched = output.matched_idxs  # set by forward_batch from assign()
        quality = output.flat_quality()
        assert quality is not None
        head_outputs = {
            "cls_logits": output.flat_cls_logits().float(),
            "bbox_regression": output.flat_bbox_regression().float(),
            "bbox_ctrness": quality.float().unsqueeze(-1),
        }
        losses = self.head.compute_loss(
            targets, head_outputs, [a.float() for a in output.anchors], matched
        )
        return {
            "classification": losses["classification"],
            "bbox_regression": losses["bbox_regression"],
            "centerness": losses["bbox_ctrness"],
        }

    def decode_boxes(self, rel_codes: Tensor, anchors: Tensor) -> Tensor:
        return self.head.box_coder.decode(rel_codes, anchors)

    def class_scores(self, cls_logits: Tensor, quality: Tensor | None) -> Tensor:
        assert quality is not None
        return torch.sqrt(torch.sigmoid(cls_logits) * torch.sigmoid(quality)[:, None])
