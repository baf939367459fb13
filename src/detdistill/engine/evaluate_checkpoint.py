"""``detdistill eval``: COCO metrics of a saved detector on a data set of the user's choice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from detdistill.data import CocoDetection, VOCDetection, build_transforms
from detdistill.engine.builders import build_datasets, build_eval_loader, load_detector
from detdistill.engine.distributed import resolve_device
from detdistill.evaluation import evaluate


def _default_images_dir(annotation_file: Path) -> Path:
    for candidate in (annotation_file.parent / "images", annotation_file.parent):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no images folder next to {annotation_file}: pass --images")


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path | None = None,
    images: str | Path | None = None,
    data_format: str = "coco",
    split: str = "val",
    batch_size: int = 16,
    out: str | Path | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Metrics (and per-class AP) of ``checkpoint``; also written as JSON to ``out``.

    Without ``data`` the checkpoint's own validation set (from its saved config)
    is used. The data set's classes must be the model's, or the error names them.
    """
    torch_device = resolve_device(device)
    loaded = load_detector(checkpoint, map_location=torch_device)
    model = loaded.model.to(torch_device)
    transforms = build_transforms(False, loaded.image_size)
    if data is None:
        dataset = build_datasets(loaded.data, train=False).val
        name = "val"
    elif data_format == "voc":
        dataset = VOCDetection(data, split, class_names=loaded.class_names, transforms=transforms)
        name = f"{Path(data).name}_{split}"
    else:
        annotation_file = Path(data)
        images_dir = Path(images) if images else _default_images_dir(annotation_file)
        dataset = CocoDetection(
            images_dir, annotation_file, transforms, class_names=loaded.class_names
        )
        name = annotation_file.stem
    loader = build_eval_loader(dataset, batch_size, num_workers=0)
    result = evaluate(model, loader, dataset, device=torch_device)
    out_path = Path(out) if out else Path(checkpoint).parent / f"metrics_{name}.json"
    payload = {
        "checkpoint": str(checkpoint),
        "data": str(data) if data else "checkpoint validation set",
        "images": len(dataset),
        "metrics": {k: result[k] for k in ("mAP", "AP50", "AP75", "APs", "APm", "APl")},
        "per_class": result.get("per_class", {}),
        "data_problems": dataset.problems.as_dict() if hasattr(dataset, "problems") else None,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(payload, indent=2) + "\n")
    return {**payload, "out": out_path}
