"""Inference on images: a :class:`Predictor` for code, :func:`run_predict` for the CLI.

Why a separate layer over ``model(images)``: users hold images as files, PIL
images, numpy arrays or tensors, want class names next to the labels, and want
a folder of mixed files processed without one corrupt JPEG ending the run. The
detector itself already returns boxes in each input image's original pixels
(its transform resizes, and maps the boxes back), so nothing here rescales.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from detdistill import jsonio
from detdistill.data.errors import ImageReadError
from detdistill.data.image_io import read_image
from detdistill.errors import ConfigError, DetDistillError
from detdistill.evaluation import coco_detections
from detdistill.slicing import SlicedDetector, SliceSettings

__all__ = [
    "IMAGE_EXTENSIONS",
    "NoImagesError",
    "PredictOptionError",
    "Predictor",
    "collect_images",
    "load",
    "run_predict",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_DRAWN_SUFFIXES = {".jpg": ".jpg", ".jpeg": ".jpg", ".png": ".png"}

ImageInput = str | Path | Image.Image | np.ndarray | Tensor


class NoImagesError(DetDistillError, FileNotFoundError):
    """The inputs hold no image that could be read (the CLI prints it as one line)."""


class PredictOptionError(ConfigError):
    """A bad threshold, batch size or detection count (a ``ValueError``; one CLI line)."""


def to_tensor(image: ImageInput) -> Tensor:
    """One image as a ``(3, H, W)`` float32 tensor in ``[0, 1]``.

    Accepts a path, a PIL image, an ``(H, W)``/``(H, W, C)`` array (uint8 in
    ``[0, 255]`` or float in ``[0, 1]``) or a ``(C, H, W)`` tensor (uint8 or float).
    Every route goes through the same uint8 -> float conversion, so one picture
    gives the same detections whichever way it is passed.
    """
    if isinstance(image, (str, Path)):
        image = read_image(image)
    elif isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, np.ndarray):
        array = image[:, :, None] if image.ndim == 2 else image
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"a numpy image must be (H, W) or (H, W, C) with C in 1, 3, 4; got {image.shape}"
            )
        image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    if not isinstance(image, Tensor):
        raise TypeError(
            f"cannot use a {type(image).__name__} as an image: pass a path, a PIL image, "
            "a numpy array or a tensor"
        )
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(
            f"an image tensor must be (C, H, W) with C in 1, 3, 4; got {tuple(image.shape)}"
        )
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    elif image.shape[0] == 4:  # RGBA: the detector was trained on RGB
        image = image[:3]
    if image.dtype == torch.uint8:
        return image.float().div_(255)
    if not image.is_floating_point():
        raise TypeError(f"image tensors must be uint8 or float, got {image.dtype}")
    return image.float()


def _as_list(images: ImageInput | Sequence[ImageInput]) -> tuple[list[ImageInput], bool]:
    """``(images, was_single)``; a 4-D tensor is a batch."""
    if isinstance(images, (list, tuple)):
        return list(images), False
    if isinstance(images, Tensor) and images.dim() == 4:
        return list(images.unbind(0)), False
    return [images], True


@dataclass
class Predictor:
    """A detector ready for inference, with its class names.

    ``predict`` returns per image ``{"boxes" (D, 4) xyxy, "scores" (D,),
    "labels" (D,), "names" [str]}`` on the CPU, boxes in the input image's own
    pixels, best first.
    """

    model: nn.Module
    class_names: list[str]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    category_ids: list[int] | None = None
    image_size: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def category_id(self, label: int) -> int:
        """COCO category id of a label: the checkpoint's ids when stored, else ``label + 1``."""
        return int(self.category_ids[label]) if self.category_ids else int(label) + 1

    @contextmanager
    def _settings(
        self, score_threshold: float | None, max_detections: int | None
    ) -> Iterator[None]:
        """Override the detector's thresholds for one call, restoring them after."""
        saved = (self.model.score_thresh, self.model.detections_per_img)
        if score_threshold is not None:
            self.model.score_thresh = float(score_threshold)
        if max_detections is not None:
            if max_detections < 1:
                raise PredictOptionError(f"max_detections must be >= 1, got {max_detections}")
            self.model.detections_per_img = int(max_detections)
        try:
            yield
        finally:
            self.model.score_thresh, self.model.detections_per_img = saved

    @torch.inference_mode()
    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        score_threshold: float | None = None,
        max_detections: int | None = None,
        slices: SliceSettings | None = None,
    ) -> list[dict[str, Any]]:
        """Detections for one image or a list (always a list of per-image dicts).

        ``score_threshold``/``max_detections`` default to the detector's own
        settings. ``slices`` runs the detector on overlapping windows of each
        image at its native resolution and merges them
        (:mod:`detdistill.slicing`), e.g. ``SliceSettings(size=512)`` for a
        model trained on 512 px tiles; boxes are still in the image's pixels.
        """
        items, _ = _as_list(images)
        if not items:
            return []
        tensors = [to_tensor(image).to(self.device) for image in items]
        model = self.model if slices is None else SlicedDetector(self.model, slices)
        with self._settings(score_threshold, max_detections):
            outputs = model(tensors)
        results = []
        for out in outputs:
            labels = out["labels"].cpu()
            results.append(
                {
                    "boxes": out["boxes"].float().cpu(),
                    "scores": out["scores"].float().cpu(),
                    "labels": labels,
                    "names": [self.class_names[i] for i in labels.tolist()],
                }
            )
        return results

    __call__ = predict


def load(checkpoint: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """A :class:`Predictor` from a training ``model.pt`` (student or any detector)."""
    from detdistill.engine.builders import load_detector

    device = torch.device(device)
    loaded = load_detector(checkpoint, map_location="cpu")
    model = loaded.model.to(device).eval()
    ids = loaded.payload.get("category_ids")
    return Predictor(
        model=model,
        class_names=list(loaded.class_names),
        device=device,
        category_ids=[int(i) for i in ids] if ids else None,
        image_size=loaded.image_size,
    )


# ---------------------------------------------------------------- batch runs
def collect_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """Files to run on, and files passed over with the reason.

    Folders are searched recursively for :data:`IMAGE_EXTENSIONS` (hidden files
    ignored); other files found there are listed as skipped, so nothing vanishes
    without a trace. A file named explicitly is always tried, whatever its
    extension. A path that does not exist is a typo, and an error.
    """
    files: list[Path] = []
    skipped: list[dict[str, str]] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        if path.is_file():
            files.append(path)
            continue
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            if any(part.startswith(".") for part in child.relative_to(path).parts):
                continue
            if child.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(child)
            else:
                skipped.append(
                    {
                        "file": str(child),
                        "reason": f"not an image extension ({child.suffix or 'none'})",
                    }
                )
    unique: dict[Path, Path] = {}  # the same file reached twice is run once
    for f in files:
        unique.setdefault(f.resolve(), f)
    return list(unique.values()), skipped


def _output_name(path: Path, used: set[str]) -> str:
    """``stem.jpg``/``stem.png`` (other formats drawn as PNG), unique within ``out``."""
    suffix = _DRAWN_SUFFIXES.get(path.suffix.lower(), ".png")
    name, i = f"{path.stem}{suffix}", 1
    while name in used:
        name, i = f"{path.stem}_{i}{suffix}", i + 1
    used.add(name)
    return name


def _draw(image: np.ndarray, det: dict[str, Any], out_file: Path) -> None:
    from torchvision.utils import draw_bounding_boxes

    canvas = torch.from_numpy(image).permute(2, 0, 1)
    if len(det["scores"]):
        labels = [f"{n} {s:.2f}" for n, s in zip(det["names"], det["scores"].tolist(), strict=True)]
        palette = ["red", "lime", "blue", "yellow", "cyan", "magenta", "orange", "white"]
        colors = [palette[int(i) % len(palette)] for i in det["labels"]]
        canvas = draw_bounding_boxes(canvas, det["boxes"], labels=labels, colors=colors, width=2)
    Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(out_file)


def _batches(files: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(files), size):
        yield files[start : start + size]


def run_predict(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out: Path,
    score_threshold: float = 0.3,
    max_detections: int = 100,
    batch_size: int = 8,
    show_progress: bool = True,
    device: str | torch.device = "cpu",
    slices: SliceSettings | None = None,
) -> dict[str, Any]:
    """Detect on files/folders; write drawn images, ``results.json`` and ``summary.json``.

    ``slices``: sliced prediction at native resolution (see :meth:`Predictor.predict`).

    ``results.json`` is a plain COCO results list (``image_id``, ``category_id``,
    ``bbox`` xywh, ``score``), loadable by pycocotools' ``loadRes``. ``summary.json``
    maps ``image_id`` to the file (``images``), ``category_id`` to the class
    (``categories``) and lists the ``skipped`` files with the reason. Unreadable
    files are logged and skipped; inputs with no readable image at all raise
    :class:`NoImagesError` (after writing both JSON files).

    Returns counts ``images``, ``detections``, ``skipped``, the ``out`` folder and
    the paths ``results``/``summary``.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise PredictOptionError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= score_threshold <= 1.0:
        raise PredictOptionError(f"score_threshold must be in [0, 1], got {score_threshold}")
    files, skipped = collect_images(inputs)
    if not files:
        raise NoImagesError(
            f"no image files in {', '.join(map(str, inputs))} "
            f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    predictor = load(checkpoint, device=device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    used: set[str] = set()
    bar = tqdm(total=len(files), unit="img", desc="predict", disable=not show_progress)
    for batch in _batches(files, batch_size):
        arrays, paths = [], []
        for path in batch:
            try:
                arrays.append(read_image(path))
                paths.append(path)
            except ImageReadError as exc:
                log.warning("skipping %s: %s", path, exc.reason)
                skipped.append({"file": str(path), "reason": exc.reason})
        detections = (
            predictor.predict(arrays, score_threshold, max_detections, slices) if arrays else []
        )
        for path, array, det in zip(paths, arrays, detections, strict=True):
            image_id = len(images) + 1
            name = _output_name(path, used)
            _draw(array, det, out / name)
            images.append(
                {
                    "id": image_id,
                    "file_name": str(path),
                    "output": name,
                    "height": int(array.shape[0]),
                    "width": int(array.shape[1]),
                }
            )
            category_ids = [predictor.category_id(label) for label in det["labels"].tolist()]
            results += coco_detections(image_id, det["boxes"], category_ids, det["scores"])
        bar.update(len(batch))
        bar.set_postfix(detections=len(results), skipped=len(skipped))
    bar.close()
    categories = [
        {"id": predictor.category_id(i), "name": n} for i, n in enumerate(predictor.class_names)
    ]
    results_file, summary_file = out / "results.json", out / "summary.json"
    jsonio.write(results_file, results)
    summary = {
        "checkpoint": str(checkpoint),
        "score_threshold": score_threshold,
        "max_detections": max_detections,
        "slices": None if slices is None else dataclasses.asdict(slices),
        "images": images,
        "categories": categories,
        "skipped": skipped,
    }
    jsonio.write(summary_file, summary, indent=2)
    if not images:
        raise NoImagesError(
            f"none of the {len(files)} input files could be read as an image; "
            f"reasons in {summary_file}"
        )
    return {
        "images": len(images),
        "detections": len(results),
        "skipped": len(skipped),
        "skipped_files": skipped,
        "out": out,
        "results": results_file,
        "summary": summary_file,
    }
