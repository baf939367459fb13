"""COCO box metrics from pycocotools' COCOeval: never a hand-written AP.

Why a wrapper: COCOeval prints, crashes on an empty result list, mutates the
dicts it is given and ignores detections of unknown categories silently. Here
printing is optional, no detections give zeros, inputs are copied, and
detections that cannot belong to the ground truth are a ``ValueError``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detdistill.data.coco import load_json

GroundTruth = str | Path | dict | COCO
METRIC_KEYS: tuple[str, ...] = ("mAP", "AP50", "AP75", "APs", "APm", "APl")


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Swallow pycocotools' prints unless ``verbose``."""
    if verbose:
        yield
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def load_ground_truth(ground_truth: GroundTruth, verbose: bool = False) -> COCO:
    """A ``COCO`` object from a file, a dict (deep-copied) or a ``COCO`` (used as is).

    Annotations lacking ``iscrowd`` get 0 and lacking ``area`` get the box area,
    which COCOeval needs and some hand-made files omit.
    """
    if isinstance(ground_truth, COCO):
        return ground_truth
    if isinstance(ground_truth, (str, Path)):
        data = load_json(ground_truth)
    elif isinstance(ground_truth, dict):
        data = copy.deepcopy(ground_truth)
    else:
        raise TypeError(
            f"ground truth must be a path, a COCO dict or a COCO object, got {type(ground_truth)}"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"COCO ground truth needs a '{key}' list")
    for ann in data["annotations"]:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    coco = COCO()
    coco.dataset = data
    with _quiet(verbose):
        coco.createIndex()
    return coco


def _check_detections(gt: COCO, detections: Iterable[dict]) -> list[dict]:
    """Copies of ``detections`` after checking their fields and ids against ``gt``."""
    out = []
    for i, det in enumerate(detections):
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in det]
        if missing:
            raise ValueError(f"detection {i} lacks {missing}: {det}")
        if len(det["bbox"]) != 4:
            raise ValueError(f"detection {i}: bbox must be [x, y, w, h], got {det['bbox']}")
        out.append(dict(det))
    unknown_images = sorted({d["image_id"] for d in out} - set(gt.getImgIds()))
    if unknown_images:
        raise ValueError(
            f"detections refer to image ids not in the ground truth: {unknown_images[:10]}"
        )
    unknown_cats = sorted({d["category_id"] for d in out} - set(gt.getCatIds()))
    if unknown_cats:
        raise ValueError(
            f"detections refer to category ids not in the ground truth: {unknown_cats[:10]} "
            f"(known: {sorted(gt.getCatIds())[:20]}); are labels mapped to category ids?"
        )
    return out


def run_coco_eval(
    ground_truth: GroundTruth,
    detections: Iterable[dict],
    image_ids: Iterable[int] | None = None,
    verbose: bool = False,
) -> COCOeval:
    """Evaluate, accumulate and summarise boxes; return the ``COCOeval``.

    ``detections`` are COCO results (``image_id``, ``category_id``, ``bbox``
    xywh in original image pixels, ``score``). ``image_ids`` restricts the
    evaluation to those images (the ones actually seen, e.g. after skipping an
    unreadable file); by default every ground-truth image counts. With no
    detections an empty result set is evaluated, which gives 0 wherever there
    is ground truth (pycocotools itself would crash on an empty list).
    """
    gt = load_ground_truth(ground_truth, verbose)
    dets = _check_detections(gt, detections)
    with _quiet(verbose):
        if dets:
            dt = gt.loadRes(dets)
        else:
            dt = COCO()
            dt.dataset = {"images": list(gt.dataset["images"]),
                          "categories": copy.deepcopy(gt.dataset["categories"]), "annotations": []}  # fmt: skip
            dt.createIndex()
        evaluator = COCOeval(gt, dt, iouType="bbox")
        if image_ids is not None:
            ids = sorted(set(image_ids))
            unknown = sorted(set(ids) - set(gt.getImgIds()))
            if unknown:
                raise ValueError(f"image_ids not in the ground truth: {unknown[:10]}")
            evaluator.params.imgIds = ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def metrics_from_eval(evaluator: COCOeval) -> dict[str, float]:
    """The six AP numbers, ``stats[0..5]`` of a summarised ``COCOeval``, as floats.

    Fractions in [0, 1]; NaN where the ground truth has no object of that kind
    (e.g. ``APl`` with no large object: pycocotools' -1), since the AP is
    undefined there, not negative: averages skip it, strict JSON writes ``null``.
    """
    return {
        key: math.nan if evaluator.stats[i] < 0 else float(evaluator.stats[i])
        for i, key in enumerate(METRIC_KEYS)
    }


def per_class_from_eval(evaluator: COCOeval) -> dict[str, float]:
    """AP@[.5:.95] per class name (all areas, 100 detections), from ``eval['precision']``.

    ``precision`` has shape (IoU, recall, class, area, maxDets); entries of -1
    (no ground truth) are excluded as COCOeval does; a class without ground
    truth in the evaluated images gets NaN.
    """
    precision = evaluator.eval["precision"]
    out: dict[str, float] = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        name = evaluator.cocoGt.cats[cat_id]["name"]
        out[name] = float(np.mean(p)) if p.size else math.nan
    return out


def coco_metrics(
    ground_truth: GroundTruth,
    detections: list[dict],
    image_ids: Iterable[int] | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """``{"mAP", "AP50", "AP75", "APs", "APm", "APl"}`` as COCOeval's ``stats[0..5]``.

    With no detections every metric with ground truth is 0.0 (no crash); NaN
    marks a size range without ground truth (pycocotools' -1). ``verbose``
    lets pycocotools print its usual table. See :func:`run_coco_eval`.
    """
    return metrics_from_eval(run_coco_eval(ground_truth, detections, image_ids, verbose))


def per_class_ap(
    ground_truth: GroundTruth,
    detections: list[dict],
    image_ids: Iterable[int] | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """Class name -> AP@[.5:.95] (see :func:`per_class_from_eval`)."""
    return per_class_from_eval(run_coco_eval(ground_truth, detections, image_ids, verbose))


def evaluate_detections(
    ground_truth: GroundTruth,
    detections: list[dict],
    image_ids: Iterable[int] | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Both of the above from one COCOeval run: the metrics plus ``"per_class"``."""
    evaluator = run_coco_eval(ground_truth, detections, image_ids, verbose)
    return {**metrics_from_eval(evaluator), "per_class": per_class_from_eval(evaluator)}
