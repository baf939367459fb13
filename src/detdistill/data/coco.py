"""COCO-format detection data (the lingua franca), read strictly and repaired visibly.

Why not ``torchvision.datasets.CocoDetection``: it trusts the JSON. Here a
schema violation is an error naming the file and the field, and every box or
annotation that has to be dropped or clipped is counted by kind.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from detdistill.data.base import DetectionDataset, ImageRecord, Transforms
from detdistill.data.boxes import sanitize_boxes, xywh_to_xyxy
from detdistill.data.classes import resolve_class_names
from detdistill.data.errors import AnnotationFormatError, ImageReadError
from detdistill.data.image_io import read_image_size
from detdistill.data.problems import DataProblems


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_json(path: str | Path) -> Any:
    """Parse a JSON file; a syntax error becomes :class:`AnnotationFormatError` with line/column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise AnnotationFormatError(
            path, f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from exc
    except UnicodeDecodeError as exc:
        raise AnnotationFormatError(path, f"not UTF-8 text: {exc}") from exc


def _list_field(path: Path, data: dict, key: str, required: bool = True) -> list:
    if key not in data:
        if required:
            raise AnnotationFormatError(path, "missing top-level list", field=key)
        return []
    value = data[key]
    if not isinstance(value, list):
        raise AnnotationFormatError(path, f"expected a list, got {type(value).__name__}", field=key)
    return value


def _check_entry(path: Path, entry: Any, where: str, fields: dict[str, tuple]) -> None:
    """Check that ``entry`` is a dict whose required ``fields`` pass their predicate."""
    if not isinstance(entry, dict):
        raise AnnotationFormatError(path, f"expected an object, got {type(entry).__name__}", where)
    for name, (predicate, expected, required) in fields.items():
        if name not in entry:
            if required:
                raise AnnotationFormatError(path, "missing", field=f"{where}.{name}")
            continue
        if not predicate(entry[name]):
            raise AnnotationFormatError(
                path, f"expected {expected}, got {entry[name]!r}", field=f"{where}.{name}"
            )


def _is_bbox(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple)) and len(value) == 4 and all(_is_number(v) for v in value)
    )


_CATEGORY_FIELDS = {
    "id": (_is_int, "an integer", True),
    "name": (lambda v: isinstance(v, str), "a string", True),
}
_IMAGE_FIELDS = {
    "id": (_is_int, "an integer", True),
    "file_name": (lambda v: isinstance(v, str) and v != "", "a non-empty string", True),
    "width": (lambda v: _is_int(v) and v > 0, "a positive integer", False),
    "height": (lambda v: _is_int(v) and v > 0, "a positive integer", False),
}
_ANNOTATION_FIELDS = {
    "image_id": (_is_int, "an integer", True),
    "category_id": (_is_int, "an integer", True),
    "bbox": (_is_bbox, "a list of 4 numbers [x, y, width, height]", True),
    "iscrowd": (lambda v: v in (0, 1) and not isinstance(v, float), "0 or 1", False),
    "area": (_is_number, "a number", False),
}


def _unique(path: Path, values: list, where: str) -> None:
    seen: set = set()
    for i, value in enumerate(values):
        if value in seen:
            raise AnnotationFormatError(path, f"duplicate value {value!r}", field=f"{where}[{i}]")
        seen.add(value)


class CocoDetection(DetectionDataset):
    """A COCO JSON file and its image folder as ``(image, target)`` samples.

    Labels are contiguous indices into :attr:`class_names`; ``class_names``
    defaults to the file's category names in category-id order, and when
    given must name exactly the file's categories (any order; labels follow
    the given order) or :class:`ClassMismatchError` names the difference.
    :attr:`category_ids` maps labels back to the file's category ids.

    Construction checks the schema (error naming file and field), drops images
    whose file is missing and annotations pointing to unknown images or
    categories, drops or clips bad boxes, and logs one summary; counts are in
    :attr:`problems`. If no listed image file exists at all, it raises
    ``FileNotFoundError`` (a wrong ``images_dir`` is more likely than a data
    set with every file missing). Crowd annotations are kept for evaluation
    only. See :class:`DetectionDataset` for the sample format and unreadable
    images.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotation_file: str | Path,
        transforms: Transforms | None = None,
        class_names: Sequence[str] | None = None,
        *,
        on_bad_image: Literal["skip", "raise"] = "skip",
        verify_images: bool = False,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.coco_annotation_file = Path(annotation_file)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"image directory not found: {self.images_dir}")
        problems = DataProblems(source=f"COCO {self.coco_annotation_file.name}")
        records, names, cat_ids = self._parse(class_names, problems)
        super().__init__(records, names, cat_ids, problems, transforms, on_bad_image, verify_images)

    def _parse(
        self, class_names: Sequence[str] | None, problems: DataProblems
    ) -> tuple[list[ImageRecord], list[str], list[int]]:
        path = self.coco_annotation_file
        data = load_json(path)
        if not isinstance(data, dict):
            raise AnnotationFormatError(
                path, f"top level must be an object, got {type(data).__name__}"
            )
        categories = _list_field(path, data, "categories")
        images = _list_field(path, data, "images")
        annotations = _list_field(path, data, "annotations", required=False)
        for i, c in enumerate(categories):
            _check_entry(path, c, f"categories[{i}]", _CATEGORY_FIELDS)
        for i, im in enumerate(images):
            _check_entry(path, im, f"images[{i}]", _IMAGE_FIELDS)
        for i, a in enumerate(annotations):
            _check_entry(path, a, f"annotations[{i}]", _ANNOTATION_FIELDS)
        _unique(path, [c["id"] for c in categories], "categories.id")
        _unique(path, [c["name"] for c in categories], "categories.name")
        _unique(path, [im["id"] for im in images], "images.id")
        if not categories:
            raise AnnotationFormatError(path, "no categories", field="categories")

        # classes: found in category-id order, mapped by name onto class_names
        by_id = sorted(categories, key=lambda c: c["id"])
        names = resolve_class_names([c["name"] for c in by_id], class_names, what=f"file {path}")
        label_of_name = {n: i for i, n in enumerate(names)}
        cat_label = {c["id"]: label_of_name[c["name"]] for c in categories}
        cat_ids = [next(c["id"] for c in categories if c["name"] == n) for n in names]

        # images: keep those whose file exists; fill missing sizes from the header
        kept: dict[int, dict] = {}
        for im in images:
            file = self.images_dir / im["file_name"]
            if not file.is_file():
                problems.add("missing_image", example=str(file))
                continue
            if "width" not in im or "height" not in im:
                try:
                    h, w = read_image_size(file)
                except ImageReadError as exc:
                    problems.add(exc.kind, example=f"{file.name}: {exc.reason}")
                    continue
                im = {**im, "width": w, "height": h}
            kept[im["id"]] = im
        if images and not kept:
            raise FileNotFoundError(
                f"none of the {len(images)} images listed in {path} exists under {self.images_dir} "
                f"(first expected: {self.images_dir / images[0]['file_name']})"
            )
        all_image_ids = {im["id"] for im in images}

        # annotations: vectorised checks
        n = len(annotations)
        img_id = np.array([a["image_id"] for a in annotations], dtype=np.int64)
        cat_id = np.array([a["category_id"] for a in annotations], dtype=np.int64)
        bbox = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(n, 4)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in annotations], dtype=bool)
        area = np.array([a.get("area", math.nan) for a in annotations], dtype=np.float64)

        unknown_img = np.array([i not in all_image_ids for i in img_id.tolist()], dtype=bool)
        unknown_cat = np.array([c not in cat_label for c in cat_id.tolist()], dtype=bool)
        of_missing = ~unknown_img & np.array([i not in kept for i in img_id.tolist()], dtype=bool)
        for kind, mask in (
            ("unknown_image_id", unknown_img),
            ("unknown_category_id", unknown_cat & ~unknown_img),
        ):
            idx = np.flatnonzero(mask)
            problems.add(kind, len(idx), example=self._ann_name(annotations, idx))
        problems.info["annotations_of_dropped_images"] = int(of_missing.sum())
        valid = ~unknown_img & ~unknown_cat & ~of_missing

        width = np.array(
            [kept[i]["width"] if v else 1 for i, v in zip(img_id.tolist(), valid, strict=True)]
        )
        height = np.array(
            [kept[i]["height"] if v else 1 for i, v in zip(img_id.tolist(), valid, strict=True)]
        )
        sanitized = sanitize_boxes(xywh_to_xyxy(bbox), width, height)
        for kind, mask in sanitized.kinds.items():
            idx = np.flatnonzero(mask & valid)
            problems.add(kind, len(idx), example=self._ann_name(annotations, idx))
        keep = valid & sanitized.keep
        problems.info["crowd_ignored"] = int((keep & crowd).sum())
        boxes = sanitized.boxes
        area = np.where(
            np.isnan(area), (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), area
        )
        labels = np.array([cat_label.get(c, -1) for c in cat_id.tolist()], dtype=np.int64)

        by_image: dict[int, list[int]] = {}
        for i in np.flatnonzero(keep).tolist():
            by_image.setdefault(int(img_id[i]), []).append(i)
        records = []
        for im in kept.values():
            idx = np.array(by_image.get(im["id"], []), dtype=np.int64)
            records.append(
                ImageRecord(
                    image_id=im["id"],
                    path=self.images_dir / im["file_name"],
                    file_name=im["file_name"],
                    height=im["height"],
                    width=im["width"],
                    boxes=boxes[idx].reshape(-1, 4),
                    labels=labels[idx],
                    crowd=crowd[idx],
                    areas=area[idx],
                )
            )
        return records, names, cat_ids

    @staticmethod
    def _ann_name(annotations: list[dict], idx: np.ndarray) -> str | None:
        if len(idx) == 0:
            return None
        i = int(idx[0])
        a = annotations[i]
        return f"annotations[{i}] (id={a.get('id')}, image_id={a['image_id']}, bbox={a['bbox']})"
