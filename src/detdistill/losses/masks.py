"""Where-to-imitate masks built from anchors and ground-truth boxes (FGFI, DeFeat).

Anchors come per image as (R, 4) xyxy, ordered level-major, then h, w, anchor
(the order of ``DetectorOutput.anchors``); masks come back per FPN level as
(N, H_l, W_l) booleans, one entry per feature-map location.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou


def _per_level_locations(
    per_anchor: Tensor, level_shapes: Sequence[tuple[int, int]], num_anchors: int
) -> list[Tensor]:
    """(R,) per-anchor flags -> per level (H, W): a location is on if any of its anchors is."""
    sizes = [h * w * num_anchors for h, w in level_shapes]
    if sum(sizes) != per_anchor.numel():
        raise ValueError(
            f"{per_anchor.numel()} anchors do not match levels {list(level_shapes)} x "
            f"{num_anchors} anchors per location ({sum(sizes)})"
        )
    chunks = per_anchor.split(sizes)
    return [
        c.view(h, w, num_anchors).any(dim=-1)
        for c, (h, w) in zip(chunks, level_shapes, strict=True)
    ]


def _stack_images(per_image: list[list[Tensor]], num_levels: int) -> list[Tensor]:
    return [torch.stack([levels[i] for levels in per_image]) for i in range(num_levels)]


def fgfi_masks(
    anchors: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    level_shapes: Sequence[tuple[int, int]],
    num_anchors: int,
    psi: float = 0.5,
) -> list[Tensor]:
    """Fine-grained imitation mask of Wang et al., "Distilling Object Detectors with
    Fine-grained Feature Imitation", CVPR 2019.

    For every ground truth ``g`` the threshold is ``psi * max_r IoU(anchor_r, g)``;
    an anchor is on where its IoU with some ``g`` exceeds that ``g``'s threshold,
    and a location is on where any of its anchors is. The max runs over the
    anchors of all levels. Images without boxes get an all-off mask.
    """
    per_image = []
    for image_anchors, boxes in zip(anchors, gt_boxes, strict=True):
        if boxes.numel() == 0:
            flags = torch.zeros(
                image_anchors.shape[0], dtype=torch.bool, device=image_anchors.device
            )
        else:
            iou = box_iou(image_anchors, boxes.to(image_anchors.dtype))
            threshold = psi * iou.amax(dim=0, keepdim=True)
            flags = ((iou > threshold) & (threshold > 0)).any(dim=1)
        per_image.append(_per_level_locations(flags, level_shapes, num_anchors))
    return _stack_images(per_image, len(level_shapes))


def box_center_masks(
    anchors: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    level_shapes: Sequence[tuple[int, int]],
    num_anchors: int,
) -> list[Tensor]:
    """Foreground mask of DeFeat (Guo et al., CVPR 2021): locations whose anchor
    centre lies inside some ground-truth box, at every level."""
    per_image = []
    for image_anchors, boxes in zip(anchors, gt_boxes, strict=True):
        centers = (image_anchors[:, :2] + image_anchors[:, 2:]) / 2
        if boxes.numel() == 0:
            flags = torch.zeros(
                image_anchors.shape[0], dtype=torch.bool, device=image_anchors.device
            )
        else:
            boxes = boxes.to(centers.dtype)
            inside = (
                (centers[:, None, 0] >= boxes[None, :, 0])
                & (centers[:, None, 0] <= boxes[None, :, 2])
                & (centers[:, None, 1] >= boxes[None, :, 1])
                & (centers[:, None, 1] <= boxes[None, :, 3])
            )
            flags = inside.any(dim=1)
        per_image.append(_per_level_locations(flags, level_shapes, num_anchors))
    return _stack_images(per_image, len(level_shapes))
