"""Detectors by name, timm style: ``register_detector``, ``build_detector``, ``list_detectors``.

Configs name a detector and its keyword arguments; checkpoints record the same two
things (``detector.build_config``) so a trained student rebuilds as the plain
detector without any conversion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["build_detector", "list_detectors", "register_detector"]

_DETECTORS: dict[str, Callable[..., nn.Module]] = {}
_T = TypeVar("_T", bound=Callable[..., nn.Module])


def register_detector(name: str) -> Callable[[_T], _T]:
    """Decorator registering a detector class or builder function under ``name``."""

    def decorator(builder: _T) -> _T:
        if name in _DETECTORS and _DETECTORS[name] is not builder:
            raise ValueError(f"detector {name!r} is already registered")
        _DETECTORS[name] = builder
        return builder

    return decorator


def list_detectors() -> list[str]:
    """Registered detector names, sorted."""
    return sorted(_DETECTORS)


def build_detector(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered detector, e.g. ``build_detector("retinanet", num_classes=80)``.

    The name and kwargs are kept on the model as ``build_config`` so that
    checkpoints can record how to rebuild it.
    """
    if name not in _DETECTORS:
        raise ValueError(
            f"unknown detector {name!r}; registered detectors: {', '.join(list_detectors())}"
        )
    model = _DETECTORS[name](**kwargs)
    model.build_config = {"name": name, "kwargs": dict(kwargs)}
    return model
