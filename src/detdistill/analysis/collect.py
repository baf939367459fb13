"""The passes over the data: run both detectors exactly as distillation does, keep what the analysis needs.

Batches go through :meth:`detdistill.distill.Distiller.run_pair`, as in
training: the student's transform builds the batch and the teacher runs on
that same tensor, so both networks see identical pixels and their anchors,
levels and locations correspond one to one.
Candidates are the anchors the *student's* assigner makes positive for each
ground truth (RM's candidates). The student runs in eval mode (BatchNorm statistics,
no dropout) but with targets, which is what makes its assigner run.

Scores are the detector's own ``class_scores`` (sigmoid, or sqrt(cls *
quality) for FCOS/ATSS) in float64: the score that orders boxes for NMS at
inference, hence the one behind the precision gap. Float64 keeps sigmoids of
large logits from rounding to equal values (false ties).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from detdistill.analysis.adapter import ChannelMapFitter
from detdistill.analysis.features import Adapter, feature_maps, prediction_maps, valid_grid
from detdistill.distill import Distiller
from detdistill.models.output import DetectorOutput

__all__ = ["Collected", "InstanceInfo", "ObjectCandidates", "VisualCase", "collect"]

TOP_K = 3


@dataclass
class InstanceInfo:
    """One ground-truth object of the analysed images; its position in the list is its id."""

    image_id: int
    index: int  # position among the image's (non-crowd) targets
    label: int
    area: float  # in original image pixels (COCO's ``area`` where the data set has it)
    num_candidates: int


@dataclass
class ObjectCandidates:
    """One object's ground truth and each network's top candidates (batch-tensor pixels).

    Objects the assigner gave no candidate keep empty (0, 4) boxes, so that
    figures can still show them.
    """

    gt_box: Tensor  # (4,)
    label: int
    teacher_boxes: Tensor  # (k, 4)
    teacher_scores: Tensor  # (k,)
    student_boxes: Tensor
    student_scores: Tensor

    @property
    def has_candidates(self) -> bool:
        return self.teacher_boxes.shape[0] > 0


@dataclass
class VisualCase:
    """An image kept for the figures: pixels as the models saw them, objects, D and P maps."""

    image_id: int
    position: int  # index among the analysed images
    image: Tensor  # (3, H, W) in [0, 1], valid region of the batch tensor
    objects: list[ObjectCandidates]


@dataclass
class Collected:
    """Everything the statistics and figures are computed from."""

    teacher_scores: list[Tensor] = field(default_factory=list)
    student_scores: list[Tensor] = field(default_factory=list)
    instance_ids: list[Tensor] = field(default_factory=list)
    instances: list[InstanceInfo] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    p_maps: list[list[Tensor]] = field(default_factory=list)  # [image][level]
    d_maps: list[list[Tensor]] = field(default_factory=list)
    visuals: list[VisualCase] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)  # "identity" or "least squares" per level

    def flat_scores(self) -> tuple[Tensor, Tensor, Tensor]:
        """(teacher, student, instance id) of every candidate, concatenated."""
        if not self.instance_ids:
            empty = torch.zeros(0, dtype=torch.float64)
            return empty, empty, torch.zeros(0, dtype=torch.int64)
        return (
            torch.cat(self.teacher_scores),
            torch.cat(self.student_scores),
            torch.cat(self.instance_ids),
        )


def _on_device(
    images: list[Tensor], targets: list[dict[str, Any]], device: torch.device
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """The images and the boxes and labels of their targets (the rest is metadata)."""
    plain = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
    return [im.to(device) for im in images], plain


@dataclass
class _Flat:
    """One detector's outputs in flat anchor order, built once per batch (not per object)."""

    logits: Tensor  # (N, R, K)
    quality: Tensor | None  # (N, R)
    regression: Tensor  # (N, R, B), the detector's box code
    anchors: list[Tensor]

    @classmethod
    def of(cls, output: DetectorOutput) -> _Flat:
        return cls(
            output.flat_cls_logits(),
            output.flat_quality(),
            output.flat_bbox_regression(),
            output.anchors,
        )


def _scores(model: nn.Module, flat: _Flat, image: int, anchors: Tensor) -> Tensor:
    """(n, K) float64 inference scores of some anchors of one image."""
    logits = flat.logits[image, anchors].double()
    q = None if flat.quality is None else flat.quality[image, anchors].double()
    return model.class_scores(logits, q)


def _top(
    model: nn.Module, flat: _Flat, image: int, anchors: Tensor, scores: Tensor
) -> tuple[Tensor, Tensor]:
    """The ``TOP_K`` best-scored candidates, decoded with the detector's own box coder."""
    k = min(TOP_K, scores.numel())
    best_scores, best = scores.topk(k)
    chosen = anchors[best]
    regression = flat.regression[image, chosen].float()
    boxes = model.decode_boxes(regression, flat.anchors[image][chosen].float())
    return boxes.cpu(), best_scores.float().cpu()


def _area_lookup(dataset: Any) -> dict[int, np.ndarray]:
    """image id -> COCO areas of its non-crowd objects, in target order (when the data set has records)."""
    records = getattr(dataset, "records", None) or []
    return {int(r.image_id): np.asarray(r.areas)[~np.asarray(r.crowd)] for r in records}


def _areas(
    target: dict[str, Any],
    boxes: Tensor,
    valid_size: tuple[int, int],
    lookup: dict[int, np.ndarray],
) -> np.ndarray:
    known = lookup.get(int(target.get("image_id", -1)))
    if known is not None and known.size == boxes.shape[0]:
        return known.astype(np.float64)
    # Fallback: box area rescaled from the batch tensor to the original image.
    orig_h, orig_w = target.get("orig_size", valid_size)
    scale = (orig_h * orig_w) / max(valid_size[0] * valid_size[1], 1)
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).double().cpu()
    return (wh[:, 0] * wh[:, 1] * scale).numpy()


def _unnormalise(model: nn.Module, tensor: Tensor, size: tuple[int, int]) -> Tensor:
    # A letterbox (YOLO) keeps pixels in [0, 1]: mean 0, std 1.
    mean = torch.tensor(getattr(model.transform, "image_mean", [0.0] * 3))[:, None, None]
    std = torch.tensor(getattr(model.transform, "image_std", [1.0] * 3))[:, None, None]
    h, w = size
    return (tensor[:, :h, :w].float().cpu() * std + mean).clamp(0, 1)


@torch.no_grad()
def collect(
    pair: Distiller,
    batches: Iterable[tuple[list[Tensor], list[dict[str, Any]]]],
    dataset: Any,
    device: torch.device,
    num_visualize: int,
) -> Collected:
    """Pass 1 (both detectors): candidates, scores, P maps, channel-map fit; pass 2 (backbones): D.

    ``batches`` must be re-iterable (a DataLoader): when the channel counts
    differ, D needs the least-squares channel map (see
    :mod:`detdistill.analysis.adapter`) fitted on *all* analysed images first,
    so a second, cheaper pass through the backbones computes it. With equal
    channels D is computed in the first pass with the identity.
    """
    pair.eval()
    teacher, student = pair.teacher, pair.student
    strides = list(student.strides)
    channels = list(zip(student.feature_channels, teacher.feature_channels, strict=True))
    same_channels = all(s == t for s, t in channels)
    fitters = [] if same_channels else [ChannelMapFitter(s, t) for s, t in channels]
    identity: list[Adapter] = [lambda x: x for _ in strides]
    lookup = _area_lookup(dataset)
    out = Collected(adapters=["identity" if same_channels else "least squares"] * len(strides))

    for images, targets in batches:
        batch = pair.run_pair(*_on_device(images, targets, device))
        s_out, t_out = batch.student, batch.teacher
        sizes = s_out.image_sizes
        out.p_maps += prediction_maps(s_out.cls_logits, t_out.cls_logits, sizes, strides)
        if same_channels:
            out.d_maps += feature_maps(s_out.features, t_out.features, identity, sizes, strides)
        else:
            _fit(fitters, s_out.features, t_out.features, sizes, strides)
        s_flat, t_flat = _Flat.of(s_out), _Flat.of(t_out)
        for i, target in enumerate(targets):
            objects = _collect_image(
                out,
                (teacher, t_flat),
                (student, s_flat),
                s_out.matched_idxs[i],
                target,
                (batch.gt_boxes[i], batch.gt_labels[i]),
                sizes[i],
                lookup,
                i,
            )
            if len(out.visuals) < num_visualize and any(o.has_candidates for o in objects):
                out.visuals.append(
                    VisualCase(
                        image_id=out.image_ids[-1],
                        position=len(out.image_ids) - 1,
                        image=_unnormalise(student, batch.images[i], sizes[i]),
                        objects=objects,
                    )
                )

    if not same_channels:
        maps: list[Adapter] = [fitter.solve() for fitter in fitters]
        for images, targets in batches:
            image_list, _ = student.transform(*_on_device(images, targets, device))
            f_s = student.neck_features(image_list.tensors)
            f_t = teacher.neck_features(image_list.tensors)
            out.d_maps += feature_maps(f_s, f_t, maps, image_list.image_sizes, strides)
    return out


def _fit(
    fitters: Sequence[ChannelMapFitter],
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
) -> None:
    """Add each image's valid locations to its level's normal equations."""
    for fitter, f_s, f_t, stride in zip(
        fitters, student_feats, teacher_feats, strides, strict=True
    ):
        for n, size in enumerate(sizes):
            gh, gw = valid_grid(size, stride)
            fitter.update(f_s[n : n + 1, :, :gh, :gw], f_t[n : n + 1, :, :gh, :gw])


def _collect_image(
    out: Collected,
    teacher: tuple[nn.Module, _Flat],
    student: tuple[nn.Module, _Flat],
    matched: Tensor,
    target: dict[str, Any],
    ground_truth: tuple[Tensor, Tensor],
    size: tuple[int, int],
    lookup: dict[int, np.ndarray],
    i: int,
) -> list[ObjectCandidates]:
    """Record every object of image ``i`` and its candidates' scores; return their top boxes."""
    image_id = int(target.get("image_id", len(out.image_ids)))
    out.image_ids.append(image_id)
    boxes, labels = ground_truth  # in the batch tensor's pixels
    areas = _areas(target, boxes, size, lookup)
    objects: list[ObjectCandidates] = []
    for j in range(labels.numel()):
        anchors = torch.nonzero(matched == j).squeeze(1)
        label = int(labels[j])
        instance_id = len(out.instances)
        out.instances.append(
            InstanceInfo(image_id, j, label, float(areas[j]), int(anchors.numel()))
        )
        if anchors.numel() == 0:  # drawn (as uncovered), not ranked
            none = torch.zeros(0, 4)
            gt = boxes[j].float().cpu()
            objects.append(ObjectCandidates(gt, label, none, none[:, 0], none, none[:, 0]))
            continue
        t_scores = _scores(*teacher, i, anchors)[:, label]
        s_scores = _scores(*student, i, anchors)[:, label]
        out.teacher_scores.append(t_scores.cpu())
        out.student_scores.append(s_scores.cpu())
        out.instance_ids.append(torch.full((anchors.numel(),), instance_id, dtype=torch.int64))
        t_boxes, t_best = _top(*teacher, i, anchors, t_scores)
        s_boxes, s_best = _top(*student, i, anchors, s_scores)
        objects.append(
            ObjectCandidates(boxes[j].float().cpu(), label, t_boxes, t_best, s_boxes, s_best)
        )
    return objects
