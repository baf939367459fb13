"""Embedded data sets, generated deterministically and written in COCO format.

Layout of ``out_dir`` (the same files a user's own COCO data set has)::

    out_dir/
      manifest.json          name, sizes, seed, generator version, sha256 of the JSONs
      train/  000001.jpg ...   (JPEG, quality 90)
      val/    000001.jpg ...
      train.json             COCO: images, annotations (integer xywh boxes), categories
      val.json

Category ids are ``1..K`` in :attr:`class_names` order (for ``digits``, the
category named ``"3"`` has id 4). Every image is drawn from its own generator
seeded by ``(seed, split, index)``, so the val set does not depend on
``num_train`` and a bigger train set extends a smaller one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from detdistill.data.embedded import digits, digits_large, shapes
from detdistill.data.embedded.cache import FORMAT, build_atomically, read_manifest
from detdistill.data.embedded.render import to_uint8
from detdistill.registry import Registry

logger = logging.getLogger("detdistill.data")

_SPLIT_CODE = {"train": 0, "val": 1}


@dataclass(frozen=True)
class EmbeddedSpec:
    """A generator: its classes, image format and scene function."""

    name: str
    class_names: tuple[str, ...]
    file_ext: str
    version: int
    generate_scene: Callable[[np.random.Generator, int, str], tuple[np.ndarray, list, list]]


#: ``data.name`` (with ``data.format: embedded``) and ``detdistill data make`` names.
EMBEDDED_DATASETS: Registry[EmbeddedSpec] = Registry("embedded data set")


def register_embedded(name: str, module: ModuleType) -> EmbeddedSpec:
    """Register a generator module: it defines ``CLASS_NAMES``, ``FILE_EXT``, ``VERSION``
    and ``generate_scene(rng, image_size, split)`` (see :mod:`~detdistill.data.embedded.shapes`).
    """
    spec = EmbeddedSpec(
        name, module.CLASS_NAMES, module.FILE_EXT, module.VERSION, module.generate_scene
    )
    return EMBEDDED_DATASETS.register(name)(spec)


register_embedded("shapes", shapes)
register_embedded("digits", digits)
register_embedded("digits_large", digits_large)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: independent of every other image and of the split sizes."""
    return np.random.default_rng([seed, _SPLIT_CODE[split], index])


def _save(image: np.ndarray, path: Path) -> None:
    pil = Image.fromarray(to_uint8(image))
    if path.suffix == ".png":
        pil.save(path, compress_level=1)
    else:
        pil.save(path, quality=90)


def write_split(
    spec: EmbeddedSpec, root: Path, split: str, count: int, seed: int, image_size: int
) -> Path:
    """Generate ``count`` scenes into ``root/split/`` and ``root/split.json``; return the JSON path."""
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        image, boxes, labels = spec.generate_scene(scene_rng(seed, split, index), image_size, split)
        file_name = f"{index + 1:06d}{spec.file_ext}"
        _save(image, image_dir / file_name)
        height, width = image.shape[:2]  # digits_large draws its own size per scene
        images.append({"id": index + 1, "file_name": file_name, "width": width, "height": height})
        for (x1, y1, x2, y2), label in zip(boxes, labels, strict=True):
            w, h = int(x2 - x1), int(y2 - y1)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": int(label) + 1,
                    "bbox": [int(x1), int(y1), w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": f"detdistill embedded '{spec.name}' {split}", "version": spec.version,
                 "seed": seed, "image_size": image_size},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": spec.name} for i, n in enumerate(spec.class_names)],
    }  # fmt: skip
    path = root / f"{split}.json"
    path.write_text(json.dumps(coco, separators=(",", ":")) + "\n")
    return path


def _paths(out: Path) -> dict[str, Path]:
    return {
        "root": out,
        "train_images": out / "train",
        "train_annotations": out / "train.json",
        "val_images": out / "val",
        "val_annotations": out / "val.json",
        "manifest": out / "manifest.json",
    }


def embedded_dir(
    root: str | Path, name: str, num_train: int, num_val: int, seed: int = 0, image_size: int = 128
) -> Path:
    """Where a run whose data root is ``root`` keeps this embedded data set.

    The folder is named by every setting that changes its files, so two runs
    that share a root but differ in sizes or seed each get their own folder
    instead of regenerating one under each other's data loaders.
    """
    return Path(root) / f"{name}-{num_train}x{num_val}-seed{seed}-{image_size}px"


def _cache_ok(out: Path, wanted: dict[str, Any], ext: str) -> bool:
    manifest = read_manifest(out)
    if manifest is None or any(manifest.get(k) != v for k, v in wanted.items()):
        return False
    paths = _paths(out)
    for split in ("train", "val"):
        if not paths[f"{split}_annotations"].is_file():
            return False
        if sum(1 for _ in paths[f"{split}_images"].glob(f"*{ext}")) != wanted[f"num_{split}"]:
            return False
    return True


def make_embedded(
    name: str,
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    seed: int = 0,
    image_size: int = 128,
) -> dict[str, Path]:
    """Generate (or reuse) an embedded data set in COCO format under ``out_dir``.

    Returns paths: ``root``, ``train_images``, ``train_annotations``,
    ``val_images``, ``val_annotations``, ``manifest``. An existing folder whose
    manifest matches ``name``/sizes/seed/generator version (and whose files are
    all there) is reused; otherwise it is regenerated and swapped in atomically.
    Same arguments give byte-identical annotation files. A folder that is not
    ours is never overwritten (``FileExistsError``). ``name`` is looked up in
    :data:`EMBEDDED_DATASETS` (an unknown one lists the registered sets).
    """
    spec = EMBEDDED_DATASETS.get(name)
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train} and {num_val}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    out = Path(out_dir)
    wanted = {
        "format": FORMAT,
        "name": name,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "seed": int(seed),
        "image_size": int(image_size),
        "generator_version": spec.version,
    }
    if _cache_ok(out, wanted, spec.file_ext):
        logger.info("reusing embedded data set %s at %s", name, out)
        return _paths(out)

    def fill(tmp: Path) -> dict[str, Any]:
        hashes = {}
        for split, count in (("train", num_train), ("val", num_val)):
            path = write_split(spec, tmp, split, count, seed, image_size)
            hashes[f"{split}.json"] = hashlib.sha256(path.read_bytes()).hexdigest()
        return {"class_names": list(spec.class_names), "sha256": hashes}

    logger.info(
        "generating embedded data set %s (%d train, %d val) in %s", name, num_train, num_val, out
    )
    build_atomically(out, wanted, fill)
    return _paths(out)
