"""COCO-style evaluation: metrics from pycocotools and a (distributed) model evaluator."""

from detdistill.evaluation.coco_eval import (
    METRIC_KEYS,
    coco_metrics,
    evaluate_detections,
    load_ground_truth,
    metrics_from_eval,
    per_class_ap,
    per_class_from_eval,
    run_coco_eval,
)
from detdistill.evaluation.evaluator import (
    coco_detections,
    evaluate,
    ground_truth_of,
    to_coco_results,
)

__all__ = [
    "METRIC_KEYS",
    "coco_detections",
    "coco_metrics",
    "evaluate",
    "evaluate_detections",
    "ground_truth_of",
    "load_ground_truth",
    "metrics_from_eval",
    "per_class_ap",
    "per_class_from_eval",
    "run_coco_eval",
    "to_coco_results",
]
