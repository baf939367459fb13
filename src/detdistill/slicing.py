"""Sliced inference: run a detector on overlapping windows of a large image and merge.

A detector trained on 512 px tiles finds 20 px objects in a 5000 px aerial
photograph only if it sees the photograph at its native resolution, one window
at a time (Akyon et al., "Slicing Aided Hyper Inference", ICIP 2022). Here:

* **Windows.** Squares of ``size`` pixels; neighbours share ``overlap * size``
  pixels, and the last window of a row or column is flush with the image's
  edge, so every pixel is covered and no window hangs off the image. An image
  smaller than a window is one window.
* **Detection.** Each window runs through the detector in batches; its boxes
  are shifted by the window's origin into the original image's pixels. With
  ``full_image`` the whole image (resized as the detector resizes) runs too,
  for objects larger than a window.
* **Merge.** ``ios`` (default): greedy class-wise suppression by intersection
  over the *smaller* box, SAHI's match metric. A window border cuts an object
  into a piece that lies inside the whole object seen by the overlapping
  window; their IoU can be 0.5 or less, so IoU-based NMS keeps both, while
  their IoS is 1. ``nms``: torchvision's class-wise IoU NMS.

Written on torchvision ops rather than on ``sahi``: ``sahi`` wraps models in its
own ``DetectionModel`` interface and brings OpenCV and Shapely with it, for what
is window arithmetic and one suppression loop here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_area
from tqdm.auto import tqdm

__all__ = ["SliceSettings", "SlicedDetector", "slice_windows", "window_starts"]

Merge = Literal["ios", "nms"]


@dataclass(frozen=True)
class SliceSettings:
    """How to slice: window side, shared fraction, whole-image pass, merge, batch."""

    size: int
    overlap: float = 0.2
    full_image: bool = True
    merge: Merge = "ios"
    match_threshold: float = 0.5
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"slice size must be >= 1 pixel, got {self.size}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"slice overlap must be in [0, 1), got {self.overlap}")
        if self.merge not in ("ios", "nms"):
            raise ValueError(f"slice merge must be 'ios' or 'nms', got {self.merge!r}")
        if not 0.0 < self.match_threshold <= 1.0 or self.batch_size < 1:
            raise ValueError("slice match_threshold must be in (0, 1] and batch_size >= 1")


def window_starts(length: int, size: int, overlap: float) -> list[int]:
    """Starts of the windows along one side: step ``size * (1 - overlap)``, last one flush."""
    if length <= size:
        return [0]
    step = max(1, int(size * (1.0 - overlap)))
    starts = list(range(0, length - size, step))
    return [*starts, length - size]


def slice_windows(height: int, width: int, size: int, overlap: float) -> Tensor:
    """``(n, 4)`` windows ``x0, y0, x1, y1`` covering an image, row by row."""
    rows = window_starts(height, size, overlap)
    cols = window_starts(width, size, overlap)
    return torch.tensor(
        [[x, y, min(x + size, width), min(y + size, height)] for y in rows for x in cols],
        dtype=torch.int64,
    )


def _suppress_by_ios(boxes: Tensor, scores: Tensor, labels: Tensor, threshold: float) -> Tensor:
    """Greedy class-wise suppression by intersection over the smaller box; kept indices, best first.

    Class by class, so the pairwise matrix is one class's boxes squared, not all
    boxes squared (a 2048 px image in 64 windows has up to 6400 detections).
    """
    kept = []
    for label in labels.unique():
        index = torch.nonzero(labels == label).squeeze(1)
        index = index[scores[index].argsort(descending=True)]
        box = boxes[index]
        top_left = torch.maximum(box[:, None, :2], box[None, :, :2])
        bottom_right = torch.minimum(box[:, None, 2:], box[None, :, 2:])
        inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
        area = box_area(box)
        ios = inter / torch.minimum(area[:, None], area[None, :]).clamp(min=1e-6)
        suppresses = (ios > threshold).triu(diagonal=1)  # a box only suppresses lower scores
        keep = torch.ones(len(index), dtype=torch.bool, device=boxes.device)
        for i in range(len(index)):
            if keep[i]:
                keep &= ~suppresses[i]
        kept.append(index[keep])
    if not kept:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    kept_index = torch.cat(kept)
    return kept_index[scores[kept_index].argsort(descending=True)]


def merge_detections(
    boxes: Tensor, scores: Tensor, labels: Tensor, merge: Merge, threshold: float
) -> Tensor:
    """Indices kept, best first (see the module docstring for the two rules)."""
    if merge == "nms":
        return batched_nms(boxes, scores, labels, threshold)
    return _suppress_by_ios(boxes, scores, labels, threshold)


class SlicedDetector(nn.Module):
    """A detector that answers like the wrapped one, but window by window.

    ``forward(images)`` takes images at their native resolution and returns,
    per image, ``boxes`` (in that image's pixels), ``scores`` and ``labels``,
    at most the detector's ``detections_per_img``. It can stand wherever the
    detector's eval mode does: :func:`detdistill.evaluation.evaluate` and
    :class:`detdistill.predict.Predictor` use it for sliced evaluation and
    prediction.
    """

    def __init__(self, detector: nn.Module, settings: SliceSettings, progress: bool = False):
        super().__init__()
        self.detector = detector
        self.settings = settings
        self.progress = progress

    @torch.inference_mode()
    def detect(self, image: Tensor) -> dict[str, Tensor]:
        """Sliced detections of one ``(3, H, W)`` image."""
        s = self.settings
        height, width = int(image.shape[-2]), int(image.shape[-1])
        windows = slice_windows(height, width, s.size, s.overlap)
        found: list[dict[str, Tensor]] = []
        batches = range(0, len(windows), s.batch_size)
        bar = tqdm(batches, desc="windows", unit="batch", disable=not self.progress or None)
        for start in bar:
            chunk = windows[start : start + s.batch_size]
            crops = [image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in chunk.tolist()]
            for (x0, y0, _, _), out in zip(chunk.tolist(), self.detector(crops), strict=True):
                shift = torch.tensor([x0, y0, x0, y0], dtype=out["boxes"].dtype)
                found.append({**out, "boxes": out["boxes"] + shift.to(out["boxes"].device)})
        if s.full_image and len(windows) > 1:
            found.extend(self.detector([image]))
        if len(found) == 1:  # one window, the whole image: nothing to merge across windows
            return {k: found[0][k] for k in ("boxes", "scores", "labels")}
        boxes = torch.cat([f["boxes"] for f in found])
        scores = torch.cat([f["scores"] for f in found])
        labels = torch.cat([f["labels"] for f in found])
        keep = merge_detections(boxes, scores, labels, s.merge, s.match_threshold)
        keep = keep[: getattr(self.detector, "detections_per_img", len(keep))]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}

    def forward(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        self.detector.eval()
        return [self.detect(image) for image in images]
