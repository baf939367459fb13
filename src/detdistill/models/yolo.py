"""Ultralytics YOLOv8 / YOLO11 / YOLO26 as a detdistill detector (the ``yolo`` family).

Most one-stage detectors in use are Ultralytics YOLO models. This module wraps
one, built from an Ultralytics model YAML (or with the weights of a user's
``best.pt``), behind the interface every detdistill detector has: one
``forward_batch`` that returns a :class:`~detdistill.models.output.DetectorOutput`,
so every distillation method runs on it unchanged. Ultralytics is AGPL-3.0 and
an optional extra (``pip install "detdistill[yolo]"``): it is imported only
when a YOLO model is built, and only its public modules are *called* here.

How the YOLO head maps onto the output contract:

* ``features``: the Detect head's inputs, one per level (P3-P5). Their widths
  differ by level (e.g. 64/128/256), so adapters are per level
  (:attr:`YOLODetector.feature_channels`).
* ``cls_logits``: per level ``(N, K, H, W)`` (one "anchor" per location).
* ``bbox_regression``: per level ``(N, 4 * reg_max, H, W)``: four side
  distributions over ``reg_max`` bins for v8/11 (side-major, as GFL's), the
  raw four distances for YOLO26 (``reg_max = 1``).
* ``anchors``: each grid point as a stride-sized box centred on it (FCOS's
  convention), so ``(x + 0.5) * stride`` is Ultralytics' anchor point.
* ``matched_idxs`` and ``losses``: Ultralytics' own criterion for the model
  (``v8DetectionLoss``, or ``E2ELoss`` for YOLO26's dual head), called through
  ``get_assigned_targets_and_loss``; its task-aligned assigner's ``fg_mask``
  and ``target_gt_idx`` are the assignment. The terms are Ultralytics' loss
  items times the batch size, so their sum *is* Ultralytics' training loss.

YOLO26 keeps a one-to-one branch on *detached* features: it is trained by the
criterion but distillation reads the one-to-many branch, which is the one that
reaches the backbone. Inference follows Ultralytics' validation by default:
the one-to-many branch, confidence 0.001, class-wise NMS at IoU 0.7 with
multiple labels per box, at most 300 detections. Preprocessing is
Ultralytics': RGB in [0, 1] (pixels / 255), letterboxed to a square of
``image_size`` with grey (114) centred padding.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from detdistill.errors import DetDistillError

from .base import OneStageDetector, head_output
from .output import DetectorOutput
from .registry import register_detector

__all__ = ["LetterboxTransform", "MissingExtraError", "YOLODetector"]

log = logging.getLogger("detdistill.models")

_PAD_VALUE = 114 / 255


class MissingExtraError(DetDistillError, ImportError):
    """An optional dependency is not installed; the message names the extra."""


def import_ultralytics() -> Any:
    """Import ``ultralytics`` offline (no weights or fonts fetched), or say which extra to install."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    try:
        import ultralytics
    except ImportError as exc:
        raise MissingExtraError(
            "the yolo detector needs Ultralytics: pip install 'detdistill[yolo]' "
            "(ultralytics is AGPL-3.0)"
        ) from exc
    return ultralytics


class LetterboxTransform(nn.Module):
    """Ultralytics' preprocessing: keep the aspect ratio, fit the long side, pad centred.

    Images come in as float RGB in [0, 1] (the data sets' convention, which is
    Ultralytics' pixels / 255). Each is resized so its long side is ``size``
    (bilinear) and padded to ``size x size`` with grey 114/255, the padding
    split evenly between both sides as Ultralytics' ``LetterBox(center=True)``
    does. Targets are moved into the padded frame; :meth:`postprocess` maps
    detections back to each original image and clips them there, as
    Ultralytics does after NMS.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        if size < 32 or size % 32:
            raise ValueError(f"yolo image size must be a multiple of 32 (>= 32), got {size}")
        self.size = size

    def settings(self) -> dict[str, Any]:
        """What teacher and student must agree on to see the same pixels."""
        return {"preprocessing": "letterbox", "size": self.size, "scale": "1/255"}

    def geometry(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(new_h, new_w, top, left)`` of one image's letterbox."""
        gain = self.size / max(height, width)
        new_h, new_w = round(height * gain), round(width * gain)
        top = round((self.size - new_h) / 2 - 0.1)
        left = round((self.size - new_w) / 2 - 0.1)
        return new_h, new_w, top, left

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        batch = images[0].new_full((len(images), 3, self.size, self.size), _PAD_VALUE)
        moved = None if targets is None else []
        for i, image in enumerate(images):
            h, w = image.shape[-2:]
            new_h, new_w, top, left = self.geometry(h, w)
            if (new_h, new_w) != (h, w):
                image = F.interpolate(
                    image[None], size=(new_h, new_w), mode="bilinear", align_corners=False
                )[0]
            batch[i, :, top : top + new_h, left : left + new_w] = image
            if targets is not None:
                target = dict(targets[i])
                boxes = target["boxes"]
                scale = boxes.new_tensor([new_w / w, new_h / h] * 2)
                target["boxes"] = boxes * scale + boxes.new_tensor([left, top, left, top])
                moved.append(target)
        sizes = [(self.size, self.size)] * len(images)
        return ImageList(batch, sizes), moved

    def postprocess(
        self,
        detections: list[dict[str, Tensor]],
        image_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Boxes from the padded frame back to each original image, clipped to it."""
        del image_sizes  # every image has the same padded frame
        out = []
        for det, (h, w) in zip(detections, original_sizes, strict=True):
            new_h, new_w, top, left = self.geometry(h, w)
            boxes = det["boxes"] - torch.tensor([left, top, left, top]).to(det["boxes"])
            boxes = boxes / torch.tensor([new_w / w, new_h / h] * 2).to(boxes)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            out.append({**det, "boxes": boxes})
        return out


def _model_yaml(cfg: str | dict, scale: str | None, depth: float | None, width: float | None,
                max_channels: int | None) -> dict:  # fmt: skip
    """The model dict of an Ultralytics YAML with a named or custom scale."""
    from ultralytics.nn.tasks import yaml_model_load

    if isinstance(cfg, dict):
        spec = copy.deepcopy(cfg)
    else:
        try:
            spec = yaml_model_load(cfg)
        except FileNotFoundError as exc:
            raise DetDistillError(f"yolo cfg {cfg!r}: no such Ultralytics model YAML") from exc
    custom = (depth, width, max_channels)
    if any(v is not None for v in custom):
        named = spec.get("scales", {}).get(scale or spec.get("scale") or "n")
        base = list(named) if named else [1.0, 1.0, 1024]
        values = [v if v is not None else b for v, b in zip(custom, base, strict=True)]
        spec["scales"] = {"custom": values}
        spec["scale"] = "custom"
    elif scale is not None:
        if scale not in spec.get("scales", {}):
            raise DetDistillError(
                f"yolo scale {scale!r} is not in {cfg!r}; scales: {', '.join(spec.get('scales', {}))}"
            )
        spec["scale"] = scale
    return spec


def _checkpoint_model(payload: Any) -> nn.Module | None:
    """The model an Ultralytics checkpoint holds (its EMA when it kept one)."""
    if not isinstance(payload, dict):
        return None
    model = payload.get("ema") or payload.get("model")
    return model if isinstance(model, nn.Module) else None


@register_detector("yolo")
class YOLODetector(nn.Module):
    """An Ultralytics YOLO detection model with detdistill's detector interface.

    Args:
        num_classes: number of classes ``K``.
        cfg: an Ultralytics model YAML (name such as ``"yolo11n.yaml"``, a
            path, or the model dict itself; the scale letter in the name picks
            the scale, as in Ultralytics).
        scale: a named scale of the YAML (``"n"``, ``"s"``, ...).
        depth, width, max_channels: a custom scale (a student smaller than
            ``n``: e.g. ``depth=0.25, width=0.0625``); unset values come from
            the named scale.
        image_size: the square letterbox side (a multiple of 32).
        score_thresh, nms_thresh, detections_per_img: inference (Ultralytics'
            validation defaults).

    The YAML's backbone and neck replace ``model.backbone``; weights of an
    Ultralytics checkpoint load with :meth:`load_ultralytics_weights`.
    """

    head_type = "yolo"
    has_quality = False
    num_anchors_per_location = 1
    #: The YAML defines the backbone: a config's backbone keys do not apply.
    builds_own_backbone = True

    def __init__(
        self,
        num_classes: int,
        cfg: str | dict = "yolo11n.yaml",
        *,
        scale: str | None = None,
        depth: float | None = None,
        width: float | None = None,
        max_channels: int | None = None,
        image_size: int = 640,
        score_thresh: float = 0.001,
        nms_thresh: float = 0.7,
        detections_per_img: int = 300,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        import_ultralytics()
        from ultralytics.cfg import get_cfg
        from ultralytics.nn.tasks import DetectionModel
        from ultralytics.utils import DEFAULT_CFG

        spec = _model_yaml(cfg, scale, depth, width, max_channels)
        self.model = DetectionModel(spec, nc=num_classes, verbose=False)
        # The criterion reads its gains (box, cls, dfl) and epochs from model.args.
        self.model.args = get_cfg(DEFAULT_CFG)
        self.num_classes = num_classes
        self.transform = LetterboxTransform(image_size)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self._criterion: Any = None

    # ------------------------------------------------------------ structure
    @property
    def detect(self) -> nn.Module:
        """Ultralytics' Detect head (the last module of the model)."""
        return self.model.model[-1]

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.detect.stride.tolist())

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(int(math.log2(s)) for s in self.strides)

    @property
    def end2end(self) -> bool:
        """True for heads with a one-to-one branch (YOLO26)."""
        return getattr(self.detect, "one2one_cv2", None) is not None

    @property
    def box_code_size(self) -> int:
        return 4 * self.detect.reg_max

    @property
    def reg_max(self) -> int | None:
        """The largest distance bin (GFL's meaning), or ``None`` without distributions (YOLO26)."""
        return self.detect.reg_max - 1 if self.detect.reg_max > 1 else None

    @property
    def feature_channels(self) -> tuple[int, ...]:
        """Width of each level's neck feature (the Detect head's inputs)."""
        return tuple(branch[0].conv.in_channels for branch in self.detect.cv2)

    # The towers are per level, not shared: tower adapters follow them.
    towers_shared = False
    tower_depth = 2

    def tower_channels(self, convs: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(cls, reg)`` widths per level after the first ``convs`` tower convs."""
        if convs == 0:
            return self.feature_channels, self.feature_channels
        cls = tuple(branch[-1].in_channels for branch in self.detect.cv3)
        reg = tuple(branch[-1].in_channels for branch in self.detect.cv2)
        return cls, reg

    def input_settings(self) -> dict[str, Any]:
        return self.transform.settings()

    check_targets = OneStageDetector.check_targets

    # ------------------------------------------------------------- forward
    def neck_features(self, images: Tensor) -> list[Tensor]:
        """The Detect head's inputs: the model's layer graph run up to the head."""
        outputs: list[Tensor | None] = []
        x: Any = images
        for module in self.model.model[:-1]:
            if module.f != -1:
                x = outputs[module.f] if isinstance(module.f, int) else [
                    x if j == -1 else outputs[j] for j in module.f
                ]  # fmt: skip
            x = module(x)
            outputs.append(x if module.i in self.model.save else None)
        head_from = self.detect.f
        return [x if j == -1 else outputs[j] for j in head_from]

    def run_towers(
        self,
        cls_feats: list[Tensor],
        reg_feats: list[Tensor],
        start: int = 0,
        stop: int | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Each level's own tower convs ``start:stop`` (the final 1x1 predictors excluded)."""
        stop = self.tower_depth if stop is None else stop
        if not 0 <= start <= stop <= self.tower_depth:
            raise ValueError(f"tower convs {start}:{stop} out of range for a tower of 2")
        cls = [self.detect.cv3[i][start:stop](f) for i, f in enumerate(cls_feats)]
        reg = [self.detect.cv2[i][start:stop](f) for i, f in enumerate(reg_feats)]
        return cls, reg

    def head_outputs(
        self, cls_feats: list[Tensor], reg_feats: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], None]:
        """Per-level ``(cls_logits, bbox_regression, None)`` from the towers' outputs."""
        cls = [self.detect.cv3[i][-1](f) for i, f in enumerate(cls_feats)]
        reg = [self.detect.cv2[i][-1](f) for i, f in enumerate(reg_feats)]
        return cls, reg, None

    def make_anchors(self, features: list[Tensor], num_images: int) -> list[Tensor]:
        """Each grid point as a stride-sized box centred on ``(x + 0.5) * stride``, level-major."""
        boxes = []
        for f, s in zip(features, self.strides, strict=True):
            h, w = f.shape[-2:]
            ys, xs = torch.meshgrid(
                torch.arange(h, device=f.device, dtype=torch.float32),
                torch.arange(w, device=f.device, dtype=torch.float32),
                indexing="ij",
            )
            corners = torch.stack([xs, ys, xs + 1, ys + 1], dim=-1).reshape(-1, 4) * s
            boxes.append(corners)
        return [torch.cat(boxes)] * num_images

    def forward_batch(
        self,
        images: Tensor,
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
        keep_tower: int | None = None,
    ) -> DetectorOutput:
        """The one forward path on a letterboxed batch (targets in its pixels)."""
        output = head_output(self, self.neck_features(images), image_sizes, keep_tower)
        if targets is not None:
            self._fill_loss(output, images, targets)
        return output

    # ---------------------------------------------------------------- loss
    @property
    def criterion(self) -> Any:
        """Ultralytics' own criterion for this model (built once, as its trainer does)."""
        if self._criterion is None:
            self._criterion = self.model.init_criterion()
        return self._criterion

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Before epoch ``epoch`` (0-based) of ``epochs``: YOLO26's loss moves its mix by epoch.

        Ultralytics' ``E2ELoss`` weighs the one-to-many branch ``0.8`` at the
        start, decaying linearly to ``0.1`` at the last epoch; its trainer
        steps it after each epoch. Calling this at every epoch start (and on
        resume) gives the same weights; other heads ignore it.
        """
        self.model.args.epochs = epochs
        criterion = self.criterion
        if hasattr(criterion, "update"):
            criterion.updates = epoch - 1
            criterion.update()

    def ultralytics_batch(
        self, images: Tensor, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Targets as Ultralytics' batch dict: ``batch_idx``, ``cls``, normalised xywh ``bboxes``."""
        height, width = images.shape[-2:]
        scale = images.new_tensor([width, height, width, height])
        idx, cls, boxes = [], [], []
        for i, t in enumerate(targets):
            b = t["boxes"].to(images)
            idx.append(torch.full((b.shape[0],), float(i), device=images.device))
            cls.append(t["labels"].to(images).reshape(-1, 1))
            xywh = torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], dim=1)
            boxes.append(xywh / scale)
        return {"batch_idx": torch.cat(idx), "cls": torch.cat(cls), "bboxes": torch.cat(boxes)}

    @staticmethod
    def _flat_head(
        cls_logits: list[Tensor], bbox_regression: list[Tensor], feats: list[Tensor]
    ) -> dict:
        n = feats[0].shape[0]
        return {
            "boxes": torch.cat([r.reshape(n, r.shape[1], -1) for r in bbox_regression], dim=-1),
            "scores": torch.cat([c.reshape(n, c.shape[1], -1) for c in cls_logits], dim=-1),
            "feats": feats,
        }

    def _one2one(self, features: list[Tensor]) -> dict:
        detached = [f.detach() for f in features]
        cls = [self.detect.one2one_cv3[i](f) for i, f in enumerate(detached)]
        reg = [self.detect.one2one_cv2[i](f) for i, f in enumerate(detached)]
        return self._flat_head(cls, reg, detached)

    def _fill_loss(
        self, output: DetectorOutput, images: Tensor, targets: list[dict[str, Tensor]]
    ) -> None:
        batch = self.ultralytics_batch(images, targets)
        one2many = self._flat_head(output.cls_logits, output.bbox_regression, output.features)
        criterion = self.criterion
        n = images.shape[0]
        if self.end2end:
            assigned, loss, _ = criterion.one2many.get_assigned_targets_and_loss(one2many, batch)
            if self.training:  # the one-to-one branch only trains; it is never distilled
                _, loss_o2o, _ = criterion.one2one.get_assigned_targets_and_loss(
                    self._one2one(output.features), batch
                )
                loss = loss * criterion.o2m + loss_o2o * criterion.o2o
            else:
                loss = loss * criterion.o2m
        else:
            assigned, loss, _ = criterion.get_assigned_targets_and_loss(one2many, batch)
        fg_mask, target_gt_idx = assigned[0], assigned[1]
        output.matched_idxs = list(torch.where(fg_mask, target_gt_idx, -1).long())
        names = ("box", "cls", "dfl" if self.detect.reg_max > 1 else "l1")
        output.losses = {name: loss[i] * n for i, name in enumerate(names)}

    # ----------------------------------------------------------- inference
    def decode_boxes(self, rel_codes: Tensor, anchors: Tensor) -> Tensor:
        """``(n, 4 reg_max)`` side codes + ``(n, 4)`` stride boxes -> ``(n, 4)`` xyxy pixels."""
        stride = (anchors[:, 2] - anchors[:, 0])[:, None]
        centre = (anchors[:, :2] + anchors[:, 2:]) / 2
        reg_max = self.detect.reg_max
        if reg_max > 1:
            bins = torch.arange(reg_max, dtype=rel_codes.dtype, device=rel_codes.device)
            distances = rel_codes.reshape(-1, 4, reg_max).softmax(-1) @ bins
        else:
            distances = rel_codes
        distances = distances * stride
        return torch.cat([centre - distances[:, :2], centre + distances[:, 2:]], dim=1)

    def class_scores(self, cls_logits: Tensor, quality: Tensor | None) -> Tensor:
        """Ranking scores: the sigmoid of the class logits (YOLO has no quality branch)."""
        return torch.sigmoid(cls_logits)

    @torch.no_grad()
    def postprocess(self, output: DetectorOutput) -> list[dict[str, Tensor]]:
        """Ultralytics' validation post-processing: decode, then its NMS (multi-label)."""
        from ultralytics.utils.nms import non_max_suppression

        anchors = output.anchors[0]
        codes = output.flat_bbox_regression().float()
        n = codes.shape[0]
        boxes = self.decode_boxes(codes.reshape(-1, codes.shape[-1]), anchors.repeat(n, 1))
        boxes = boxes.reshape(n, -1, 4)
        xywh = torch.cat(
            [(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], -1
        )
        scores = self.class_scores(output.flat_cls_logits().float(), None)
        prediction = torch.cat([xywh, scores], dim=-1).permute(0, 2, 1)
        kept = non_max_suppression(
            prediction,
            self.score_thresh,
            self.nms_thresh,
            multi_label=True,
            max_det=self.detections_per_img,
        )
        return [{"boxes": k[:, :4], "scores": k[:, 4], "labels": k[:, 5].long()} for k in kept]

    # Train mode: DetectorOutput with losses; eval mode: detections per original image.
    # The same path as every detector: transform, forward_batch, postprocess, back to the image.
    forward = OneStageDetector.forward

    # --------------------------------------------------- Ultralytics files
    @classmethod
    def from_ultralytics_checkpoint(
        cls, path: str | os.PathLike
    ) -> tuple[YOLODetector, list[str], int] | None:
        """``(model, class names, image size)`` of an Ultralytics ``best.pt``; ``None`` if the
        file is not one (or Ultralytics is not installed to read it)."""
        try:
            import_ultralytics()
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # not a pickle Ultralytics can read: not its checkpoint
            return None
        source = _checkpoint_model(payload)
        if source is None or not hasattr(source, "yaml"):
            return None
        names = getattr(source, "names", None) or {}
        class_names = [str(names[i]) for i in sorted(names)]
        args = payload.get("train_args") or {}
        image_size = int(args.get("imgsz", 640)) if isinstance(args, dict) else 640
        model = cls(len(class_names), source.yaml, image_size=image_size)
        model.load_ultralytics_weights(path)
        return model, class_names, image_size

    def load_ultralytics_weights(self, path: str | os.PathLike) -> list[str]:
        """Load an Ultralytics checkpoint (``best.pt``) strictly; returns re-initialised keys.

        The class predictors (``cv3.*.2`` and YOLO26's ``one2one_cv3.*.2``) are
        re-initialised, and logged, when the file's class count differs.
        """
        path = Path(path)
        if not path.is_file():
            raise DetDistillError(f"Ultralytics checkpoint not found: {path}")
        payload = torch.load(path, map_location="cpu", weights_only=False)
        source = _checkpoint_model(payload)
        if source is None:
            raise DetDistillError(f"{path}: not an Ultralytics checkpoint (no 'model' entry)")
        state = source.float().state_dict()
        own = self.model.state_dict()
        reinit = []
        for key, value in own.items():
            if key not in state:
                raise DetDistillError(f"{path}: no weights for {key} (another architecture?)")
            if state[key].shape != value.shape:
                if ".cv3." in f".{key}" and key.rsplit(".", 2)[-2] == "2":
                    reinit.append(key)
                    state[key] = value
                    continue
                raise DetDistillError(
                    f"{path}: {key} has shape {tuple(state[key].shape)}, the model needs "
                    f"{tuple(value.shape)} (another scale or YAML?)"
                )
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise DetDistillError(
                f"{path}: unexpected weights {unexpected[0]} (another architecture?)"
            )
        self.model.load_state_dict(state, strict=True)
        if reinit:
            log.info(
                "%s: %d-class predictors re-initialised (%s)",
                path,
                self.num_classes,
                ", ".join(reinit),
            )
        return reinit

    def ultralytics_checkpoint(self, class_names: list[str]) -> dict[str, Any]:
        """This model as an Ultralytics checkpoint: ``ultralytics.YOLO(path)`` loads the saved dict
        (predict, val, export) with no detdistill import."""
        from ultralytics import __version__

        model = copy.deepcopy(self.model).float().eval()
        model.names = dict(enumerate(class_names))
        model.nc = len(class_names)
        for p in model.parameters():
            p.requires_grad_(False)
        args = {**vars(self.model.args), "imgsz": self.transform.size, "task": "detect"}
        model.args = args
        return {
            "model": model, "ema": None, "updates": None, "optimizer": None, "epoch": -1,
            "train_args": args, "version": __version__,
            "license": "AGPL-3.0 (https://ultralytics.com/license)",
        }  # fmt: skip
