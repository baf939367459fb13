"""``detdistill eval``: COCO metrics of a saved detector on a data set of the user's choice."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import torch

from detdistill import jsonio
from detdistill.data import build_transforms
from detdistill.engine.builders import (
    DATA_FORMATS,
    LoadedModel,
    build_datasets,
    build_eval_loader,
    load_detector,
)
from detdistill.engine.config import registered
from detdistill.engine.distributed import resolve_device
from detdistill.errors import ConfigError
from detdistill.evaluation import evaluate
from detdistill.slicing import SlicedDetector, SliceSettings


class EvalData(NamedTuple):
    """A data set to evaluate on, how to describe it, and a short tag for file names."""

    dataset: Any
    description: str
    tag: str


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
    it: the model's data section pointed at ``data`` by the registered
    ``data_format`` (its ``from_path``: a COCO annotation file, a VOC root, a
    ``data.yaml``), read by the same reader as training. Either way the data
    set's classes must be the model's, or the error names them.
    ``native_size`` keeps the images at their own resolution (sliced evaluation)
    instead of resizing them to the model's training size.
    """
    if data is None:
        if images is not None:
            raise ConfigError("--images needs --data (a COCO annotation file)")
        if not loaded.has_data_section:
            raise ConfigError(
                "--data is needed: an Ultralytics checkpoint records no data set "
                "(pass its data.yaml with --format yolo, or a COCO annotation file)"
            )
        section, description, tag = (
            loaded.data,
            "the model's validation set (from its saved config)",
            "val",
        )
    else:
        found = registered(DATA_FORMATS, data_format, "--format")
        if found.from_path is None:
            raise ConfigError(
                f"--format {data_format}: this format is not read from one path; "
                "evaluate without --data to use the model's own data section"
            )
        path = Path(data)
        keys = found.from_path(path, None if images is None else Path(images), split)
        # The model's input size, whole images (a tiled model's tile side).
        section = dataclasses.replace(
            loaded.data,
            format=data_format,
            image_size=loaded.image_size,
            tiles=None,
            multiscale=[],
            **keys,
        )
        named_split = f" split `{split}`" if "val_split" in keys else ""
        description = f"{data_format} data `{path}`{named_split}"
        tag = f"{path.stem}_{split}" if named_split else path.stem
    dataset = build_datasets(section, train=False, class_names=loaded.class_names).val
    if native_size:
        dataset.transforms = build_transforms(False, None)
    return EvalData(dataset, description, tag)


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
    if out is not None and Path(out).is_dir():  # found before the evaluation, not after it
        raise ConfigError(f"--out {out} is a folder: give the JSON file's name")
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
    jsonio.write(out_path, payload, indent=2)
    return {**payload, "out": out_path}
