r"""GFL: Generalized Focal Loss (Li et al., "Generalized Focal Loss: Learning Qualified and
Distributed Bounding Boxes for Dense Object Detection", NeurIPS 2020).

ATSS's anchors and assignment with a different head and loss:

* The classification branch predicts a *joint* class-and-quality score: its
  target at a positive anchor is the IoU of the predicted box with the ground
  truth, trained with the **quality focal loss** (over all anchors and
  classes, ``sigma = sigmoid(z)``, ``y`` the soft target)::

      QFL(z, y) = |y - sigma|^beta * BCE(z, y),   beta = 2

* Each side's distance to the anchor centre, in strides, is a **distribution**
  over the bins ``0..reg_max`` (``reg_max = 16``): ``4 (reg_max + 1)``
  regression channels per anchor. The box uses its expectation (the
  *integral*), ``d = sum_i i softmax(p)_i``. The **distribution focal loss**
  puts the mass on the two bins around the target ``y``::

      DFL(p, y) = -((y_r - y) log softmax(p)_{y_l} + (y - y_l) log softmax(p)_{y_r}),
      y_l = floor(y), y_r = y_l + 1

* Boxes get **GIoU**. GIoU and DFL are weighted per positive by the predicted
  score of its class (detached), ``w``; with ``N_pos`` positives::

      L_qfl = sum QFL / max(N_pos, 1)
      L_giou = 2 * sum w (1 - GIoU) / sum w
      L_dfl = 0.25 * sum_{sides} w DFL / (4 sum w)

  (the reference loss weights 1, 2 and 0.25).

Scores at inference are ``sigmoid(z)``; there is no centerness branch.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOSClassificationHead
from torchvision.ops import generalized_box_iou_loss

from .atss import ATSS
from .output import DetectorOutput
from .registry import register_detector

__all__ = [
    "GFL",
    "aligned_iou",
    "distribution_focal_loss",
    "integral_distances",
    "quality_focal_loss",
]


def quality_focal_loss(logits: Tensor, targets: Tensor, beta: float = 2.0) -> Tensor:
    """Elementwise ``|y - sigmoid(z)|^beta * BCE(z, y)`` for soft targets ``y`` in [0, 1]."""
    modulation = (logits.sigmoid() - targets).abs().pow(beta)
    return modulation * F.binary_cross_entropy_with_logits(logits, targets, reduction="none")


def aligned_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of each box with the box at the same row (``(n, 4)`` xyxy each) -> ``(n,)``."""
    top_left = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(dim=1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area1 + area2 - inter).clamp(min=1e-6)


def integral_distances(codes: Tensor, reg_max: int) -> Tensor:
    """``(n, 4 (reg_max + 1))`` logits -> ``(n, 4)`` expected distances in bins (strides)."""
    probs = codes.reshape(-1, 4, reg_max + 1).softmax(-1)
    bins = torch.arange(reg_max + 1, dtype=probs.dtype, device=probs.device)
    return probs @ bins


def distribution_focal_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """``(n, reg_max + 1)`` bin logits, ``(n,)`` targets in ``[0, reg_max)`` -> ``(n,)`` DFL."""
    left = targets.floor().long()
    log_probs = logits.log_softmax(-1)
    left_part = log_probs.gather(1, left[:, None])[:, 0] * (left + 1 - targets)
    right_part = log_probs.gather(1, (left + 1)[:, None])[:, 0] * (targets - left)
    return -(left_part + right_part)


class DistributionRegressionHead(nn.Module):
    """The regression tower and one conv giving 4 distributions over the bins per anchor."""

    def __init__(
        self, in_channels: int, num_anchors: int, num_convs: int, bins: int, norm_layer: Any
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(num_convs):  # torchvision's FCOS tower layout: conv, norm, ReLU
            layers += [nn.Conv2d(in_channels, in_channels, 3, padding=1), norm_layer(in_channels)]
            layers.append(nn.ReLU())
        self.conv = nn.Sequential(*layers)
        self.bbox_reg = nn.Conv2d(in_channels, num_anchors * 4 * bins, 3, padding=1)
        for module in [*self.conv, self.bbox_reg]:
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)


class GFLHead(nn.Module):
    """Classification tower (joint class-quality scores) and distribution regression."""

    def __init__(
        self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int, reg_max: int
    ) -> None:
        super().__init__()
        norm = partial(nn.GroupNorm, math.gcd(32, in_channels))
        self.classification_head = FCOSClassificationHead(
            in_channels, num_anchors, num_classes, num_convs, norm_layer=norm
        )
        self.regression_head = DistributionRegressionHead(
            in_channels, num_anchors, num_convs, reg_max + 1, norm
        )


@register_detector("gfl")
class GFL(ATSS):
    """GFL with a distillation interface (see :class:`OneStageDetector` and :class:`ATSS`).

    Args:
        reg_max: the largest distance bin, in strides (GFL: 16).
        beta: the quality focal loss exponent (GFL: 2).
        anchor settings, ``topk``, ``num_convs`` and the inference settings are
        ATSS's; one square anchor per location (GFL's distances are measured
        from its centre in units of its level's stride).
    """

    head_type = "gfl"
    has_quality = False  # its class score is the joint quality; no separate branch

    def __init__(
        self, num_classes: int, backbone: Any = "resnet50", *, reg_max: int = 16,
        beta: float = 2.0, **kwargs: Any,
    ) -> None:  # fmt: skip
        if reg_max < 1:
            raise ValueError(f"reg_max must be >= 1, got {reg_max}")
        self.reg_max = reg_max
        self.box_code_size = 4 * (reg_max + 1)
        self.beta = beta
        super().__init__(num_classes, backbone, **kwargs)
        if self.num_anchors_per_location != 1:
            raise ValueError("GFL uses one anchor per location: one scale, aspect ratio 1")
        scales = {
            sizes[0] / stride for sizes, stride in zip(self.anchor_sizes, self.strides, strict=True)
        }
        if len(scales) != 1:
            raise ValueError(
                f"GFL needs anchors of one size per stride on every level, got {scales}"
            )
        self.anchor_scale = scales.pop()

    def build_head(self, num_classes: int, num_convs: int) -> nn.Module:
        return GFLHead(
            self.out_channels, self.num_anchors_per_location, num_classes, num_convs, self.reg_max
        )

    def head_predict(self, cls_feature: Tensor, reg_feature: Tensor) -> tuple[Tensor, Tensor, None]:
        return (
            self.head.classification_head.cls_logits(cls_feature),
            self.head.regression_head.bbox_reg(reg_feature),
            None,
        )

    def _centres_and_strides(self, anchors: Tensor) -> tuple[Tensor, Tensor]:
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        strides = (anchors[:, 2] - anchors[:, 0]) / self.anchor_scale
        return centres, strides

    def decode_boxes(self, rel_codes: Tensor, anchors: Tensor) -> Tensor:
        """Expected distances (in strides) of each side from the anchor centre -> xyxy."""
        centres, strides = self._centres_and_strides(anchors)
        ltrb = integral_distances(rel_codes, self.reg_max) * strides[:, None]
        return torch.cat([centres - ltrb[:, :2], centres + ltrb[:, 2:]], dim=1)

    def class_scores(self, cls_logits: Tensor, quality: Tensor | None) -> Tensor:
        return torch.sigmoid(cls_logits)

    def compute_loss(
        self, output: DetectorOutput, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """QFL over every anchor, GIoU and DFL on the positives (module docstring)."""
        matched = output.matched_idxs  # set by forward_batch from assign()
        cls_logits = output.flat_cls_logits().float()  # (N, R, K)
        codes = output.flat_bbox_regression().float()  # (N, R, 4 (reg_max + 1))
        matched_all = torch.stack(matched)
        positive = matched_all >= 0
        num_positives = int(positive.sum())
        anchors = torch.stack(output.anchors)[positive].float()
        gt_boxes = torch.cat(
            [t["boxes"][m[p]] for t, m, p in zip(targets, matched, positive, strict=True)]
        ).float()
        gt_labels = torch.cat(
            [t["labels"][m[p]] for t, m, p in zip(targets, matched, positive, strict=True)]
        )
        pos_codes = codes[positive]
        pred_boxes = self.decode_boxes(pos_codes, anchors)
        soft = torch.zeros_like(cls_logits)
        if num_positives:
            iou = aligned_iou(pred_boxes.detach(), gt_boxes)
            soft[positive, gt_labels] = iou
        loss_qfl = quality_focal_loss(cls_logits, soft, self.beta).sum() / max(num_positives, 1)
        if not num_positives:  # keep the graph: an exact 0 with gradients
            zero = codes.sum() * 0.0
            return {"classification": loss_qfl, "bbox_regression": zero, "distribution": zero}
        weights = cls_logits[positive].detach().sigmoid().gather(1, gt_labels[:, None])[:, 0]
        weight_sum = weights.sum().clamp(min=1e-6)
        giou = generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none")
        centres, strides = self._centres_and_strides(anchors)
        target_ltrb = torch.cat([centres - gt_boxes[:, :2], gt_boxes[:, 2:] - centres], dim=1)
        target_bins = (target_ltrb / strides[:, None]).clamp(0, self.reg_max - 0.01)
        dfl = distribution_focal_loss(
            pos_codes.reshape(-1, self.reg_max + 1), target_bins.reshape(-1)
        ).reshape(-1, 4)
        return {
            "classification": loss_qfl,
            "bbox_regression": 2.0 * (weights * giou).sum() / weight_sum,
            "distribution": 0.25 * (weights[:, None] * dfl).sum() / (4 * weight_sum),
        }
