"""The one typed structure every detector returns from ``forward_batch``.

Distillation losses, the detection loss and post-processing all read from
:class:`DetectorOutput`, so its layout is a contract:

* Head outputs stay **per level and unflattened** ``(N, A*X, H_l, W_l)``: feature
  imitation methods need the spatial grid, and it is what torchvision's head convs
  produce before their internal flattening.
* The channel index of ``cls_logits`` is ``a*K + k`` (anchor-major), the layout of
  torchvision's ``RetinaNetClassificationHead.cls_logits``.
* ``anchors`` are flat per image, ordered level-major, then ``h``, then ``w``, then
  ``a``. This is exactly the order of :func:`flatten_level` followed by a
  concatenation over levels, and the order torchvision's ``AnchorGenerator`` emits.
  Anchor-free heads (FCOS) store each point as a square box of side ``stride``
  centred on the point (torchvision's FCOS convention; the box size is the unit of
  FCOS's normalised regression targets). The point is the box centre.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Assignment", "DetectorOutput", "flatten_level", "flatten_levels"]


def flatten_level(x: Tensor, channels_per_anchor: int) -> Tensor:
    """``(N, A*X, H, W) -> (N, H*W*A, X)``: the anchor order used everywhere.

    Same permutation as torchvision's RetinaNet/FCOS heads perform internally.
    """
    n, c, h, w = x.shape
    a = c // channels_per_anchor
    return (
        x.view(n, a, channels_per_anchor, h, w)
        .permute(0, 3, 4, 1, 2)
        .reshape(n, -1, channels_per_anchor)
    )


def flatten_levels(xs: list[Tensor], channels_per_anchor: int) -> Tensor:
    """Flatten every level with :func:`flatten_level` and concatenate: ``(N, R, X)``."""
    return torch.cat([flatten_level(x, channels_per_anchor) for x in xs], dim=1)


class Assignment(NamedTuple):
    """What a detector's assigner decided for one batch.

    ``matched_idxs``: per image ``(R,)``, see :attr:`DetectorOutput.matched_idxs`.
    ``gt_ious``: per image ``(M, R)`` IoU of every ground-truth box with every
    anchor, where the assigner computes it anyway (RetinaNet, ATSS, GFL), so a
    method that ranks anchors by overlap (RM's top-k bags) need not compute it
    again; ``None`` for assigners that do not (FCOS).
    """

    matched_idxs: list[Tensor]
    gt_ious: list[Tensor] | None


@dataclass
class DetectorOutput:
    """Everything a one-stage detector computed on one batched tensor.

    Attributes:
        features: neck (FPN) features per level, ``(N, C, H_l, W_l)``.
        cls_logits: per level ``(N, A*K, H_l, W_l)``, channel ``a*K + k``.
        bbox_regression: per level ``(N, A*B, H_l, W_l)`` with ``B =
            box_code_size`` numbers per anchor in the detector's own encoding
            (RetinaNet/ATSS: 4 BoxCoder deltas, FCOS: 4 ltrb / stride, GFL:
            4 distributions over ``reg_max + 1`` distance bins).
        quality: per level ``(N, A, H_l, W_l)`` centerness/IoU logits, or ``None``
            for heads without a quality branch (RetinaNet).
        anchors: per image ``(R, 4)`` xyxy in batched-tensor pixels, ordered
            level, h, w, a. Anchor-free heads give stride-sized boxes centred on
            their points.
        image_sizes: per image ``(H, W)`` of the valid (unpadded) region.
        matched_idxs: per image ``(R,)`` int64 from the detector's own assigner:
            ``>= 0`` index of the positive's ground truth, ``-1`` background,
            ``-2`` ignored. ``None`` when no targets were given.
        gt_ious: per image ``(M, R)`` IoU of each ground truth with each anchor,
            when the assigner computed it (:class:`Assignment`), else ``None``.
        losses: detection loss terms by name; empty when no targets were given.
        tower_features: ``(cls, reg)`` per-level head tower features after the
            first ``keep_tower`` convs, when ``forward_batch`` was asked for them.
        box_code_size: ``B`` above.
    """

    features: list[Tensor]
    cls_logits: list[Tensor]
    bbox_regression: list[Tensor]
    quality: list[Tensor] | None
    anchors: list[Tensor]
    image_sizes: list[tuple[int, int]]
    matched_idxs: list[Tensor] | None = None
    gt_ious: list[Tensor] | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    tower_features: tuple[list[Tensor], list[Tensor]] | None = None
    box_code_size: int = 4
    # Each flat view, made once: the detection loss and the distillation terms
    # that read it share one tensor (and one backward through the flattening).
    _flat: dict[str, tuple[list[Tensor], Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def num_anchors_per_location(self) -> int:
        return self.bbox_regression[0].shape[1] // self.box_code_size

    @property
    def num_classes(self) -> int:
        return self.cls_logits[0].shape[1] // self.num_anchors_per_location

    def num_anchors_per_level(self) -> list[int]:
        """``H_l * W_l * A`` for every level (split sizes of the flat anchor axis)."""
        a = self.num_anchors_per_location
        return [x.shape[-2] * x.shape[-1] * a for x in self.cls_logits]

    def map_levels(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply ``fn`` to every per-level tensor (features, head outputs, towers), in place."""
        self.features = [fn(x) for x in self.features]
        self.cls_logits = [fn(x) for x in self.cls_logits]
        self.bbox_regression = [fn(x) for x in self.bbox_regression]
        if self.quality is not None:
            self.quality = [fn(x) for x in self.quality]
        if self.tower_features is not None:
            cls, reg = self.tower_features
            self.tower_features = ([fn(x) for x in cls], [fn(x) for x in reg])

    def flat_cls_logits(self) -> Tensor:
        """``(N, R, K)`` in the anchor order of :attr:`anchors` (made once, then shared)."""
        return self._flat_view("cls_logits", lambda x: flatten_levels(x, self.num_classes))

    def flat_bbox_regression(self) -> Tensor:
        """``(N, R, B)`` in the anchor order of :attr:`anchors` (made once, then shared)."""
        return self._flat_view("bbox_regression", lambda x: flatten_levels(x, self.box_code_size))

    def flat_quality(self) -> Tensor | None:
        """``(N, R)`` quality logits in anchor order, or ``None`` (made once, then shared)."""
        if self.quality is None:
            return None
        return self._flat_view("quality", lambda x: flatten_levels(x, 1).squeeze(-1))

    def _flat_view(self, name: str, flatten: Callable[[list[Tensor]], Tensor]) -> Tensor:
        levels = getattr(self, name)
        cached = self._flat.get(name)
        if cached is None or cached[0] is not levels:  # map_levels made new levels
            cached = self._flat[name] = (levels, flatten(levels))
        return cached[1]
