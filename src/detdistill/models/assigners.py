"""Adaptive Training Sample Selection (Zhang et al., CVPR 2020): the assigner and its candidates.

Not inside the ATSS detector because more than the detector uses them: ATSS
assigns its positives with :func:`atss_assign`, and LD's *valuable
localisation region* reuses :func:`atss_candidates`' thresholds on any pair
with distribution bins (GFL, YOLO).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import boxes as box_ops

__all__ = ["atss_assign", "atss_candidates"]


def atss_candidates(
    anchors: Tensor, num_anchors_per_level: list[int], gt_boxes: Tensor, topk: int = 9
) -> tuple[Tensor, Tensor, Tensor]:
    """ATSS's candidates and thresholds for one image with ``M >= 1`` boxes.

    Returns ``ious`` ``(R, M)`` of every anchor with every box, ``candidates``
    ``(C, M)``: per box, the ``topk`` anchors of each level whose centres are
    closest to the box centre, and ``thresholds`` ``(M,)``: the mean plus the
    (unbiased, as the reference implementation) standard deviation of the
    candidates' IoUs. LD's valuable localisation region reuses the thresholds.
    """
    ious = box_ops.box_iou(anchors, gt_boxes)  # (R, M)
    anchor_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    gt_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    dist = (anchor_ctr[:, None, :] - gt_ctr[None, :, :]).pow(2).sum(-1).sqrt()  # (R, M)
    candidates, start = [], 0
    for n in num_anchors_per_level:
        k = min(topk, n)
        idx = dist[start : start + n].topk(k, dim=0, largest=False).indices  # (k, M)
        candidates.append(idx + start)
        start += n
    cand = torch.cat(candidates)  # (C, M)
    cand_ious = ious.gather(0, cand)
    std = cand_ious.std(0) if cand.shape[0] > 1 else torch.zeros_like(cand_ious[0])
    return ious, cand, cand_ious.mean(0) + std


def atss_assign(
    anchors: Tensor, num_anchors_per_level: list[int], gt_boxes: Tensor, topk: int = 9
) -> tuple[Tensor, Tensor]:
    """Adaptive Training Sample Selection for one image: ``(R,)`` gt index or ``-1``, and
    the ``(M, R)`` IoUs of boxes and anchors it computed on the way.

    Candidates and thresholds as :func:`atss_candidates`; candidates at or above
    their box's threshold whose centre lies inside the box are positive. An
    anchor positive for several boxes goes to the one it overlaps most.
    Vectorised over boxes and anchors; the only loop is over the (few) levels.
    """
    num_anchors = anchors.shape[0]
    if gt_boxes.numel() == 0:
        return (
            torch.full((num_anchors,), -1, dtype=torch.int64, device=anchors.device),
            anchors.new_zeros((0, num_anchors)),
        )
    num_gt = gt_boxes.shape[0]
    ious, cand, thresholds = atss_candidates(anchors, num_anchors_per_level, gt_boxes, topk)
    cand_ious = ious.gather(0, cand)
    is_pos = cand_ious >= thresholds[None]

    anchor_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    cx, cy = anchor_ctr[cand, 0], anchor_ctr[cand, 1]  # (C, M)
    inside = (
        torch.stack(
            (cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx, gt_boxes[:, 3] - cy),
            dim=0,
        ).amin(0)
        > 0.01
    )
    is_pos &= inside

    gt_idx = torch.arange(num_gt, device=anchors.device).expand_as(cand)
    overlaps = torch.full_like(ious, -math.inf)
    overlaps[cand[is_pos], gt_idx[is_pos]] = cand_ious[is_pos]
    best, matched = overlaps.max(dim=1)
    matched[best == -math.inf] = -1
    return matched, ious.T
