"""ATSS (Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free
Detection via Adaptive Training Sample Selection", CVPR 2020).

torchvision has no ATSS, so the assigner and the loss assembly are written here;
everything else is torchvision's: the towers are ``FCOSClassificationHead`` /
``FCOSRegressionHead`` (GroupNorm towers, centerness on the regression tower: the
ATSS head layout), boxes use ``BoxCoder`` deltas with mmdetection's ATSS weights
``(10, 10, 5, 5)``, and the losses are ``sigmoid_focal_loss``,
``generalized_box_iou_loss`` and centerness BCE, all normalised by the number of
positives (>= 1).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSRegressionHead
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from .assigners import atss_assign
from .base import OneStageDetector
from .fcos import centerness_head_predict
from .output import Assignment, DetectorOutput
from .registry import register_detector

__all__ = ["ATSS", "ATSSHead", "centerness_target"]


def centerness_target(anchors: Tensor, gt_boxes: Tensor) -> Tensor:
    """FCOS centerness of each anchor centre inside its matched box (pairs, ``(n,)``)."""
    cx = (anchors[:, 0] + anchors[:, 2]) / 2
    cy = (anchors[:, 1] + anchors[:, 3]) / 2
    lr = torch.stack((cx - gt_boxes[:, 0], gt_boxes[:, 2] - cx), dim=1)
    tb = torch.stack((cy - gt_boxes[:, 1], gt_boxes[:, 3] - cy), dim=1)
    ratio = (lr.amin(1) / lr.amax(1)).clamp(min=0) * (tb.amin(1) / tb.amax(1)).clamp(min=0)
    return ratio.sqrt()


class ATSSHead(nn.Module):
    """Classification and regression towers with a centerness branch, and the loss.

    The forward pass is :meth:`OneStageDetector.head_forward` (towers, then
    :meth:`ATSS.head_predict`), shared with the other detectors.
    """

    def __init__(
        self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4
    ) -> None:
        super().__init__()
        norm = partial(nn.GroupNorm, math.gcd(32, in_channels))
        self.classification_head = FCOSClassificationHead(
            in_channels, num_anchors, num_classes, num_convs, norm_layer=norm
        )
        self.regression_head = FCOSRegressionHead(
            in_channels, num_anchors, num_convs, norm_layer=norm
        )
        self.box_coder = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        cls_logits: Tensor,
        bbox_regression: Tensor,
        centerness: Tensor,
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        """Focal + GIoU + centerness BCE on flat ``(N, R, .)`` tensors."""
        matched = torch.stack(matched_idxs)
        foreground = matched >= 0
        valid = matched != det_utils.Matcher.BETWEEN_THRESHOLDS
        num_fg = max(1, int(foreground.sum()))
        gt_classes = torch.zeros_like(cls_logits)
        gt_boxes = []
        for i, t in enumerate(targets):
            idx = matched[i][foreground[i]]
            gt_classes[i, foreground[i], t["labels"][idx]] = 1.0
            gt_boxes.append(t["boxes"][idx].to(bbox_regression.dtype))
        gt_boxes_t = torch.cat(gt_boxes)
        pos_anchors = torch.stack(anchors)[foreground].to(bbox_regression.dtype)
        pred_boxes = self.box_coder.decode_single(bbox_regression[foreground], pos_anchors)
        loss_cls = sigmoid_focal_loss(cls_logits[valid], gt_classes[valid], reduction="sum")
        loss_box = generalized_box_iou_loss(pred_boxes, gt_boxes_t, reduction="sum")
        loss_ctr = nn.functional.binary_cross_entropy_with_logits(
            centerness[foreground], centerness_target(pos_anchors, gt_boxes_t), reduction="sum"
        )
        return {
            "classification": loss_cls / num_fg,
            "bbox_regression": loss_box / num_fg,
            "centerness": loss_ctr / num_fg,
        }


@register_detector("atss")
class ATSS(OneStageDetector):
    """ATSS with a distillation interface (see :class:`OneStageDetector`).

    Args:
        anchor_sizes: per-level sizes; default one square anchor of
            ``anchor_scale * stride`` (ATSS's 8 on COCO, scaled by
            :func:`default_anchor_scale` for other input sizes).
        aspect_ratios, scales_per_octave: anchors per location (ATSS: 1).
        topk: candidates per level and box (paper: 9).
        num_convs: head tower depth (4).
        score_thresh, nms_thresh, detections_per_img, topk_candidates: the ATSS
            reference test settings (0.05, 0.6, 100, 1000); scores are
            ``sqrt(sigmoid(cls) * sigmoid(centerness))``.
    """

    head_type = "atss"
    has_quality = True

    def __init__(
        self,
        num_classes: int,
        backbone: Any = "resnet50",
        *,
        anchor_sizes: tuple[tuple[int, ...], ...] | None = None,
        aspect_ratios: tuple[float, ...] = (1.0,),
        anchor_scale: float | None = None,
        scales_per_octave: int = 1,
        topk: int = 9,
        num_convs: int = 4,
        score_thresh: float = 0.05,
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
        self._init_octave_anchors(anchor_sizes, anchor_scale, 8.0, scales_per_octave, aspect_ratios)
        self.topk = topk
        self.head = self.build_head(num_classes, num_convs)

    def build_head(self, num_classes: int, num_convs: int) -> nn.Module:
        """The head module (towers, predictors, loss); GFL replaces it."""
        return ATSSHead(self.out_channels, self.num_anchors_per_location, num_classes, num_convs)

    def head_predict(
        self, cls_feature: Tensor, reg_feature: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        return centerness_head_predict(self.head, cls_feature, reg_feature)

    def assign(self, output: DetectorOutput, targets: list[dict[str, Tensor]]) -> Assignment:
        sizes = output.num_anchors_per_level()
        per_image = [
            atss_assign(a, sizes, t["boxes"].to(a.dtype), self.topk)
            for a, t in zip(output.anchors, targets, strict=True)
        ]
        return Assignment([m for m, _ in per_image], [iou for _, iou in per_image])

    def compute_loss(
        self, output: DetectorOutput, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        matched = output.matched_idxs  # set by forward_batch from assign()
        quality = output.flat_quality()
        assert quality is not None
        return self.head.compute_loss(
            targets,
            output.flat_cls_logits().float(),
            output.flat_bbox_regression().float(),
            quality.float(),
            [a.float() for a in output.anchors],
            matched,
        )

    def decode_boxes(self, rel_codes: Tensor, anchors: Tensor) -> Tensor:
        return self.head.box_coder.decode_single(rel_codes, anchors)

    def class_scores(self, cls_logits: Tensor, quality: Tensor | None) -> Tensor:
        assert quality is not None
        # Quality per anchor -> broadcast over the K classes of that anchor.
        return torch.sqrt(torch.sigmoid(cls_logits) * torch.sigmoid(quality)[:, None])
