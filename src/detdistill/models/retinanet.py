"""RetinaNet (Lin et al., ICCV 2017) on torchvision's parts.

Head modules, loss (focal + L1 / smooth-L1 / GIoU) and the IoU ``Matcher`` are
torchvision's own; only the per-level forward is written here, because torchvision's
head flattens the levels together while distillation needs them apart. The module
tree (``backbone.body``, ``backbone.fpn``, ``head.classification_head``, ...)
matches ``torchvision.models.detection.retinanet_resnet50_fpn``, so its state
dicts load into ``RetinaNet(backbone="resnet50", levels=(3, 4, 5, 6, 7))``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import boxes as box_ops

from .base import OneStageDetector
from .output import Assignment, DetectorOutput
from .registry import register_detector

__all__ = ["RetinaNet"]


@register_detector("retinanet")
class RetinaNet(OneStageDetector):
    """RetinaNet with a distillation interface (see :class:`OneStageDetector`).

    Args:
        anchor_sizes: per-level anchor sizes; default ``octave_anchor_sizes`` with
            ``anchor_scale`` (default from :func:`default_anchor_scale`, 4 on COCO)
            and ``scales_per_octave`` (3).
        aspect_ratios: height/width ratios per location.
        fg_iou_thresh, bg_iou_thresh: ``Matcher`` thresholds; IoUs in between are
            ignored (``-2``); low-quality matches are kept as torchvision does.
        bbox_loss: ``"l1"`` (torchvision default), ``"smooth_l1"`` or ``"giou"``.
        num_convs: depth of both head towers (torchvision: 4).
        head_norm: ``None`` (original RetinaNet) or ``"gn"`` (torchvision's v2 head).
        score_thresh, nms_thresh, detections_per_img, topk_candidates:
            torchvision's RetinaNet defaults (0.05, 0.5, 300, 1000).
    """

    head_type = "retinanet"

    def __init__(
        self,
        num_classes: int,
        backbone: Any = "resnet50",
        *,
        anchor_sizes: tuple[tuple[int, ...], ...] | None = None,
        aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        anchor_scale: float | None = None,
        scales_per_octave: int = 3,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.4,
        bbox_loss: str = "l1",
        num_convs: int = 4,
        head_norm: str | None = None,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 300,
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
        self._init_octave_anchors(anchor_sizes, anchor_scale, 4.0, scales_per_octave, aspect_ratios)
        if bbox_loss not in ("l1", "smooth_l1", "giou"):
            raise ValueError(f"bbox_loss must be 'l1', 'smooth_l1' or 'giou', got {bbox_loss!r}")
        if head_norm not in (None, "gn"):
            raise ValueError(f"head_norm must be None or 'gn', got {head_norm!r}")
        norm = partial(nn.GroupNorm, math.gcd(32, self.out_channels)) if head_norm == "gn" else None
        self.head = RetinaNetHead(
            self.out_channels, self.num_anchors_per_location, num_classes, norm_layer=norm
        )
        if not 1 <= num_convs <= 4:
            raise ValueError(
                f"num_convs must be in 1..4 (torchvision's tower has 4), got {num_convs}"
            )
        if num_convs != 4:  # keep the first convs of torchvision's fixed 4-conv towers
            for sub in (self.head.classification_head, self.head.regression_head):
                sub.conv = sub.conv[:num_convs]
        self.head.regression_head._loss_type = (
            bbox_loss  # torchvision's own switch (see its v2 builder)
        )
        self.proposal_matcher = det_utils.Matcher(
            fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True
        )

    def head_predict(self, cls_feature: Tensor, reg_feature: Tensor) -> tuple[Tensor, Tensor, None]:
        head = self.head
        return (
            head.classification_head.cls_logits(cls_feature),
            head.regression_head.bbox_reg(reg_feature),
            None,
        )

    def assign(self, output: DetectorOutput, targets: list[dict[str, Tensor]]) -> Assignment:
        """IoU matching, torchvision's ``RetinaNet.compute_loss`` assignment."""
        matched, ious = [], []
        for anchors, target in zip(output.anchors, targets, strict=True):
            iou = box_ops.box_iou(target["boxes"].to(anchors.dtype), anchors)  # (M, R)
            ious.append(iou)
            if target["boxes"].numel() == 0:
                matched.append(
                    torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
                )
                continue
            matched.append(self.proposal_matcher(iou))
        return Assignment(matched, ious)

    def compute_loss(
        self, output: DetectorOutput, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """torchvision's ``RetinaNetHead.compute_loss`` on the flattened outputs (float32)."""
        matched = output.matched_idxs  # set by forward_batch from assign()
        head_outputs = {
            "cls_logits": output.flat_cls_logits().float(),
            "bbox_regression": output.flat_bbox_regression().float(),
        }
        anchors = [a.float() for a in output.anchors]
        return self.head.compute_loss(targets, head_outputs, anchors, matched)

    def decode_boxes(self, rel_codes: Tensor, anchors: Tensor) -> Tensor:
        return self.head.regression_head.box_coder.decode_single(rel_codes, anchors)
