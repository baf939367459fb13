"""``detdistill eval``: COCO metrics of a saved detector on a data set of the user's choice."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from detdistill.data import CocoDetection, VOCDetection, YoloDetection, build_transforms
from detdistill.engine.builders import (
    LoadedModel,
    build_datasets,
    build_eval_loader,
    load_detector,
)
from detdistill.engine.config import registered
from detdistill.engine.distributed import resolve_device
from detdistill.errors import ConfigError
from detdistill.evaluation import evaluate
from detdistill.jsonio import dumps
from detdistill.registry import Registry
from detdistill.slicing import SlicedDetector, SliceSettings


class EvalData(NamedTuple):
    """A data set to evaluate on, how to describe it, and a short tag for file names."""

    dataset: Any
    description: str
    tag: str


def _images_dir(annotation_file: Path, images: str | Path | None) -> Path:
    if images is not None:
        return Path(images)
    for candidate in (annotation_file.parent / "images", annotation_file.parent):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no images folder next to {annotation_file}: pass --images")


#: How ``eval``/``analyze --data PATH --format NAME`` reads PATH: ``(data, images, split,
#: transforms, class names) -> EvalData``. A user's module adds one with
#: ``@register_eval_format("name")``; the CLI lists these names.
EvalReader = Callable[[Path, "str | Path | None", str, Any, list[str]], EvalData]
EVAL_FORMATS: Registry[EvalReader] = Registry("evaluation data format")
register_eval_format = EVAL_FORMATS.register


@register_eval_format("coco")
def _coco(data: Path, images, split: str, transforms: Any, class_names: list[str]) -> EvalData:
    """A COCO annotation file; images from ``images``, else ``images/`` beside it, else its folder."""
    dataset = CocoDetection(_images_dir(data, images), data, transforms, class_names=class_names)
    return EvalData(dataset, f"COCO `{data}`", data.stem)


@register_eval_format("voc")
def _voc(data: Path, images, split: str, transforms: Any, class_names: list[str]) -> EvalData:
    """A VOC directory and its ``split``."""
    dataset = VOCDetection(data, split, class_names=class_names, transforms=transforms)
    return EvalData(dataset, f"VOC `{data}` split `{split}`", f"{data.name}_{split}")


@register_eval_format("yolo")
def _yolo(data: Path, images, split: str, transforms: Any, class_names: list[str]) -> EvalData:
    """An Ultralytics ``data.yaml`` and its key ``split``."""
    if images is not None:
        raise ConfigError("--images is for COCO data: a data.yaml names its own image folders")
    dataset = YoloDetection(data, split, transforms, class_names=class_names)
    return EvalData(dataset, f"YOLO `{data}` split `{split}`", f"{data.stem}_{split}")


def evaluation_data(
    loaded: LoadedModel,
    data: str | Path | None = None,
    images: str | Path | None = None,
    data_format: str = "coco",
    split: str = "val",
    native_size: bool = False,
) -> EvalData:
    """The data set ``eval`` and ``analyze`` use for a saved model (one rule for both).

    Without ``data``: the validation set of the model's own saved config. With
    it: ``data`` read by the registered ``data_format`` (:data:`EVAL_FORMATS`).
    The data set's classes must be the model's, or the error names them.
    ``native_size`` keeps the images at their own resolution (sliced evaluation)
    instead of resizing them to the model's training size.
    """
    image_size = None if native_size else loaded.image_size
    if data is None:
        if images is not None:
            raise ConfigError("--images needs --data (a COCO annotation file)")
        dataset = build_datasets(loaded.data, train=False).val
        if native_size:
            dataset.transforms = build_transforms(False, None)
        return EvalData(dataset, "the model's validation set (from its saved config)", "val")
    read = registered(EVAL_FORMATS, data_format, "--format")
    return read(Path(data), images, split, build_transforms(False, image_size), loaded.class_names)


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path | None = None,
    images: str | Path | None = None,
    data_format: str = "coco",
    split: str = "val",
    batch_size: int = 16,
    out: str | Path | None = None,
    device: str = "auto",
    slices: SliceSettings | None = None,
) -> dict[str, Any]:
    """Metrics (and per-class AP) of ``checkpoint``; also written as JSON to ``out``.

    Without ``data`` the checkpoint's own validation set (from its saved config)
    is used. The data set's classes must be the model's, or the error names them.
    With ``slices`` the images stay at their native resolution, the model runs
    on overlapping windows whose detections are merged back into each image
    (:mod:`detdistill.slicing`), and COCOeval scores the whole images.
    """
    torch_device = resolve_device(device)
    loaded = load_detector(checkpoint, map_location=torch_device)
    model: torch.nn.Module = loaded.model.to(torch_device)
    dataset, _, name = evaluation_data(
        loaded, data, images, data_format, split, native_size=slices is not None
    )
    if slices is not None:
        model = SlicedDetector(model, slices, progress=True)
        batch_size, name = 1, f"{name}_sliced{slices.size}"
    loader = build_eval_loader(dataset, batch_size, num_workers=0)
    result = evaluate(model, loader, dataset, device=torch_device)
    out_path = Path(out) if out else Path(checkpoint).parent / f"metrics_{name}.json"
    payload = {
        "checkpoint": str(checkpoint),
        "data": str(data) if data else "checkpoint validation set",
        "slices": None if slices is None else dataclasses.asdict(slices),
        "images": len(dataset),
        "metrics": {k: result[k] for k in ("mAP", "AP50", "AP75", "APs", "APm", "APl")},
        "per_class": result.get("per_class", {}),
        "data_problems": dataset.problems.as_dict() if hasattr(dataset, "problems") else None,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(dumps(payload, indent=2) + "\n")
    return {**payload, "out": out_path}
