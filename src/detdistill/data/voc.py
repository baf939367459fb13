"""Pascal VOC XML directories, converted to the same records (and COCO ground truth).

Why convert: evaluation must use one well-kept COCOeval, so VOC annotations are
held as an in-memory COCO dict (:attr:`VOCDetection.coco_ground_truth`);
difficult objects become ``iscrowd=1`` ignore regions there, the closest
COCOeval has to VOC's "difficult" (detections on them are neither true nor
false positives; note COCOeval's crowd IoU is intersection over detection area).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from detdistill.data.base import DetectionDataset, ImageRecord, Transforms, logger
from detdistill.data.boxes import sanitize_boxes
from detdistill.data.classes import VOC_CLASSES, resolve_class_names
from detdistill.data.errors import AnnotationFormatError, ImageReadError
from detdistill.data.image_io import read_image_size
from detdistill.data.problems import DataProblems


def _text(path: Path, node: ET.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise AnnotationFormatError(path, "missing element", field=f"{where}/{tag}")
    return child.text.strip()


def _number(path: Path, node: ET.Element, tag: str, where: str) -> float:
    text = _text(path, node, tag, where)
    try:
        return float(text)
    except ValueError as exc:
        raise AnnotationFormatError(
            path, f"not a number: {text!r}", field=f"{where}/{tag}"
        ) from exc


def parse_voc_xml(path: str | Path) -> dict:
    """Parse one VOC annotation file to ``{filename, width, height, objects}``.

    ``objects`` is a list of ``{name, difficult, box}`` with ``box`` xyxy in
    continuous pixel coordinates: VOC's 1-based inclusive pixel indices become
    ``(xmin - 1, ymin - 1, xmax, ymax)`` (as detectron2 does), so a box covering
    the whole image is ``(0, 0, W, H)``. ``width``/``height`` are 0 when the file
    has no usable ``size`` (the loader then reads the image header).
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise AnnotationFormatError(path, f"invalid XML: {exc}") from exc
    if root.tag != "annotation":
        raise AnnotationFormatError(path, f"root element is <{root.tag}>, expected <annotation>")
    size = root.find("size")
    width = height = 0
    if size is not None:
        try:
            width = int(float(size.findtext("width", "0")))
            height = int(float(size.findtext("height", "0")))
        except ValueError as exc:
            raise AnnotationFormatError(path, f"size is not numeric: {exc}", field="size") from exc
    objects = []
    for i, obj in enumerate(root.findall("object")):
        where = f"object[{i}]"
        name = _text(path, obj, "name", where)
        difficult_text = obj.findtext("difficult", "0").strip() or "0"
        if difficult_text not in ("0", "1"):
            raise AnnotationFormatError(
                path, f"expected 0 or 1, got {difficult_text!r}", f"{where}/difficult"
            )
        bnd = obj.find("bndbox")
        if bnd is None:
            raise AnnotationFormatError(path, "missing element", field=f"{where}/bndbox")
        coords = [
            _number(path, bnd, t, f"{where}/bndbox") for t in ("xmin", "ymin", "xmax", "ymax")
        ]
        box = (coords[0] - 1.0, coords[1] - 1.0, coords[2], coords[3])
        objects.append({"name": name, "difficult": difficult_text == "1", "box": box})
    filename = root.findtext("filename")
    return {
        "filename": filename.strip() if filename else None,
        "width": width,
        "height": height,
        "objects": objects,
    }


class VOCDetection(DetectionDataset):
    """A Pascal VOC directory (``JPEGImages/``, ``Annotations/``, ``ImageSets/Main/{split}.txt``).

    ``class_names`` defaults to :data:`VOC_CLASSES` when every object name is a
    VOC class, else to the sorted names found (logged: pass ``class_names`` so
    that train and val agree). When given, an object name outside it raises
    :class:`ClassMismatchError` naming it; classes that no object of the split
    uses are fine. ``image_id`` is the 1-based position in the split file;
    ``category_ids`` are ``1..K``. Difficult objects are left out of training
    targets (``include_difficult=True`` keeps them) and are ignore regions in
    the evaluation ground truth. An id in the split file without its XML or
    image is dropped and counted (``missing_annotation`` / ``missing_image``),
    and so is one whose XML is malformed (``bad_annotation``, with the file and
    the fault as the example), so one broken file among thousands costs one
    image, not the split; ``on_bad_annotation="raise"`` raises
    :class:`AnnotationFormatError` at the first one instead.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        class_names: Sequence[str] | None = None,
        transforms: Transforms | None = None,
        *,
        include_difficult: bool = False,
        on_bad_image: Literal["skip", "raise"] = "skip",
        on_bad_annotation: Literal["skip", "raise"] = "skip",
        verify_images: bool = False,
    ) -> None:
        if on_bad_annotation not in ("skip", "raise"):
            raise ValueError(
                f"on_bad_annotation must be 'skip' or 'raise', got {on_bad_annotation!r}"
            )
        self.root = Path(root)
        self.split = split
        self.coco_annotation_file = None
        split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"VOC split file not found: {split_file}")
        problems = DataProblems(source=f"VOC {self.root.name}/{split}")
        ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]

        parsed: list[tuple[int, str, Path, dict]] = []
        for n, name in enumerate(ids, start=1):
            xml = self.root / "Annotations" / f"{name}.xml"
            if not xml.is_file():
                problems.add("missing_annotation", example=str(xml))
                continue
            try:
                ann = parse_voc_xml(xml)
            except AnnotationFormatError as exc:
                if on_bad_annotation == "raise":
                    raise
                problems.add("bad_annotation", example=str(exc))
                continue
            image = self.root / "JPEGImages" / (ann["filename"] or f"{name}.jpg")
            if not image.is_file() and (self.root / "JPEGImages" / f"{name}.jpg").is_file():
                image = self.root / "JPEGImages" / f"{name}.jpg"
            if not image.is_file():
                problems.add("missing_image", example=str(image))
                continue
            if ann["width"] <= 0 or ann["height"] <= 0:
                try:
                    ann["height"], ann["width"] = read_image_size(image)
                except ImageReadError as exc:
                    problems.add(exc.kind, example=f"{image.name}: {exc.reason}")
                    continue
            parsed.append((n, name, image, ann))
        if ids and not parsed:
            raise FileNotFoundError(
                f"none of the {len(ids)} ids in {split_file} has both an annotation and an image "
                f"under {self.root} (first expected: {self.root / 'JPEGImages' / (ids[0] + '.jpg')})"
            )

        found = sorted({o["name"] for *_, ann in parsed for o in ann["objects"]})
        if class_names is None and set(found) <= set(VOC_CLASSES):
            class_names = VOC_CLASSES
        elif class_names is None:
            logger.warning(
                "VOC %s: class list inferred from the %s split: %s; pass class_names so that "
                "every split uses the same labels",
                self.root,
                split,
                found,
            )
        names = resolve_class_names(
            found, class_names, what=f"VOC {split} split", check_missing=False
        )
        label_of = {c: i for i, c in enumerate(names)}

        records = []
        difficult_total = 0
        for n, name, image, ann in parsed:
            objs = ann["objects"]
            w, h = ann["width"], ann["height"]
            raw = np.array([o["box"] for o in objs], dtype=np.float64).reshape(-1, 4)
            sanitized = sanitize_boxes(raw, np.full(len(objs), w), np.full(len(objs), h))
            for kind, mask in sanitized.kinds.items():
                idx = np.flatnonzero(mask)
                problems.add(
                    kind, len(idx), example=f"{name}.xml object[{idx[0]}]" if len(idx) else None
                )
            keep = sanitized.keep
            boxes = sanitized.boxes[keep]
            difficult = np.array([o["difficult"] for o in objs], dtype=bool)[keep]
            labels = np.array([label_of[o["name"]] for o in objs], dtype=np.int64)[keep]
            ignore = difficult & (not include_difficult)
            difficult_total += int(ignore.sum())
            records.append(
                ImageRecord(
                    image_id=n,
                    path=image,
                    file_name=image.name,
                    height=h,
                    width=w,
                    boxes=boxes,
                    labels=labels,
                    crowd=ignore,
                    areas=((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(
                        np.float64
                    ),
                )
            )
        problems.info["difficult_ignored"] = difficult_total
        super().__init__(
            records,
            names,
            list(range(1, len(names) + 1)),
            problems,
            transforms,
            on_bad_image,
            verify_images,
        )
