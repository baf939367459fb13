"""Whole-detector weights from torchvision: a COCO teacher, or a student fine-tuned from COCO.

:func:`load_detector_weights` fills a detdistill detector from a torchvision
detection model's ``state_dict``: a torchvision weights name (downloaded by
torchvision, only because the user asked for it) or a local file.

Which torchvision models map onto which detdistill configs:

========================================  ============================================
torchvision                               detdistill
========================================  ============================================
``retinanet_resnet50_fpn``                ``retinanet`` with ``backbone: resnet50``,
(``RetinaNet_ResNet50_FPN_Weights``)      ``levels: [3, 4, 5, 6, 7]``, the default
                                          256-wide FPN, ``head_norm: null`` (the
                                          original head, no GroupNorm) and
                                          ``num_convs: 4``
``fcos_resnet50_fpn``                     ``fcos`` with ``backbone: resnet50``,
(``FCOS_ResNet50_FPN_Weights``)           ``levels: [3, 4, 5, 6, 7]``, the default
                                          FPN and ``num_convs: 4``
``retinanet_resnet50_fpn_v2``             none: refused. Its head (GroupNorm towers)
(``RetinaNet_ResNet50_FPN_V2_Weights``)   is ours with ``head_norm: gn``, but its P6
                                          is computed from C5 (``LastLevelP6P7(2048,
                                          256)``), while detdistill's FPN computes
                                          P6 from P5 as v1 and FCOS do
                                          (``LastLevelP6P7(256, 256)``): no weight of
                                          ours can hold the v2 P6 conv.
========================================  ============================================

``atss`` and ``gfl`` have no torchvision counterpart and are refused (ATSS's
towers have FCOS's shapes, but its regression predicts anchor deltas, not FCOS's
ltrb distances, so FCOS weights would load without error and mean something
else). The anchors are not weights: to run a COCO RetinaNet as torchvision does
at another input size, keep torchvision's ``anchor_scale: 4`` (``model.kwargs``).

The mapping. detdistill's module tree is torchvision's (``backbone.body``,
``backbone.fpn``, ``head.classification_head``, ``head.regression_head``), so
current torchvision keys are ours unchanged. Older files, among them the COCO
files torchvision serves for these models, use the layouts from before
torchvision 0.13, which torchvision's own modules translate when loading; the
same translations are done here, explicitly:

* FPN: ``backbone.fpn.{inner,layer}_blocks.<i>.{weight,bias}`` ->
  ``backbone.fpn.{inner,layer}_blocks.<i>.0.{weight,bias}`` (the convs are now
  ``Conv2dNormActivation``);
* RetinaNet towers: ``head.{classification,regression}_head.conv.<2i>.{weight,bias}``
  -> ``...conv.<i>.0.{weight,bias}`` (``Conv2d, ReLU`` pairs became one
  ``Conv2dNormActivation`` each).

Loading is strict: every parameter and buffer of ours is filled and every key of
the file is used, with two exceptions, both BatchNorm's step counter
``num_batches_tracked``: a file saved from trainable BatchNorm has it and our
``FrozenBatchNorm2d`` has not (ignored), and a file saved from
``FrozenBatchNorm2d`` (torchvision's COCO files) lacks it while our trainable
BatchNorm has it (kept as it is). The counter only matters for BatchNorm with
``momentum=None``, which no detdistill model uses. The one other exception is the
class predictor (``head.classification_head.cls_logits``) when the number of
classes differs: it is re-initialised as our detectors initialise it (weights
``N(0, 0.01)``, bias ``-log((1 - p) / p)`` with prior ``p = 0.01``). Anything
else that does not fit raises :class:`DetectorWeightsError` naming the first
missing and unexpected key with its shape, and the model is left untouched.

torchvision's COCO models have 91 outputs and their output index is the COCO
category id (index 0 and the 10 unused ids are never trained); with
``num_classes: 91`` the predictor loads as it is and keeps that numbering.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from detdistill.errors import DetDistillError

from .fcos import FCOS
from .retinanet import RetinaNet

__all__ = [
    "PRIOR_PROBABILITY",
    "DetectorWeightsError",
    "DetectorWeightsReport",
    "load_detector_weights",
]

log = logging.getLogger("detdistill.models")

# The class predictor's prior: torchvision's RetinaNetClassificationHead and
# FCOSClassificationHead default, which detdistill's retinanet and fcos keep.
PRIOR_PROBABILITY = 0.01

CLS_LOGITS = "head.classification_head.cls_logits"
_CTRNESS = "head.regression_head.bbox_ctrness.weight"
_P6 = "backbone.fpn.extra_blocks.p6.weight"
_GN_PROBE = "head.classification_head.conv.0.1.weight"  # a RetinaNet tower's first norm
_COUNTER = "num_batches_tracked"

# torchvision weights enums by class name -> the detdistill detector they map onto.
_ENUMS = {
    "RetinaNet_ResNet50_FPN_Weights": "retinanet",
    "FCOS_ResNet50_FPN_Weights": "fcos",
}
_V2_REFUSAL = (
    "torchvision's RetinaNet v2 (retinanet_resnet50_fpn_v2) cannot be loaded: its P6 is "
    "computed from C5 (LastLevelP6P7(2048, 256)), detdistill's FPN computes P6 from P5 as "
    "RetinaNet v1 and FCOS do; use RetinaNet_ResNet50_FPN_Weights.COCO_V1 (v1, our "
    "retinanet with head_norm: null) or FCOS_ResNet50_FPN_Weights.COCO_V1"
)
_SETTINGS = {
    "retinanet": "retinanet with backbone: resnet50, levels: [3, 4, 5, 6, 7], the default "
    "256-wide FPN, head_norm: null and num_convs: 4",
    "fcos": "fcos with backbone: resnet50, levels: [3, 4, 5, 6, 7], the default 256-wide FPN "
    "and num_convs: 4",
}
_TV_NAMES = {"retinanet": "RetinaNet (retinanet_resnet50_fpn)", "fcos": "FCOS (fcos_resnet50_fpn)"}

# Pre-0.13 torchvision key layouts -> current ones (see the module docstring).
_LEGACY_FPN = re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$")
_LEGACY_RETINANET_TOWER = re.compile(
    r"^(head\.(?:classification|regression)_head\.conv)\.(\d+)\.(weight|bias)$"
)


class DetectorWeightsError(DetDistillError, ValueError):
    """Whole-detector weights that cannot be read or do not fit the detector (one line)."""


@dataclass
class DetectorWeightsReport:
    """What :func:`load_detector_weights` did.

    Attributes:
        source: the weights name or file.
        family: the torchvision detector the weights came from (``retinanet``/``fcos``).
        loaded: number of our parameters and buffers filled from the weights.
        reinitialised: our keys re-initialised instead (the class predictor when
            the number of classes differs), empty otherwise.
        ignored: keys of the weights not used (BatchNorm counters our frozen BN lacks).
        kept: our keys the weights do not hold and that stay as they were
            (BatchNorm counters a frozen-BN file lacks).
    """

    source: str
    family: str
    loaded: int
    reinitialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def _target_family(model: nn.Module) -> str:
    if isinstance(model, RetinaNet):
        return "retinanet"
    if isinstance(model, FCOS):
        return "fcos"
    raise DetectorWeightsError(
        f"whole-detector weights load into retinanet and fcos only (torchvision has no "
        f"{type(model).__name__}); use weights_backbone for a pretrained backbone"
    )


def _family_of_enum(weights: WeightsEnum, target: str) -> None:
    kind = type(weights).__name__
    if kind == "RetinaNet_ResNet50_FPN_V2_Weights":
        raise DetectorWeightsError(_V2_REFUSAL)
    family = _ENUMS.get(kind)
    if family is None:
        raise DetectorWeightsError(
            f"{weights} is not a torchvision detector detdistill maps; supported: "
            f"{', '.join(f'{k}.COCO_V1' for k in _ENUMS)}"
        )
    if family != target:
        raise DetectorWeightsError(
            f"{weights} holds a torchvision {_TV_NAMES[family]}; it loads into "
            f"{_SETTINGS[family]}, not into {target}"
        )


def _read_source(source: Any, target: str) -> tuple[dict[str, Tensor], str]:
    """The state dict behind ``source`` (a weights name/enum or a file) and its display name."""
    weights: WeightsEnum | None = None
    if isinstance(source, WeightsEnum):
        weights = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        text = str(source)
        if not path.is_file():
            if "_Weights." not in text or os.sep in text:
                raise DetectorWeightsError(
                    f"{text!r} is neither an existing file nor a torchvision weights name "
                    "such as 'RetinaNet_ResNet50_FPN_Weights.COCO_V1'"
                )
            try:
                weights = torchvision.models.get_weight(text)
            except (ValueError, KeyError, AttributeError) as exc:
                raise DetectorWeightsError(f"unknown torchvision weights {text!r}: {exc}") from None
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise DetectorWeightsError(
                    f"cannot read {path} as a state-dict file: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}"
                ) from None
            return _unwrap(obj, str(path)), str(path)
    else:
        raise DetectorWeightsError(
            f"weights must be a torchvision weights name/enum or a file path, got {type(source)}"
        )
    _family_of_enum(weights, target)
    name = f"{type(weights).__name__}.{weights.name}"
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DetectorWeightsError(
            f"could not download torchvision weights {name} ({reason}); offline, pass a "
            f"local file holding the detector's state_dict instead (model.weights: "
            f"path/to/file.pth)"
        ) from None
    return _unwrap(state, name), name


def _unwrap(obj: Any, where: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise DetectorWeightsError(
            f"{where} does not hold a detector state_dict (a dict of tensors, or one under "
            f"'model' or 'state_dict')"
        )
    return dict(obj)


def _source_family(state: Mapping[str, Tensor]) -> str:
    if _CTRNESS in state:
        return "fcos"
    if f"{CLS_LOGITS}.weight" in state:
        p6 = state.get(_P6)
        if p6 is not None and p6.dim() == 4 and p6.shape[1] != p6.shape[0]:
            return "retinanet_v2"
        return "retinanet"
    raise DetectorWeightsError(
        f"not a torchvision RetinaNet/FCOS state_dict: no {CLS_LOGITS}.weight"
    )


def _translate(
    state: dict[str, Tensor], ours: Mapping[str, Tensor], family: str
) -> dict[str, Tensor]:
    """Rename the pre-0.13 torchvision layouts to current keys (only where ours expects those)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = key
        if key not in ours:
            m = _LEGACY_FPN.match(key)
            if m:
                new = f"{m[1]}.0.{m[2]}"
            m = _LEGACY_RETINANET_TOWER.match(key) if family == "retinanet" else None
            if m and int(m[2]) % 2 == 0:
                new = f"{m[1]}.{int(m[2]) // 2}.0.{m[3]}"
            if new not in ours:
                new = key  # not a legacy key after all: reported as unexpected below
        if new in out:
            raise DetectorWeightsError(f"the weights hold both {key} and {new} (the same tensor)")
        out[new] = value
    return out


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def load_detector_weights(
    model: nn.Module, source: str | os.PathLike | WeightsEnum
) -> DetectorWeightsReport:
    """Fill ``model`` (a detdistill ``retinanet`` or ``fcos``) with a torchvision detector's weights.

    Args:
        model: a :class:`~detdistill.models.RetinaNet` or :class:`~detdistill.models.FCOS`
            built to match the weights (module docstring): ``retinanet`` with
            ``backbone: resnet50``, ``levels: [3, 4, 5, 6, 7]``, ``head_norm: null``
            for ``retinanet_resnet50_fpn`` (v1); ``fcos`` with ``backbone:
            resnet50``, ``levels: [3, 4, 5, 6, 7]`` for ``fcos_resnet50_fpn``.
            RetinaNet v2 (``retinanet_resnet50_fpn_v2``) is refused: its P6 comes
            from C5, ours from P5.
        source: a torchvision weights name or enum
            (``"RetinaNet_ResNet50_FPN_Weights.COCO_V1"``,
            ``"FCOS_ResNet50_FPN_Weights.COCO_V1"``; torchvision downloads it, or
            takes it from its cache), or a local file holding a whole torchvision
            detector's ``state_dict()`` (bare, or under ``"model"`` /
            ``"state_dict"``), in the current or the pre-0.13 key layout.

    Every parameter and buffer is filled and every key of the weights used, but
    for BatchNorm step counters; with another number of classes the class
    predictor is re-initialised (prior-probability bias) and one INFO line on the
    ``detdistill.models`` logger says so.

    Returns:
        a :class:`DetectorWeightsReport`.

    Raises:
        DetectorWeightsError: unreadable or unsupported weights (including a failed
            download), or weights that do not fit ``model``: the one-line message
            names the first missing and the first unexpected key with their shapes.
            The model is unchanged then.
    """
    target = _target_family(model)
    state, name = _read_source(source, target)
    family = _source_family(state)
    if family == "retinanet_v2":
        raise DetectorWeightsError(f"{name}: {_V2_REFUSAL}")
    if family != target:
        raise DetectorWeightsError(
            f"{name} holds a torchvision {_TV_NAMES[family]}; it loads into "
            f"{_SETTINGS[family]}, not into {target}"
        )
    ours = model.state_dict()
    if family == "retinanet":
        source_gn, our_gn = _GN_PROBE in state, _GN_PROBE in ours
        if source_gn != our_gn:
            raise DetectorWeightsError(
                f"{name}: the weights' RetinaNet head has "
                f"{'GroupNorm' if source_gn else 'no GroupNorm'} in its towers and the "
                f"model's has {'GroupNorm' if our_gn else 'none'}; build "
                f"{'head_norm: gn' if source_gn else 'head_norm: null'}"
            )
    state = _translate(state, ours, family)

    ignored = [k for k in state if k not in ours and k.rsplit(".", 1)[-1] == _COUNTER]
    kept = [k for k in ours if k not in state and k.rsplit(".", 1)[-1] == _COUNTER]
    cls_keys = [f"{CLS_LOGITS}.weight", f"{CLS_LOGITS}.bias"]
    reinit: list[str] = []
    src_cls, our_cls = state.get(cls_keys[0]), ours.get(cls_keys[0])
    if (
        src_cls is not None
        and our_cls is not None
        and src_cls.shape[1:] == our_cls.shape[1:]
        and src_cls.shape[0] != our_cls.shape[0]
    ):
        reinit = cls_keys

    missing = [k for k in ours if k not in state and k not in kept]
    unexpected = [k for k in state if k not in ours and k not in ignored]
    mismatched = [
        k for k in ours if k in state and k not in reinit and state[k].shape != ours[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(
                f"shape mismatch at {k}: weights {_shape(state[k])}, model {_shape(ours[k])}"
            )
        if missing:
            k = missing[0]
            parts.append(f"missing key {k} (model shape {_shape(ours[k])})")
        if unexpected:
            k = unexpected[0]
            parts.append(f"unexpected key {k} (weights shape {_shape(state[k])})")
        counts = (
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mismatched"
        )
        raise DetectorWeightsError(
            f"{name} does not fit the {type(model).__name__}: {'; '.join(parts)} ({counts}); "
            f"a torchvision {_TV_NAMES[family]} loads into {_SETTINGS[family]}"
        )

    with torch.no_grad():
        live = model.state_dict(keep_vars=True)
        loaded = 0
        for key, tensor in live.items():
            if key in state and key not in reinit:
                tensor.copy_(state[key])
                loaded += 1
        if reinit:
            weight, bias = live[cls_keys[0]], live[cls_keys[1]]
            nn.init.normal_(weight, std=0.01)
            nn.init.constant_(bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
    if reinit:
        anchors = getattr(model, "num_anchors_per_location", 1) or 1
        log.info(
            "%s: %d classes in the weights, %d in the model: %s re-initialised (prior "
            "probability %g), everything else loaded",
            name,
            src_cls.shape[0] // anchors,
            our_cls.shape[0] // anchors,
            CLS_LOGITS,
            PRIOR_PROBABILITY,
        )
    return DetectorWeightsReport(name, family, loaded, reinit, ignored, kept)
