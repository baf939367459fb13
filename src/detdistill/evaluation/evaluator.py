"""Run a detector over a loader and score it with COCOeval, on one process or many.

Why here and not in the training loop: the conversions between what a model
sees (resized images, contiguous labels, xyxy) and what COCO expects
(original pixels, category ids, xywh) are where silent evaluation bugs live,
so they are done once, tested, and shared by train, distill and eval.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Subset
from tqdm import tqdm

from detdistill.evaluation.coco_eval import GroundTruth, evaluate_detections

logger = logging.getLogger("detdistill.evaluation")


def _base_dataset(dataset: Any) -> Any:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def ground_truth_of(dataset: Any) -> GroundTruth:
    """The evaluation ground truth of a data set: its in-memory COCO dict, else its COCO file."""
    dataset = _base_dataset(dataset)
    gt = getattr(dataset, "coco_ground_truth", None)
    if gt is not None:
        return gt
    path = getattr(dataset, "coco_annotation_file", None)
    if path is not None:
        return path
    raise TypeError(
        f"{type(dataset).__name__} exposes neither 'coco_ground_truth' nor 'coco_annotation_file'"
    )


def coco_detections(
    image_id: int, boxes: Tensor, category_ids: Sequence[int], scores: Tensor
) -> list[dict[str, Any]]:
    """One image's detections as COCO results: ``bbox`` in xywh pixels (3 decimals), ``score``.

    ``boxes`` are ``(N, 4)`` xyxy in the original image's pixels. The one
    conversion ``eval``'s results and ``predict``'s ``results.json`` share.
    """
    boxes = boxes.detach().float().cpu().reshape(-1, 4)
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    return [
        {
            "image_id": image_id,
            "category_id": int(c),
            "bbox": [round(v, 3) for v in b],
            "score": float(s),
        }
        for b, c, s in zip(xywh.tolist(), category_ids, scores.tolist(), strict=True)
    ]


def to_coco_results(
    outputs: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Any]],
    category_ids: Sequence[int],
) -> list[tuple[int, list[dict[str, Any]]]]:
    """Model outputs to COCO results, per image: ``[(image_id, [result, ...]), ...]``.

    Boxes are scaled from the model's input (``target["size"]``) back to the
    original image (``target["orig_size"]``), clipped to it and turned into
    xywh; contiguous labels become category ids. Non-finite boxes or scores
    are dropped with a warning (a diverged model, not a reason to crash).
    """
    results = []
    for out, target in zip(outputs, targets, strict=True):
        boxes = out["boxes"].detach().float().cpu().reshape(-1, 4)
        scores = out["scores"].detach().float().cpu().reshape(-1)
        labels = out["labels"].detach().cpu().reshape(-1).long()
        if len(labels) and (labels.min() < 0 or labels.max() >= len(category_ids)):
            raise ValueError(
                f"model returned labels outside [0, {len(category_ids)}): {labels.unique().tolist()}"
            )
        finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        if not bool(finite.all()):
            logger.warning(
                "image %s: dropped %d non-finite detections",
                target["image_id"],
                int((~finite).sum()),
            )
            boxes, scores, labels = boxes[finite], scores[finite], labels[finite]
        (oh, ow), (h, w) = target["orig_size"], target["size"]
        boxes = boxes * torch.tensor([ow / w, oh / h, ow / w, oh / h])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, ow)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, oh)
        cats = torch.tensor(list(category_ids), dtype=torch.long)[labels]
        image_id = int(target["image_id"])
        results.append((image_id, coco_detections(image_id, boxes, cats.tolist(), scores)))
    return results


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _merge(parts: Iterable[list[tuple[int, list[dict]]]]) -> tuple[list[int], list[dict]]:
    """Merge per-rank results, keeping each image once (DistributedSampler pads with repeats)."""
    seen: dict[int, list[dict]] = {}
    for part in parts:
        for image_id, dets in part:
            seen.setdefault(image_id, dets)
    image_ids = sorted(seen)
    return image_ids, [d for i in image_ids for d in seen[i]]


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    dataset: Any,
    device: str | torch.device = "cpu",
    verbose: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """COCO metrics of ``model`` on ``loader``: the six APs, ``per_class``, counts.

    The model runs in eval mode under ``torch.inference_mode`` (its previous
    train/eval mode is restored afterwards) on ``list[Tensor]`` images and must
    return ``list[dict(boxes, scores, labels)]`` in the input images'
    coordinates. ``dataset`` supplies ``category_ids`` and the ground truth
    (``coco_ground_truth`` or ``coco_annotation_file``; a ``Subset`` is
    unwrapped). Only the images the loader yielded are evaluated (reported as
    ``num_images``), so a subset or a skipped unreadable file does not count
    as missed objects.

    Distributed (``torch.distributed`` initialised): every rank evaluates its
    shard, results are collected with ``all_gather_object`` and deduplicated by
    image id, rank 0 runs COCOeval, and the resulting dict is broadcast so that
    every rank returns the same value. Progress is shown on rank 0 only (and
    only on a terminal).
    """
    base = _base_dataset(dataset)
    category_ids = list(base.category_ids)
    rank, world = _rank_and_world()
    was_training = model.training
    model.eval()
    local: list[tuple[int, list[dict]]] = []
    try:
        bar = tqdm(
            loader, desc="eval", unit="batch", disable=True if (rank != 0 or not progress) else None
        )
        for images, targets in bar:
            outputs = model([img.to(device, non_blocking=True) for img in images])
            local.extend(to_coco_results(outputs, targets, category_ids))
    finally:
        model.train(was_training)

    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, local)
        parts = gathered
    else:
        parts = [local]
    result: list[Any] = [None]
    if rank == 0:
        image_ids, detections = _merge(parts)
        gt = ground_truth_of(dataset)
        metrics = evaluate_detections(gt, detections, image_ids=image_ids, verbose=verbose)
        metrics["num_images"] = len(image_ids)
        metrics["num_detections"] = len(detections)
        result[0] = metrics
        logger.info(
            "eval: mAP %.4f AP50 %.4f on %d images, %d detections",
            metrics["mAP"], metrics["AP50"], len(image_ids), len(detections),
        )  # fmt: skip
        if math.isnan(metrics["mAP"]):
            logger.warning(
                "eval: the %d evaluated images have no ground-truth box: mAP is undefined "
                "(written as null)", len(image_ids),
            )  # fmt: skip
    if world > 1:
        torch.distributed.broadcast_object_list(result, src=0)
    return result[0]
