"""The detection data set both loaders share: records in memory, samples on demand.

Why a shared base: COCO and VOC differ only in how annotations are parsed. Once
parsed into :class:`ImageRecord` s, decoding, transforms, problem counting,
the sample format and the COCO ground truth for evaluation are the same code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from detdistill.data.errors import DataError, ImageReadError
from detdistill.data.image_io import read_image
from detdistill.data.problems import DataProblems

logger = logging.getLogger("detdistill.data")

Target = dict[str, Any]
Transforms = Callable[[Any, Target], tuple[Any, Target]]


@dataclass
class ImageRecord:
    """One image and its (already sanitised) annotations.

    ``boxes`` are xyxy in the stored image's pixels; ``crowd`` marks COCO crowd
    regions and VOC difficult objects, which are left out of training targets
    and kept as ignore regions (``iscrowd=1``) in the evaluation ground truth.
    ``areas`` are COCO's ``area`` (box area when the file has none).
    """

    image_id: int
    path: Path
    file_name: str
    height: int
    width: int
    boxes: np.ndarray  # (M, 4) float32
    labels: np.ndarray  # (M,) int64, contiguous
    crowd: np.ndarray  # (M,) bool
    areas: np.ndarray  # (M,) float64


class DetectionDataset(Dataset):
    """Samples ``(image, target)`` per the project conventions.

    ``image`` is a float32 CxHxW RGB tensor in [0, 1] (ImageNet normalisation is
    the model's job). ``target`` has ``boxes`` float32 (M, 4) xyxy in the
    returned image's pixels, ``labels`` int64 (M,) contiguous in [0, K),
    ``image_id`` (COCO id), ``orig_size`` (H, W) on disk, ``size`` (H, W)
    after transforms. Images without objects are kept (M = 0).

    Unreadable images (``on_bad_image="skip"``, the default) are logged once
    per file, counted in :attr:`problems` and replaced by the next readable
    index, so a long run survives one bad file; the evaluator deduplicates
    image ids and evaluates only the images it saw. ``on_bad_image="raise"``
    raises :class:`ImageReadError` instead. ``verify_images=True`` decodes every
    image at construction and drops the bad ones there (counted; with
    ``on_bad_image="raise"`` the first bad one raises), which makes the report
    complete before training starts.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        class_names: list[str],
        category_ids: list[int],
        problems: DataProblems,
        transforms: Transforms | None = None,
        on_bad_image: Literal["skip", "raise"] = "skip",
        verify_images: bool = False,
    ) -> None:
        if on_bad_image not in ("skip", "raise"):
            raise ValueError(f"on_bad_image must be 'skip' or 'raise', got {on_bad_image!r}")
        self.records = records
        self.class_names = list(class_names)
        self.category_ids = list(category_ids)
        self.problems = problems
        self.transforms = transforms
        self.on_bad_image = on_bad_image
        self._bad: set[int] = set()
        self._warned_transform_drop = False
        self._coco_gt: dict[str, Any] | None = None
        if verify_images:
            self._verify_images()
        self._update_info()
        self.problems.log(logger)

    # ------------------------------------------------------------------ basics

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        """K, the number of classes (labels are in [0, K))."""
        return len(self.class_names)

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids, in index order."""
        return [r.image_id for r in self.records]

    def _update_info(self) -> None:
        info = self.problems.info
        info["images"] = len(self.records)
        info["annotations"] = int(sum(int((~r.crowd).sum()) for r in self.records))
        info["negative_images"] = sum(1 for r in self.records if not (~r.crowd).any())

    def _verify_images(self) -> None:
        kept = []
        for rec in self.records:
            try:
                self._read(rec)
            except ImageReadError as exc:
                if self.on_bad_image == "raise":
                    raise
                self.problems.add(exc.kind, example=f"{exc.path.name}: {exc.reason}")
                continue
            kept.append(rec)
        if not kept and self.records:
            raise DataError(f"{self.problems.source}: no readable image among {len(self.records)}")
        self.records = kept

    # ----------------------------------------------------------------- samples

    @staticmethod
    def _read(rec: ImageRecord) -> np.ndarray:
        array = read_image(rec.path)
        if array.shape[:2] != (rec.height, rec.width):
            raise ImageReadError(
                rec.path,
                f"decoded size {array.shape[0]}x{array.shape[1]} (HxW) differs from the "
                f"annotated {rec.height}x{rec.width}",
                kind="image_size_mismatch",
            )
        return array

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a data set of {n} images")
        index %= n
        for attempt in range(n):
            j = (index + attempt) % n
            if j in self._bad:
                continue
            try:
                return self._load(j)
            except ImageReadError as exc:
                if self.on_bad_image == "raise":
                    raise
                self._bad.add(j)
                self.problems.add(exc.kind, example=f"{exc.path.name}: {exc.reason}")
                logger.warning("%s: skipping image (%s): %s", self.problems.source, exc.kind, exc)
        raise DataError(f"{self.problems.source}: no readable image left")

    def _load(self, index: int) -> tuple[Tensor, Target]:
        rec = self.records[index]
        array = self._read(rec)
        keep = ~rec.crowd
        image = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1))
        orig_size = (rec.height, rec.width)
        target: Target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(rec.boxes[keep]).float(), format="XYXY", canvas_size=orig_size
            ),
            "labels": torch.from_numpy(rec.labels[keep]).long(),
            "image_id": rec.image_id,
            "orig_size": orig_size,
        }
        before = len(target["labels"])
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        dropped = before - len(target["labels"])
        if dropped:
            self.problems.add("dropped_by_transform", dropped, example=rec.file_name)
            log = logger.debug if self._warned_transform_drop else logger.warning
            log(
                "%s: the transforms dropped %d box(es) of %s (smaller than 1 px after resizing); "
                "counted in problems['dropped_by_transform']%s",
                self.problems.source,
                dropped,
                rec.file_name,
                "" if self._warned_transform_drop else ", further drops are logged at DEBUG",
            )
            self._warned_transform_drop = True
        image = image.as_subclass(Tensor)
        if not image.is_floating_point():
            image = TF.to_dtype(image, torch.float32, scale=True)
        out: Target = {
            "boxes": target["boxes"].as_subclass(Tensor).to(torch.float32).reshape(-1, 4),
            "labels": target["labels"].as_subclass(Tensor).to(torch.int64),
            "image_id": int(target["image_id"]),
            "orig_size": tuple(int(v) for v in target["orig_size"]),
            "size": (int(image.shape[-2]), int(image.shape[-1])),
        }
        return image.to(torch.float32), out

    # --------------------------------------------------------- ground truth

    @property
    def coco_ground_truth(self) -> dict[str, Any]:
        """The evaluation ground truth as an in-memory COCO dict (built once).

        It holds exactly the images and boxes this data set kept (sanitised,
        clipped), crowd regions / VOC difficult objects as ``iscrowd=1``,
        category ids from :attr:`category_ids` and names from
        :attr:`class_names`, so evaluation sees what training sees.
        """
        if self._coco_gt is None:
            images, annotations = [], []
            for rec in self.records:
                images.append(
                    {"id": rec.image_id, "file_name": rec.file_name,
                     "width": rec.width, "height": rec.height}
                )  # fmt: skip
                for box, label, crowd, area in zip(
                    rec.boxes.tolist(),
                    rec.labels.tolist(),
                    rec.crowd.tolist(),
                    rec.areas.tolist(),
                    strict=True,
                ):
                    x1, y1, x2, y2 = box
                    annotations.append(
                        {
                            "id": len(annotations) + 1,
                            "image_id": rec.image_id,
                            "category_id": self.category_ids[label],
                            "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "area": float(area),
                            "iscrowd": int(crowd),
                        }
                    )
            categories = [
                {"id": cid, "name": name}
                for cid, name in zip(self.category_ids, self.class_names, strict=True)
            ]
            self._coco_gt = {"images": images, "annotations": annotations, "categories": categories}
        return self._coco_gt
