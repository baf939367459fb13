"""The common one-stage detector: transform -> backbone+FPN -> head -> DetectorOutput.

Every detector has exactly one forward path, :meth:`OneStageDetector.forward_batch`,
on an already normalised and batched tensor. ``forward`` only wraps it with
torchvision's ``GeneralizedRCNNTransform`` (and post-processing in eval mode). A
distiller can therefore run the teacher on the *student's* transformed batch and
compare like with like, level by level and anchor by anchor.

Subclasses provide the head (``head_forward``), the assigner (``assign``), the loss
(``compute_loss``) and the box decoding / scoring used by the shared
``postprocess``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import WeightsEnum
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops

from .anchors import default_anchor_scale, octave_anchor_sizes
from .backbones import BackboneFPN, build_backbone
from .output import Assignment, DetectorOutput, flatten_level

__all__ = ["OneStageDetector"]

_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]


def head_output(
    model: nn.Module,
    features: list[Tensor],
    image_sizes: list[tuple[int, int]],
    keep_tower: int | None = None,
) -> DetectorOutput:
    """A detector's head over its per-level neck features, as a :class:`DetectorOutput`.

    The one head pass of every family (``run_towers``, ``head_outputs``,
    ``make_anchors``). ``keep_tower=k`` also keeps both towers' features after
    their first ``k`` convs in ``output.tower_features`` (what CrossKD feeds
    the teacher).
    """
    tower_features = None
    if keep_tower is None:
        towers = model.run_towers(features, features)
    else:
        tower_features = model.run_towers(features, features, 0, keep_tower)
        towers = model.run_towers(*tower_features, keep_tower)
    cls_logits, bbox_regression, quality = model.head_outputs(*towers)
    return DetectorOutput(
        features=features,
        cls_logits=cls_logits,
        bbox_regression=bbox_regression,
        quality=quality,
        anchors=model.make_anchors(features, len(image_sizes)),
        image_sizes=[(int(h), int(w)) for h, w in image_sizes],
        tower_features=tower_features,
        box_code_size=model.box_code_size,
    )


class OneStageDetector(nn.Module):
    """Base class of RetinaNet, FCOS and ATSS.

    Args:
        num_classes: number of object classes ``K`` (no background class).
        backbone: a name from :func:`~detdistill.models.list_backbones` or a built
            :class:`~detdistill.models.backbones.BackboneFPN`.
        weights_backbone: ``None``, torchvision weights name/enum or a local file.
        backbone_kwargs: extra arguments of the body (e.g. ``{"width": 16}`` for tiny).
        levels: pyramid levels; stride of level ``l`` is ``2**l``.
        out_channels: neck width (default from the backbone).
        norm_layer, frozen_levels: see :func:`~detdistill.models.build_backbone`.
        min_size, max_size, image_mean, image_std, fixed_size: the
            ``GeneralizedRCNNTransform`` settings (torchvision defaults).
        size_divisible: padding multiple of the batch (torchvision's 32). A
            level whose stride does not divide the padded size gets
            ``ceil(size / stride)`` cells, as torchvision's P6/P7 do; anchors
            come from the known strides, so they stay exact.
        score_thresh, nms_thresh, detections_per_img, topk_candidates: inference.
    """

    head_type: str = ""
    # Whether the head predicts a quality (centerness/IoU) logit per anchor besides
    # the classes: what RM's score="quality" and CrossKD's quality term read.
    has_quality: bool = False
    # Numbers the regression branch predicts per anchor (GFL: 4 distributions).
    box_code_size: int = 4

    def __init__(
        self,
        num_classes: int,
        backbone: str | BackboneFPN = "resnet50",
        *,
        weights_backbone: str | os.PathLike | WeightsEnum | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        levels: tuple[int, ...] = (3, 4, 5, 6, 7),
        out_channels: int | None = None,
        norm_layer: str | None = None,
        frozen_levels: int = 0,
        min_size: int | tuple[int, ...] = 800,
        max_size: int = 1333,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        size_divisible: int = 32,
        fixed_size: tuple[int, int] | None = None,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 300,
        topk_candidates: int = 1000,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if isinstance(backbone, str):
            backbone = build_backbone(
                backbone,
                levels=levels,
                out_channels=out_channels,
                weights=weights_backbone,
                norm_layer=norm_layer,
                frozen_levels=frozen_levels,
                **(backbone_kwargs or {}),
            )
        self.backbone = backbone
        self.num_classes = num_classes
        self.strides: tuple[int, ...] = tuple(backbone.strides)
        self.levels: tuple[int, ...] = tuple(backbone.levels)
        self.out_channels: int = backbone.out_channels
        if size_divisible < 1:
            raise ValueError(f"size_divisible must be >= 1, got {size_divisible}")
        self.transform = GeneralizedRCNNTransform(
            min_size,
            max_size,
            image_mean or _IMAGENET_MEAN,
            image_std or _IMAGENET_STD,
            size_divisible=size_divisible,
            fixed_size=fixed_size,
        )
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates
        self.anchor_generator: AnchorGenerator  # set by subclasses
        self.num_anchors_per_location: int = 0  # set by subclasses

    # ----------------------------------------------------------- subclass API
    def head_towers(self) -> tuple[nn.Sequential, nn.Sequential]:
        """The classification and regression conv towers, shared over levels.

        Default: torchvision's layout (``head.classification_head.conv`` and
        ``head.regression_head.conv``), which every detector here uses.
        """
        return self.head.classification_head.conv, self.head.regression_head.conv

    def head_predict(
        self, cls_feature: Tensor, reg_feature: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The predictor layers on one level's tower outputs: ``(cls, bbox, quality)``."""
        raise NotImplementedError

    def assign(self, output: DetectorOutput, targets: list[dict[str, Tensor]]) -> Assignment:
        """Per image ``(R,)`` matched ground-truth index (``-1`` bg, ``-2`` ignored), and the IoUs."""
        raise NotImplementedError

    def compute_loss(
        self, output: DetectorOutput, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Detection losses, normalised by the number of positives (>= 1).

        Called by :meth:`forward_batch` after :meth:`assign` has filled
        ``output.matched_idxs``.
        """
        raise NotImplementedError

    def decode_boxes(self, rel_codes: Tensor, anchors: Tensor) -> Tensor:
        """``(n, B)`` regression codes + ``(n, 4)`` anchors -> ``(n, 4)`` xyxy boxes."""
        raise NotImplementedError

    def class_scores(self, cls_logits: Tensor, quality: Tensor | None) -> Tensor:
        """``(R, K)`` ranking scores of one image and level (sigmoid by default)."""
        return torch.sigmoid(cls_logits)

    # ------------------------------------------------------------ shared code
    def _init_anchor_generator(
        self, sizes: tuple[tuple[int, ...], ...], aspect_ratios: tuple[float, ...]
    ) -> None:
        self.anchor_generator = AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(sizes))
        # Plain attributes, so a distiller can check teacher/student anchors agree.
        self.anchor_sizes: tuple[tuple[int, ...], ...] = tuple(tuple(s) for s in sizes)
        self.aspect_ratios: tuple[float, ...] = tuple(float(r) for r in aspect_ratios)
        per_loc = set(self.anchor_generator.num_anchors_per_location())
        if len(per_loc) != 1:
            raise ValueError("every level needs the same number of anchors per location")
        self.num_anchors_per_location = per_loc.pop()

    def _init_octave_anchors(
        self,
        anchor_sizes: tuple[tuple[int, ...], ...] | None,
        anchor_scale: float | None,
        reference_scale: float,
        scales_per_octave: int,
        aspect_ratios: tuple[float, ...],
    ) -> None:
        """Anchors of ``anchor_scale`` strides per level (default: ``reference_scale``, the
        COCO value, scaled to the input size), ``scales_per_octave`` sizes each."""
        if anchor_sizes is None:
            if anchor_scale is None:
                anchor_scale = default_anchor_scale(
                    reference_scale, self.transform.max_size, max(self.strides)
                )
            anchor_sizes = octave_anchor_sizes(self.strides, anchor_scale, scales_per_octave)
        if len(anchor_sizes) != len(self.strides):
            raise ValueError(
                f"need anchor sizes for {len(self.strides)} levels, got {len(anchor_sizes)}"
            )
        self._init_anchor_generator(tuple(tuple(s) for s in anchor_sizes), aspect_ratios)

    def make_anchors(self, features: list[Tensor], num_images: int) -> list[Tensor]:
        """Anchors per image, from the known strides (not from padded-size division).

        Always float32: under autocast or a half-precision teacher, fp16 anchors
        would make IoUs of large boxes overflow.
        """
        dtype, device = torch.float32, features[0].device
        grid_sizes = [list(f.shape[-2:]) for f in features]
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.anchor_generator.set_cell_anchors(dtype, device)
        anchors = torch.cat(self.anchor_generator.grid_anchors(grid_sizes, strides))
        return [anchors] * num_images

    def neck_features(self, images: Tensor) -> list[Tensor]:
        """The features the head reads, one per level (backbone + FPN)."""
        return self.backbone(images)

    @property
    def feature_channels(self) -> tuple[int, ...]:
        """Width of each level's neck feature (one FPN width for every level)."""
        return (self.out_channels,) * len(self.strides)

    #: The head towers are shared over levels (torchvision's heads); tower
    #: adapters follow the towers (one per branch, or one per branch and level).
    towers_shared = True

    def tower_channels(self, convs: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(cls, reg)`` widths per level after the first ``convs`` tower convs."""
        return self.feature_channels, self.feature_channels

    def input_settings(self) -> dict[str, Any]:
        """The preprocessing teacher and student must share to see the same pixels."""
        transform = self.transform
        return {
            "image_mean": [float(x) for x in transform.image_mean],
            "image_std": [float(x) for x in transform.image_std],
            "min_size": tuple(transform.min_size),
            "max_size": transform.max_size,
            "size_divisible": transform.size_divisible,
        }

    @property
    def tower_depth(self) -> int:
        """Convs in each head tower (both towers have the same depth)."""
        return sum(isinstance(m, nn.Conv2d) for m in self.head_towers()[0].modules())

    def run_towers(
        self,
        cls_feats: list[Tensor],
        reg_feats: list[Tensor],
        start: int = 0,
        stop: int | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Tower convs ``start:stop`` (with their norm and activation) on per-level inputs.

        With ``start=0`` both inputs are the neck features. A distillation
        method can enter the *teacher's* towers at a later conv with the
        student's intermediate head features (CrossKD). Counted in convs:
        torchvision's RetinaNet v2 tower holds one module per conv, its FCOS
        tower three (conv, norm, ReLU).
        """
        depth = self.tower_depth
        stop = depth if stop is None else stop
        if not 0 <= start <= stop <= depth:
            raise ValueError(f"tower convs {start}:{stop} out of range for a tower of {depth}")
        towers = []
        for tower in self.head_towers():
            per_conv = len(tower) // depth if depth else 0
            towers.append(tower[start * per_conv : stop * per_conv])
        cls_tower, reg_tower = towers
        return [cls_tower(f) for f in cls_feats], [reg_tower(f) for f in reg_feats]

    def head_outputs(
        self, cls_feats: list[Tensor], reg_feats: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
        """Per-level ``(cls_logits, bbox_regression, quality)`` from the towers' outputs."""
        per_level = [self.head_predict(c, r) for c, r in zip(cls_feats, reg_feats, strict=True)]
        cls_logits, bbox_regression, quality = (list(x) for x in zip(*per_level, strict=True))
        return cls_logits, bbox_regression, None if quality[0] is None else quality

    def head_forward(
        self, features: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
        """Per-level ``(cls_logits, bbox_regression, quality)``, unflattened."""
        return self.head_outputs(*self.run_towers(features, features))

    def forward_batch(
        self,
        images: Tensor,
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
        keep_tower: int | None = None,
    ) -> DetectorOutput:
        """The one forward path on a batched tensor (targets in its coordinates).

        With ``targets`` the assigner runs and ``matched_idxs``/``losses`` are filled.
        ``keep_tower=k`` also keeps both towers' features after their first
        ``k`` convs in ``output.tower_features`` (what CrossKD feeds the teacher).
        """
        if images.dim() != 4 or len(image_sizes) != images.shape[0]:
            raise ValueError(
                f"expected images (N, C, H, W) and N image sizes, got {tuple(images.shape)} and {len(image_sizes)}"
            )
        features = self.neck_features(images)
        if len(features) != len(self.strides):
            raise RuntimeError(
                f"backbone returned {len(features)} levels, expected {len(self.strides)}"
            )
        output = head_output(self, features, image_sizes, keep_tower)
        if targets is not None:
            if len(targets) != images.shape[0]:
                raise ValueError(f"got {len(targets)} targets for {images.shape[0]} images")
            assignment = self.assign(output, targets)
            if not isinstance(assignment, Assignment):
                raise TypeError(
                    f"{type(self).__name__}.assign must return an Assignment(matched_idxs, "
                    f"gt_ious), got {type(assignment).__name__}"
                )
            output.matched_idxs, output.gt_ious = assignment
            output.losses = self.compute_loss(output, targets)
        return output

    def check_targets(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> None:
        """Raise ``ValueError`` naming the first bad target: the checks of every training path."""
        if len(targets) != len(images):
            raise ValueError(f"got {len(targets)} targets for {len(images)} images")
        for i, t in enumerate(targets):
            boxes, labels = t.get("boxes"), t.get("labels")
            if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
                raise ValueError(
                    f"target {i}: boxes must be a (M, 4) tensor, got {getattr(boxes, 'shape', boxes)}"
                )
            if not isinstance(labels, Tensor) or labels.shape != boxes.shape[:1]:
                raise ValueError(f"target {i}: labels must be a (M,) tensor matching boxes")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"target {i}: labels must lie in [0, {self.num_classes}), got {labels.tolist()}"
                )
            degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
            if degenerate.any():
                bad = boxes[degenerate][0].tolist()
                raise ValueError(f"target {i}: boxes need positive width and height, found {bad}")

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> DetectorOutput | list[dict[str, Tensor]]:
        """Train mode: ``DetectorOutput`` with losses. Eval mode: detections per image.

        Eval detections are in each input image's original pixel coordinates with
        labels in ``[0, num_classes)``.
        """
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            self.check_targets(images, targets)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets_t = self.transform(images, targets if self.training else None)
        output = self.forward_batch(image_list.tensors, image_list.image_sizes, targets_t)
        if self.training:
            return output
        detections = self.postprocess(output)
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    @torch.no_grad()
    def postprocess(self, output: DetectorOutput) -> list[dict[str, Tensor]]:
        """Score threshold, per-level top-k, decoding, clipping and class-wise NMS.

        Boxes are in batched-tensor coordinates (torchvision's RetinaNet/FCOS logic).
        """
        k = self.num_classes
        cls = [flatten_level(c.float(), k) for c in output.cls_logits]
        reg = [flatten_level(r.float(), self.box_code_size) for r in output.bbox_regression]
        qual = (
            None
            if output.quality is None
            else [flatten_level(q.float(), 1)[..., 0] for q in output.quality]
        )
        sizes = output.num_anchors_per_level()
        results: list[dict[str, Tensor]] = []
        for i, image_size in enumerate(output.image_sizes):
            all_boxes, all_scores, all_labels = [], [], []
            for lv, anchors in enumerate(output.anchors[i].split(sizes)):
                scores = self.class_scores(
                    cls[lv][i], None if qual is None else qual[lv][i]
                ).flatten()
                keep = torch.where(scores > self.score_thresh)[0]
                scores = scores[keep]
                scores, order = scores.topk(min(self.topk_candidates, scores.numel()))
                keep = keep[order]
                anchor_idx = torch.div(keep, k, rounding_mode="floor")
                boxes = self.decode_boxes(reg[lv][i][anchor_idx], anchors[anchor_idx])
                all_boxes.append(box_ops.clip_boxes_to_image(boxes, image_size))
                all_scores.append(scores)
                all_labels.append(keep % k)
            boxes, scores, labels = (
                torch.cat(all_boxes),
                torch.cat(all_scores),
                torch.cat(all_labels),
            )
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[
                : self.detections_per_img
            ]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results
