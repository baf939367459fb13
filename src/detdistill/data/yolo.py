"""YOLO-format detection data (a ``data.yaml``, image folders, one label file per image).

The layout, written here from its public description::

    data.yaml        path: root (optional; relative to this file's folder)
                     train: images/train   (a folder, a list of folders, or a .txt list)
                     val: images/val
                     names: [cat, dog]     (or {0: cat, 1: dog}); nc optional
    images/train/x.jpg
    labels/train/x.txt   one line per object: ``class cx cy w h``, normalised to [0, 1]

The label file of an image is its path with the last ``images`` folder replaced
by ``labels`` and the suffix by ``.txt``; an image without one (or with an
empty one) is a background image. Boxes are converted to pixels with the image
size read from the file header and then checked by :func:`sanitize_boxes`, as
COCO and VOC boxes are, so every dropped or clipped box is counted the same way.

:func:`write_yolo` writes COCO (or any loaded) data sets in this layout.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal, NamedTuple

import numpy as np
import yaml

from detdistill.data.base import DetectionDataset, ImageRecord, Transforms
from detdistill.data.boxes import sanitize_boxes
from detdistill.data.classes import check_class_names, resolve_class_names
from detdistill.data.coco import CocoDetection
from detdistill.data.errors import AnnotationFormatError, DataError, ImageReadError
from detdistill.data.image_io import read_image_header
from detdistill.data.problems import DataProblems

logger = logging.getLogger("detdistill.data")

#: Image suffixes a split folder is scanned for (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")

#: Excess beyond [0, 1] (normalised units) clipped without being counted: label
#: files store rounded decimals, and annotation tools let boxes touch the border.
NORMALISED_TOLERANCE = 1e-3

ImageSource = DetectionDataset | tuple[str | Path, str | Path]


# --------------------------------------------------------------------------- data.yaml


def load_data_yaml(path: str | Path) -> dict[str, Any]:
    """Parse and check a YOLO ``data.yaml``.

    Returns ``{"root": Path, "names": list[str], "splits": {key: value}}``, where
    ``splits`` holds the raw ``train``/``val``/``test`` entries. A file that is
    not a mapping, or whose ``names``/``nc``/``path`` is wrong, raises
    :class:`AnnotationFormatError` naming the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"YOLO data.yaml not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise AnnotationFormatError(path, f"not UTF-8 text: {exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise AnnotationFormatError(path, f"invalid YAML: {problem}{where}") from exc
    if not isinstance(data, dict):
        raise AnnotationFormatError(path, f"top level must be a mapping, got {type(data).__name__}")
    names = _names(path, data)
    if "nc" in data and data["nc"] != len(names):
        raise AnnotationFormatError(
            path, f"nc is {data['nc']!r} but names lists {len(names)} classes", field="nc"
        )
    root = _absolute(path.parent)
    if data.get("path") not in (None, ""):
        if not isinstance(data["path"], str):
            raise AnnotationFormatError(
                path, f"expected a string, got {type(data['path']).__name__}", field="path"
            )
        root = _absolute(path.parent / Path(data["path"]).expanduser())
        if not root.is_dir():
            raise AnnotationFormatError(path, f"folder not found: {root}", field="path")
    splits = {k: v for k, v in data.items() if k not in ("path", "names", "nc")}
    return {"root": root, "names": names, "splits": splits}


def _class_name(path: Path, value: Any, field: str) -> str:
    # YAML reads unquoted digits (the `digits` classes) as integers
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise AnnotationFormatError(path, f"expected a class name, got {value!r}", field=field)


def _names(path: Path, data: dict) -> list[str]:
    if "names" not in data:
        raise AnnotationFormatError(path, "missing (the list of class names)", field="names")
    value = data["names"]
    if isinstance(value, list):
        names = [_class_name(path, v, f"names[{i}]") for i, v in enumerate(value)]
    elif isinstance(value, dict):
        ids = []
        for key in value:
            if isinstance(key, str) and key.strip().isdigit():
                ids.append(int(key))
            elif isinstance(key, int) and not isinstance(key, bool):
                ids.append(key)
            else:
                raise AnnotationFormatError(
                    path, f"class ids must be integers, got {key!r}", field="names"
                )
        if sorted(ids) != list(range(len(ids))):
            raise AnnotationFormatError(
                path, f"class ids must be 0..{len(ids) - 1}, got {sorted(ids)}", field="names"
            )
        by_id = dict(zip(ids, value.values(), strict=True))
        names = [_class_name(path, by_id[i], f"names[{i}]") for i in range(len(ids))]
    else:
        raise AnnotationFormatError(
            path, f"expected a list or a mapping, got {type(value).__name__}", field="names"
        )
    if not names:
        raise AnnotationFormatError(path, "no classes", field="names")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AnnotationFormatError(path, f"duplicate class names {dupes}", field="names")
    return names


def _absolute(path: Path) -> Path:
    # lexical, not Path.resolve(): a symlinked images folder must keep its name, since the
    # label files are found by replacing that name in the image path
    return Path(os.path.abspath(path))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _split_images(
    yaml_path: Path, root: Path, key: str, value: Any, problems: DataProblems
) -> list[Path]:
    """The image paths of one split entry, in order: folders sorted, list files as listed."""
    if value in (None, "", []):
        raise AnnotationFormatError(yaml_path, "empty: expected an image folder or list", key)
    entries = value if isinstance(value, list) else [value]
    images: list[Path] = []
    for i, entry in enumerate(entries):
        field = key if not isinstance(value, list) else f"{key}[{i}]"
        if not isinstance(entry, str) or not entry:
            raise AnnotationFormatError(
                yaml_path, f"expected a folder or .txt path, got {entry!r}", field
            )
        where = _absolute(root / Path(entry).expanduser())
        if where.is_dir():
            found = [p for p in where.rglob("*") if _is_image(p) and p.is_file()]
            images.extend(sorted(found, key=lambda p: p.relative_to(where).as_posix()))
        elif where.is_file() and where.suffix.lower() == ".txt":
            images.extend(_list_file(where, problems))
        else:
            raise AnnotationFormatError(
                yaml_path, f"not an image folder or .txt list: {where}", field
            )
    if not images:
        raise AnnotationFormatError(yaml_path, f"no images found in {value!r}", key)
    return images


def _list_file(path: Path, problems: DataProblems) -> list[Path]:
    """Image paths of a list file; relative ones are relative to the list file's folder."""
    images = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise AnnotationFormatError(path, f"not UTF-8 text: {exc}") from exc
    for line in lines:
        entry = line.strip()
        if not entry:
            continue
        image = _absolute(path.parent / Path(entry).expanduser())
        if not image.is_file():
            problems.add("missing_image", example=str(image))
            continue
        images.append(image)
    return images


def label_path(image: str | Path) -> Path:
    """The label file of ``image``: its last ``images`` folder becomes ``labels``, suffix ``.txt``.

    An image under no ``images`` folder has its label file beside it.
    """
    image = Path(image)
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


# --------------------------------------------------------------------------- labels


def _parse_label_file(
    path: Path, num_classes: int, problems: DataProblems, raise_on_bad: bool
) -> tuple[np.ndarray, np.ndarray, list[int], bool]:
    """The good lines' ``(classes (N,), boxes (N, 4) cx cy w h, line numbers)``, and emptiness.

    The flag is ``True`` when the file has no non-blank line (a background image).
    """
    empty = True
    classes: list[int] = []
    boxes: list[list[float]] = []
    line_numbers: list[int] = []
    text = path.read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        empty = False
        kind, reason = None, ""
        values: list[float] = []
        if len(fields) != 5:
            kind, reason = (
                "label_malformed",
                f"expected 5 fields (class cx cy w h), got {len(fields)}",
            )
        else:
            try:
                values = [float(v) for v in fields]
            except ValueError:
                kind, reason = "label_malformed", f"not numeric: {line.strip()!r}"
        if kind is None:
            cls = values[0]
            if not (math.isfinite(cls) and cls == int(cls) and 0 <= cls < num_classes):
                kind = "label_class_out_of_range"
                reason = f"class id {fields[0]} is not an integer in [0, {num_classes})"
        if kind is not None:
            if raise_on_bad:
                raise AnnotationFormatError(path, reason, field=f"line {n}")
            problems.add(kind, example=f"{path}:{n}: {reason}")
            continue
        classes.append(int(values[0]))
        boxes.append(values[1:])
        line_numbers.append(n)
    return (
        np.array(classes, dtype=np.int64),
        np.array(boxes, dtype=np.float64).reshape(-1, 4),
        line_numbers,
        empty,
    )


class _Boxes(NamedTuple):
    boxes: np.ndarray  # (M, 4) float32 xyxy pixels, kept only
    keep: np.ndarray  # (N,) bool over the parsed lines
    areas: np.ndarray  # (M,) float64


class YoloDetection(DetectionDataset):
    """One split of a YOLO data set (``data.yaml`` plus image and label folders).

    ``split`` is a key of the yaml (``train``, ``val``, ``test``) whose value is
    an image folder (scanned recursively for :data:`IMAGE_EXTENSIONS`, sorted),
    a list of folders, or a ``.txt`` list of image paths (relative ones are
    relative to the list file's folder). ``image_id`` is the 1-based position
    in that order (counted before dropping anything, so it is stable);
    ``category_ids`` are the yaml's class ids plus 1 (``1..K`` in the yaml's
    order), as COCO category ids must be. ``class_names`` defaults to the
    yaml's ``names``; when given it must name the same classes (any order;
    labels follow the given order) or :class:`ClassMismatchError` names the
    difference.

    Counted, not raised (see :attr:`problems`): a label line without 5 numeric
    fields (``label_malformed``) or with a class id that is not an integer in
    ``[0, K)`` (``label_class_out_of_range``) is dropped; boxes are converted to
    pixels and dropped or clipped as :func:`sanitize_boxes` says, except that
    an excess of up to :data:`NORMALISED_TOLERANCE` beyond ``[0, 1]`` is clipped
    without being counted; a label file that is not UTF-8 text drops its image
    (``label_unreadable``); an image missing from a list file
    (``missing_image``) or whose header cannot be read (``unreadable_image``) is
    dropped. ``on_bad_label="raise"`` raises :class:`AnnotationFormatError`
    naming the label file and line instead. Images without a label file, or
    with an empty one, are background images (``info["background_images"]``).
    A bad ``data.yaml`` raises :class:`AnnotationFormatError` naming the file
    and the key. See :class:`DetectionDataset` for the sample format and
    unreadable images.
    """

    def __init__(
        self,
        data_yaml: str | Path,
        split: str = "train",
        transforms: Transforms | None = None,
        class_names: Sequence[str] | None = None,
        *,
        on_bad_image: Literal["skip", "raise"] = "skip",
        on_bad_label: Literal["skip", "raise"] = "skip",
        verify_images: bool = False,
    ) -> None:
        if on_bad_label not in ("skip", "raise"):
            raise ValueError(f"on_bad_label must be 'skip' or 'raise', got {on_bad_label!r}")
        self.data_yaml = Path(data_yaml)
        self.split = split
        self.coco_annotation_file = None
        config = load_data_yaml(self.data_yaml)
        self.root: Path = config["root"]
        if split not in config["splits"]:
            raise AnnotationFormatError(
                self.data_yaml, f"missing (the {split!r} split's images)", field=split
            )
        problems = DataProblems(source=f"YOLO {self.data_yaml.name}/{split}")
        images = _split_images(self.data_yaml, self.root, split, config["splits"][split], problems)
        found = config["names"]
        names = resolve_class_names(found, class_names, what=f"file {self.data_yaml}")
        label_of_name = {n: i for i, n in enumerate(names)}
        label_of_class = np.array([label_of_name[n] for n in found], dtype=np.int64)
        cat_ids = [found.index(n) + 1 for n in names]

        records: list[ImageRecord] = []
        with_labels = 0
        background = 0
        for image_id, image in enumerate(images, start=1):
            try:
                height, width, orientation = read_image_header(image)
            except ImageReadError as exc:
                if on_bad_image == "raise":
                    raise
                problems.add(exc.kind, example=f"{image.name}: {exc.reason}")
                continue
            if orientation != 1:  # Ultralytics labels the view the EXIF tag rotates to
                problems.add(
                    "exif_rotated",
                    example=f"{image.name}: EXIF orientation {orientation}; read as stored, "
                    "while Ultralytics' tools label the rotated view: check its boxes",
                )
            labels_file = label_path(image)
            if labels_file.is_file():
                with_labels += 1
                try:
                    cls, cxcywh, lines, empty = _parse_label_file(
                        labels_file, len(found), problems, on_bad_label == "raise"
                    )
                except UnicodeDecodeError as exc:
                    if on_bad_label == "raise":
                        raise AnnotationFormatError(labels_file, f"not UTF-8 text: {exc}") from exc
                    problems.add("label_unreadable", example=f"{labels_file}: not UTF-8 text")
                    continue
            else:
                cls, cxcywh, lines, empty = np.zeros(0, np.int64), np.zeros((0, 4)), [], True
            boxes = self._sanitize(cxcywh, width, height, labels_file, lines, problems)
            background += empty
            records.append(
                ImageRecord(
                    image_id=image_id,
                    path=image,
                    file_name=_relative_name(image, self.root),
                    height=height,
                    width=width,
                    boxes=boxes.boxes,
                    labels=label_of_class[cls[boxes.keep]],
                    crowd=np.zeros(len(boxes.boxes), dtype=bool),
                    areas=boxes.areas,
                )
            )
        if images and not records:
            raise DataError(
                f"{self.data_yaml}: none of the {len(images)} images of split {split!r} could be "
                f"read (first: {images[0]})"
            )
        if records and not with_labels:
            logger.warning(
                "%s: no label file found for any of the %d images (the first expected at %s); "
                "every image is treated as background",
                problems.source,
                len(images),
                label_path(images[0]),
            )
        problems.info["background_images"] = background
        super().__init__(records, names, cat_ids, problems, transforms, on_bad_image, verify_images)

    @staticmethod
    def _sanitize(
        cxcywh: np.ndarray,
        width: int,
        height: int,
        labels_file: Path,
        lines: list[int],
        problems: DataProblems,
    ) -> _Boxes:
        """Pixel boxes of the good lines, checked and counted as COCO boxes are."""
        cx, cy, w, h = cxcywh.reshape(-1, 4).T
        norm = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        n = len(norm)
        scale = np.array([width, height, width, height], dtype=np.float64)
        sanitized = sanitize_boxes(norm * scale, np.full(n, width), np.full(n, height))
        kinds = dict(sanitized.kinds)
        # clipped by no more than the normalised tolerance: rounding, not counted
        with np.errstate(invalid="ignore"):
            excess = np.maximum(-norm, norm - 1).max(axis=1, initial=0.0)
        kinds["box_clipped"] = kinds["box_clipped"] & (excess > NORMALISED_TOLERANCE)
        for kind, mask in kinds.items():
            idx = np.flatnonzero(mask)
            if len(idx):
                problems.add(kind, len(idx), example=f"{labels_file}:{lines[idx[0]]}")
        kept = sanitized.boxes[sanitized.keep]
        areas = (kept[:, 2] - kept[:, 0]).astype(np.float64) * (kept[:, 3] - kept[:, 1])
        return _Boxes(kept, sanitized.keep, areas)


def _relative_name(image: Path, root: Path) -> str:
    try:
        return image.relative_to(root).as_posix()
    except ValueError:
        return image.as_posix()


# --------------------------------------------------------------------------- export


def _place(source: Path, target: Path, images: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if images == "symlink":
        target.symlink_to(source.resolve())
        return
    if images == "hardlink":
        try:
            os.link(source, target)
            return
        except OSError:  # another file system, or links not allowed: copy
            pass
    shutil.copy2(source, target)


def _output_name(file_name: str) -> PurePosixPath:
    """Where an image goes under ``images/<split>/``: its relative name, minus any ``images`` part.

    (``images/train/x.jpg`` of a YOLO source becomes ``train/x.jpg``, so that no
    ``images`` folder below the split's moves its label file.)
    """
    name = PurePosixPath(file_name.replace("\\", "/"))
    if name.is_absolute() or ".." in name.parts:
        return PurePosixPath(name.name)
    folders = list(name.parts[:-1])
    if "images" in folders:
        last = len(folders) - 1 - folders[::-1].index("images")
        return PurePosixPath(*name.parts[last + 1 :])
    return name


def _yolo_line(label: int, box: Sequence[float], width: int, height: int) -> str:
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
    w, h = (x2 - x1) / width, (y2 - y1) / height
    return f"{label} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


def _write_split(
    dataset: DetectionDataset, names: list[str], tmp: Path, split: str, images: str
) -> tuple[int, int]:
    """Images and labels of one split under ``tmp``; returns (images, crowd boxes left out)."""
    check_class_names(names, dataset.class_names, what=f"{split} split", check_missing=False)
    label_map = np.array([names.index(n) for n in dataset.class_names], dtype=np.int64)
    written: set[PurePosixPath] = set()
    crowd = 0
    # a YOLO source's names start at its root (images/train/...): name its images from the
    # deepest folder they share instead
    common = (
        Path(os.path.commonpath([r.path.parent for r in dataset.records]))
        if isinstance(dataset, YoloDetection) and dataset.records
        else None
    )
    for rec in dataset.records:
        name = _output_name(
            rec.path.relative_to(common).as_posix() if common is not None else rec.file_name
        )
        if name.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(
                f"{rec.path}: suffix {name.suffix!r} is not a YOLO image suffix "
                f"{list(IMAGE_EXTENSIONS)}"
            )
        if name in written:
            raise DataError(f"{split} split: two images would both be written as {name}")
        written.add(name)
        image = Path("images", split, *name.parts)
        _place(rec.path, tmp / image, images)
        keep = ~rec.crowd
        crowd += int(rec.crowd.sum())
        lines = [
            _yolo_line(int(label_map[label]), box, rec.width, rec.height)
            for box, label in zip(rec.boxes[keep].tolist(), rec.labels[keep].tolist(), strict=True)
        ]
        label_file = tmp / label_path(image)
        label_file.parent.mkdir(parents=True, exist_ok=True)
        label_file.write_text("".join(line + "\n" for line in lines))
    return len(written), crowd


def require_new_folder(out: Path) -> None:
    """Refuse an ``out`` that exists and is not an empty folder (nothing is overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not an empty folder; choose a new output folder")


def write_yolo(
    splits: Mapping[str, ImageSource],
    out_dir: str | Path,
    *,
    images: Literal["copy", "hardlink", "symlink"] = "copy",
) -> Path:
    """Write detection data sets in the YOLO layout under ``out_dir``; return its ``data.yaml``.

    ``splits`` maps split names (``train``, ``val``, ...) to a loaded
    :class:`DetectionDataset` (COCO, VOC or YOLO) or to a COCO
    ``(images_dir, annotation_file)`` pair, which is loaded with
    :class:`CocoDetection` (so bad boxes are counted and repaired the same
    way). Writes ``images/<split>/`` (``images="copy"``, ``"hardlink"`` with a
    copy where linking fails, or ``"symlink"``), ``labels/<split>/`` (one file
    per image, empty for background images) and ``data.yaml`` with the
    absolute ``path`` of ``out_dir``. The class list is the first split's;
    the others must use classes of that list. Crowd regions and VOC difficult
    objects are left out (YOLO has no ignore regions; the number is logged).
    Everything is written to a temporary sibling folder first and renamed
    into place; an existing non-empty ``out_dir`` is refused.
    """
    if images not in ("copy", "hardlink", "symlink"):
        raise ValueError(f"images must be 'copy', 'hardlink' or 'symlink', got {images!r}")
    if not splits:
        raise ValueError("write_yolo needs at least one split")
    out = _absolute(Path(out_dir))
    require_new_folder(out)
    datasets: dict[str, DetectionDataset] = {}
    names: list[str] | None = None
    for split, source in splits.items():
        if isinstance(source, DetectionDataset):
            datasets[split] = source
        else:
            images_dir, annotation_file = source
            datasets[split] = CocoDetection(images_dir, annotation_file, class_names=names)
        names = names if names is not None else list(datasets[split].class_names)
    assert names is not None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for split, dataset in datasets.items():
            count, crowd = _write_split(dataset, names, tmp, split, images)
            if crowd:
                logger.info(
                    "YOLO %s: %d crowd/difficult region(s) left out (YOLO has no ignore regions)",
                    split,
                    crowd,
                )
            logger.info("YOLO %s: wrote %d images to %s", split, count, out / "images" / split)
        config: dict[str, Any] = {"path": str(out)}
        config.update({split: f"images/{split}" for split in datasets})
        config["nc"] = len(names)
        config["names"] = dict(enumerate(names))
        (tmp / "data.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "data.yaml"
