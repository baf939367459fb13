"""Detection data: COCO, VOC and YOLO loaders, transforms, batching and the embedded data sets.

Samples follow one convention (see :class:`DetectionDataset`): a float32 RGB
image in [0, 1] and a target with ``boxes`` (xyxy, pixels of the returned
image), contiguous ``labels``, ``image_id``, ``orig_size`` and ``size``.
"""

from detdistill.data.base import DetectionDataset, ImageRecord
from detdistill.data.classes import VOC_CLASSES, check_class_names, resolve_class_names
from detdistill.data.coco import CocoDetection
from detdistill.data.embedded import (
    EMBEDDED_DATASETS,
    embedded_dir,
    make_embedded,
    register_embedded,
)
from detdistill.data.errors import (
    AnnotationFormatError,
    ClassMismatchError,
    DataError,
    ImageReadError,
)
from detdistill.data.loader import batch_to_device, collate_fn
from detdistill.data.problems import PROBLEM_KINDS, DataProblems
from detdistill.data.transforms import build_transforms
from detdistill.data.voc import VOCDetection, parse_voc_xml
from detdistill.data.yolo import YoloDetection, load_data_yaml, write_yolo

__all__ = [
    "EMBEDDED_DATASETS",
    "PROBLEM_KINDS",
    "VOC_CLASSES",
    "AnnotationFormatError",
    "ClassMismatchError",
    "CocoDetection",
    "DataError",
    "DataProblems",
    "DetectionDataset",
    "ImageReadError",
    "ImageRecord",
    "VOCDetection",
    "YoloDetection",
    "batch_to_device",
    "build_transforms",
    "check_class_names",
    "collate_fn",
    "embedded_dir",
    "load_data_yaml",
    "make_embedded",
    "parse_voc_xml",
    "register_embedded",
    "resolve_class_names",
    "write_yolo",
]
