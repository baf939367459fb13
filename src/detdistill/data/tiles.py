"""Training on tiles: crops at native resolution, for large images with small objects.

Resizing a 2000 px aerial photograph to a 512 px training size shrinks a 20 px
tree crown to 5 px; a crop of 512 px keeps it at 20. :class:`TiledDataset`
serves ``per_image`` crops of every image per epoch:

* **Where.** With probability ``object_centred`` a crop is centred on a random
  object of the image (jittered by up to a quarter of the tile), else placed
  uniformly; either way it lies inside the image. Sparse scenes would
  otherwise give mostly empty crops. An image no larger than a tile is used
  whole.
* **Which boxes.** A box is kept when at least ``min_visible`` of its area
  lies inside the crop, clipped to the crop; the others are dropped (a sliver
  of an object is not a label a detector can learn from, and a crop border
  that cuts an object is not a detection error).
* **Determinism.** Positions come from torch's generator, which the trainer
  seeds per (run seed, epoch, sample index) (:class:`~detdistill.engine.
  sampling.SeededAugmentation`): the same run sees the same crops, and a
  resumed run the crops the interrupted one would have.

The teacher runs on the student's batch, so in distillation it sees exactly
the student's crop. Evaluation of a tiled model is sliced with the same window
(:mod:`detdistill.slicing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

__all__ = ["TileSettings", "TiledDataset", "crop_targets"]


@dataclass(frozen=True)
class TileSettings:
    """Crop side in pixels, crops per image per epoch, box visibility rule, placement."""

    size: int
    per_image: int = 4
    min_visible: float = 0.5
    object_centred: float = 0.5

    def __post_init__(self) -> None:
        if self.size < 1 or self.per_image < 1:
            raise ValueError("tile size and per_image must be >= 1")
        if not 0.0 < self.min_visible <= 1.0 or not 0.0 <= self.object_centred <= 1.0:
            raise ValueError("tile min_visible must be in (0, 1] and object_centred in [0, 1]")


def crop_targets(
    boxes: Tensor, labels: Tensor, window: tuple[int, int, int, int], min_visible: float
) -> tuple[Tensor, Tensor]:
    """Boxes (xyxy, image pixels) kept by the visibility rule, clipped, in window pixels."""
    x0, y0, x1, y1 = window
    clipped = torch.stack(
        [boxes[:, 0].clamp(x0, x1), boxes[:, 1].clamp(y0, y1),
         boxes[:, 2].clamp(x0, x1), boxes[:, 3].clamp(y0, y1)], dim=1,
    )  # fmt: skip
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1)
    visible = (clipped[:, 2:] - clipped[:, :2]).clamp(min=0).prod(dim=1)
    keep = (visible > 0) & (visible >= min_visible * area)
    shift = torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
    return clipped[keep] - shift, labels[keep]


def _start(length: int, size: int, centre: float | None) -> int:
    """A window start in ``[0, length - size]``: around ``centre`` when given, else uniform."""
    room = length - size
    if centre is None:
        return int(torch.randint(room + 1, ()).item())
    jitter = (torch.rand(()).item() - 0.5) * size / 2
    return int(min(max(round(centre - size / 2 + jitter), 0), room))


class TiledDataset(Dataset):
    """``per_image`` random tiles of every image of ``dataset`` (which must not resize).

    ``transforms`` run on each tile (flip, box sanitising); targets keep the
    source's ``image_id`` and ``orig_size`` and get the tile's ``size``.
    """

    def __init__(self, dataset: Dataset, settings: TileSettings, transforms: Any = None):
        self.dataset = dataset
        self.settings = settings
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.dataset) * self.settings.per_image  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def window(self, height: int, width: int, boxes: Tensor) -> tuple[int, int, int, int]:
        """Where the next tile of an image of this size lies (uses torch's generator)."""
        s = self.settings
        centre_x = centre_y = None
        if len(boxes) and torch.rand(()).item() < s.object_centred:
            box = boxes[int(torch.randint(len(boxes), ()).item())]
            centre_x, centre_y = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
        tile_w, tile_h = min(s.size, width), min(s.size, height)
        x0 = _start(width, tile_w, centre_x)
        y0 = _start(height, tile_h, centre_y)
        return x0, y0, x0 + tile_w, y0 + tile_h

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image, target = self.dataset[index // self.settings.per_image]
        height, width = int(image.shape[-2]), int(image.shape[-1])
        x0, y0, x1, y1 = self.window(height, width, target["boxes"])
        boxes, labels = crop_targets(
            target["boxes"], target["labels"], (x0, y0, x1, y1), self.settings.min_visible
        )
        tile = tv_tensors.Image(image[:, y0:y1, x0:x1])
        crop = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(y1 - y0, x1 - x0)),
                "labels": labels}  # fmt: skip
        if self.transforms is not None:
            tile, crop = self.transforms(tile, crop)
        tile = tile.as_subclass(Tensor)
        return tile, {
            **target,
            "boxes": crop["boxes"].as_subclass(Tensor).reshape(-1, 4),
            "labels": crop["labels"],
            "size": (int(tile.shape[-2]), int(tile.shape[-1])),
        }
