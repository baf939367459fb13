"""One-stage detectors (RetinaNet, FCOS, ATSS, GFL) with a distillation interface.

Every detector returns a :class:`DetectorOutput` from ``forward_batch``; see
:mod:`detdistill.models.output` for the exact layout distillation code relies on.
"""

from .atss import ATSS
from .backbones import BackboneFPN, build_backbone, list_backbones
from .base import OneStageDetector
from .fcos import FCOS
from .gfl import GFL
from .output import DetectorOutput
from .registry import build_detector, list_detectors, register_detector
from .retinanet import RetinaNet
from .yolo import YOLODetector

__all__ = [
    "ATSS",
    "FCOS",
    "GFL",
    "BackboneFPN",
    "DetectorOutput",
    "OneStageDetector",
    "RetinaNet",
    "YOLODetector",
    "build_backbone",
    "build_detector",
    "list_backbones",
    "list_detectors",
    "register_detector",
]
