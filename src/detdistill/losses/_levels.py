"""Checks shared by the losses that take per-FPN-level tensor lists."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def check_levels(name_a: str, a: Sequence[Tensor], name_b: str, b: Sequence[Tensor]) -> None:
    """Raise a ValueError naming the argument and level whose shapes disagree."""
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} levels but {name_b} has {len(b)}")
    if len(a) == 0:
        raise ValueError(f"{name_a} and {name_b} are empty: at least one FPN level is needed")
    for level, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.dim() != 4:
            raise ValueError(f"{name_a}[{level}] must be (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape != y.shape:
            raise ValueError(
                f"level {level}: {name_a} has shape {tuple(x.shape)} but {name_b} has {tuple(y.shape)}"
            )


def check_spatial(name_a: str, a: Sequence[Tensor], name_b: str, b: Sequence[Tensor]) -> None:
    """Raise when two per-level lists differ in length, batch size or H, W."""
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} levels but {name_b} has {len(b)}")
    for level, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.shape[0] != y.shape[0] or x.shape[-2:] != y.shape[-2:]:
            raise ValueError(
                f"level {level}: {name_a} has shape {tuple(x.shape)} but {name_b} has "
                f"{tuple(y.shape)}; batch size and H, W must match"
            )
