"""Detectors by name, timm style: ``register_detector``, ``build_detector``, ``list_detectors``.

Configs name a detector and its keyword arguments; checkpoints record the same two
things (``detector.build_config``) so a trained student rebuilds as the plain
detector without any conversion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from detdistill.registry import Registry

__all__ = ["DETECTORS", "build_detector", "list_detectors", "register_detector"]

DETECTORS: Registry[Callable[..., nn.Module]] = Registry("detector")
register_detector = DETECTORS.register
list_detectors = DETECTORS.names


def build_detector(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered detector, e.g. ``build_detector("retinanet", num_classes=80)``.

    The name and kwargs are kept on the model as ``build_config`` so that
    checkpoints can record how to rebuild it.
    """
    model = DETECTORS.get(name)(**kwargs)
    model.build_config = {"name": name, "kwargs": dict(kwargs)}
    return model
