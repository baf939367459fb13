"""Run loss math in float32 whatever the caller's autocast state.

Distillation terms compare two networks' outputs; under float16 the small
differences they are made of underflow and softmax/log of large logits overflow,
which is the usual source of NaN in mixed-precision distillation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., torch.Tensor])


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v) for v in value)
    return value


def _first_device_type(values: Any) -> str:
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device.type
        if isinstance(value, (list, tuple)):
            found = _first_device_type(value)
            if found:
                return found
    return ""


def float32_loss(fn: F) -> F:
    """Decorate a loss so it computes with autocast disabled, half inputs upcast to float32.

    float64 inputs stay float64 (gradcheck and reference computations need them).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        device_type = _first_device_type((*args, *kwargs.values())) or "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*_to_float32(args), **{k: _to_float32(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]
