"""Backbone bodies by name, topped with torchvision's FeaturePyramidNetwork.

A body is any ``nn.Sequential``-like module whose children run in order (a
torchvision ResNet without ``avgpool``/``fc``, ``MobileNet.features``, or the
:class:`TinyBackbone`). Which child ends which pyramid level is *measured* once by
a probe forward pass, so strides and channel counts are never written down twice
and any new body works without a table.

Pyramid level ``l`` has stride ``2**l``. Levels the body cannot produce (6, 7)
come from torchvision's extra FPN blocks: ``LastLevelMaxPool`` for one extra level,
``LastLevelP6P7`` (computed from P5, as torchvision's RetinaNet/FCOS do) for two.

Weights (``weights=``): ``None``; a torchvision weights name such as
``"ResNet18_Weights.IMAGENET1K_V1"`` (downloaded by torchvision only because the
user asked for it); or a local state-dict file, loaded *strictly* into the full
torchvision classifier (e.g. ``torchvision.models.mobilenet_v2()``) before its body
is taken, so a file that silently fails to load is impossible.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import WeightsEnum
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import Conv2dNormActivation, FrozenBatchNorm2d

from detdistill.errors import DetDistillError
from detdistill.registry import Registry
from detdistill.state_dicts import load_weights_file

__all__ = [
    "BODIES",
    "BackboneArgumentError",
    "BackboneFPN",
    "TinyBackbone",
    "build_backbone",
    "list_backbones",
]

# name -> builder(weights, norm_layer, **kwargs) -> (body, default FPN width)
BODIES: Registry[Callable[..., tuple[nn.Module, int]]] = Registry("backbone")
_PROBE_SIZE = 64


class BackboneArgumentError(DetDistillError, TypeError):
    """An argument the backbone body does not take (``backbone_kwargs`` in a config)."""


class TinyBackbone(nn.Sequential):
    """A small plain CNN for CPU work: ``num_stages`` stages of conv-BN-ReLU.

    Stage ``i`` (1-based) starts with a stride-2 conv, so it ends pyramid level
    ``i``; ``depth - 1`` stride-1 convs follow. Widths double per stage from
    ``width`` and are capped at ``max_width`` (default ``8 * width``) so the last
    stages, which see few pixels, do not dominate the parameter count.
    """

    def __init__(
        self,
        width: int = 16,
        depth: int = 1,
        num_stages: int = 5,
        max_width: int | None = None,
        in_channels: int = 3,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        if width < 1 or depth < 1 or num_stages < 1:
            raise BackboneArgumentError(
                f"width, depth and num_stages must be >= 1, got {width}, {depth}, {num_stages}"
            )
        norm_layer = norm_layer or nn.BatchNorm2d
        max_width = max_width or 8 * width
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        cin = in_channels
        for i in range(1, num_stages + 1):
            cout = min(width * 2 ** (i - 1), max_width)
            layers = [Conv2dNormActivation(cin, cout, 3, stride=2, norm_layer=norm_layer)]
            layers += [
                Conv2dNormActivation(cout, cout, 3, norm_layer=norm_layer) for _ in range(depth - 1)
            ]
            stages[f"stage{i}"] = nn.Sequential(*layers)
            cin = cout
        super().__init__(stages)


class BackboneFPN(nn.Module):
    """Body + FPN. ``forward(x)`` returns the pyramid as a list, one tensor per level.

    Attribute names (``body``, ``fpn``) and state-dict keys match torchvision's
    ``BackboneWithFPN``, so torchvision detection checkpoints load into it.
    """

    def __init__(
        self,
        body: nn.Module,
        layer_levels: dict[str, int],
        layer_channels: dict[str, int],
        levels: Sequence[int],
        out_channels: int,
        fpn_norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        levels = tuple(int(lv) for lv in levels)
        if not levels or list(levels) != list(range(levels[0], levels[0] + len(levels))):
            raise ValueError(
                f"levels must be a non-empty run of consecutive integers, got {levels}"
            )
        body_max = max(layer_levels.values())
        body_min = min(layer_levels.values())
        if levels[0] < body_min or levels[0] > body_max:
            raise ValueError(
                f"lowest level {levels[0]} must be produced by the body (levels {body_min}..{body_max})"
            )
        body_levels = [lv for lv in levels if lv <= body_max]
        extra = [lv for lv in levels if lv > body_max]
        extra_blocks: ExtraFPNBlock | None
        if not extra:
            extra_blocks = None
        elif len(extra) == 1:
            extra_blocks = LastLevelMaxPool()
        elif len(extra) == 2:
            extra_blocks = LastLevelP6P7(out_channels, out_channels)  # from P5, like torchvision
        else:
            raise ValueError(
                f"at most 2 levels above the body's last level {body_max} are supported, got {extra}"
            )
        # The last child that ends each wanted level.
        return_layers: dict[str, str] = {}
        in_channels: list[int] = []
        for lv in body_levels:
            name = [n for n, v in layer_levels.items() if v == lv][-1]
            return_layers[name] = str(lv)
            in_channels.append(layer_channels[name])
        self.body = IntermediateLayerGetter(body, return_layers=return_layers)
        self.fpn = FeaturePyramidNetwork(
            in_channels, out_channels, extra_blocks=extra_blocks, norm_layer=fpn_norm_layer
        )
        self.out_channels = out_channels
        self.levels = levels
        self.strides = tuple(2**lv for lv in levels)

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.fpn(self.body(x)).values())


list_backbones = BODIES.names


def _resolve_weights(weights: Any) -> tuple[WeightsEnum | None, Path | None]:
    if weights is None:
        return None, None
    if isinstance(weights, WeightsEnum):
        return weights, None
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights).expanduser()
        if path.is_file():
            return None, path
        text = str(weights)
        if "_Weights." in text and os.sep not in text:
            return torchvision.models.get_weight(text), None
        raise FileNotFoundError(
            f"backbone weights {text!r} is neither an existing file nor a torchvision weights "
            "name such as 'ResNet18_Weights.IMAGENET1K_V1'"
        )
    raise TypeError(
        f"weights must be None, a torchvision weights name/enum or a file path, got {type(weights)}"
    )


def _torchvision_body(
    name: str, weights: Any, norm_layer: Callable[..., nn.Module], **kwargs: Any
) -> tuple[nn.Module, int]:
    enum, path = _resolve_weights(weights)
    try:
        model = torchvision.models.get_model(name, weights=enum, norm_layer=norm_layer, **kwargs)
    except TypeError as exc:
        raise BackboneArgumentError(f"backbone {name!r}: {exc}") from exc
    if path is not None:
        load_weights_file(model, path, f"torchvision.models.{name}()")
    if name.startswith("resnet"):
        children = ((n, m) for n, m in model.named_children() if n not in ("avgpool", "fc"))
        return nn.Sequential(OrderedDict(children)), 256
    return model.features, 256


for _name in (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "mobilenet_v2",
    "mobilenet_v3_large",
):
    BODIES.register(_name)(partial(_torchvision_body, _name))


@BODIES.register("tiny")
def _tiny_body(
    weights: Any, norm_layer: Callable[..., nn.Module], **kwargs: Any
) -> tuple[nn.Module, int]:
    try:
        body = TinyBackbone(norm_layer=norm_layer, **kwargs)
    except TypeError as exc:
        raise BackboneArgumentError(f"backbone 'tiny': {exc}") from exc
    enum, path = _resolve_weights(weights)
    if enum is not None:
        raise ValueError("the tiny backbone has no torchvision weights; pass a local file or None")
    if path is not None:
        load_weights_file(body, path, "TinyBackbone")
    return body, 4 * kwargs.get("width", 16)  # a 256-wide neck would dwarf a tiny body


def _probe(body: nn.Module, in_channels: int = 3) -> tuple[dict[str, int], dict[str, int]]:
    """Level (log2 stride) and channels of every child, from one tiny forward pass."""
    names = [n for n, _ in body.named_children()]
    getter = IntermediateLayerGetter(body, return_layers={n: n for n in names})
    was_training = body.training
    body.eval()  # no BatchNorm statistics are touched
    try:
        with torch.no_grad():
            param = next(body.parameters(), None)
            x = torch.zeros(1, in_channels, _PROBE_SIZE, _PROBE_SIZE)
            if param is not None:
                x = x.to(param.device, param.dtype)
            outs = getter(x)
    finally:
        body.train(was_training)
    levels = {n: round(math.log2(_PROBE_SIZE / t.shape[-1])) for n, t in outs.items()}
    channels = {n: t.shape[1] for n, t in outs.items()}
    return levels, channels


def _freeze(body: nn.Module, layer_levels: dict[str, int], frozen_levels: int) -> None:
    """Freeze every child up to and including the last one that ends ``frozen_levels``."""
    if frozen_levels <= 0:
        return
    names = [n for n, _ in body.named_children()]
    last = max((i for i, n in enumerate(names) if layer_levels[n] <= frozen_levels), default=-1)
    for n in names[: last + 1]:
        for p in getattr(body, n).parameters():
            p.requires_grad_(False)


def build_backbone(
    name: str,
    *,
    levels: Sequence[int] = (3, 4, 5, 6, 7),
    out_channels: int | None = None,
    weights: str | os.PathLike | WeightsEnum | None = None,
    norm_layer: str | None = None,
    frozen_levels: int = 0,
    **body_kwargs: Any,
) -> BackboneFPN:
    """Build ``body + FPN`` producing pyramid ``levels`` (stride ``2**l`` each).

    Args:
        name: one of :func:`list_backbones`.
        levels: consecutive pyramid levels, e.g. ``(3, 4, 5)`` for 128 px images or
            ``(3, 4, 5, 6, 7)`` for RetinaNet on COCO.
        out_channels: FPN width; default 256 for torchvision bodies and
            ``4 * width`` for ``tiny`` (a 256-wide neck would dwarf a tiny body).
        weights: ``None``, a torchvision weights name/enum, or a local state-dict file.
        norm_layer: ``"bn"`` or ``"frozen_bn"``; default frozen BN when pretrained
            weights are given (torchvision's detection practice: small detection
            batches must not re-estimate ImageNet statistics), else trainable BN.
        frozen_levels: freeze body layers up to this level (2 = stem + ResNet
            ``layer1``, torchvision's ``trainable_layers=3``).
        body_kwargs: extra arguments of the body, e.g. ``width``/``depth`` for tiny.
    """
    builder = BODIES.get(name)
    if norm_layer is None:
        norm_layer = "frozen_bn" if weights is not None else "bn"
    norms: dict[str, Callable[..., nn.Module]] = {
        "bn": nn.BatchNorm2d,
        "frozen_bn": FrozenBatchNorm2d,
    }
    if norm_layer not in norms:
        raise ValueError(f"norm_layer must be one of {sorted(norms)}, got {norm_layer!r}")
    body, default_channels = builder(weights, norms[norm_layer], **body_kwargs)
    layer_levels, layer_channels = _probe(body)
    _freeze(body, layer_levels, frozen_levels)
    return BackboneFPN(body, layer_levels, layer_channels, levels, out_channels or default_channels)
