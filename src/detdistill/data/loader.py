"""Batching for detection: lists of variable-size images, moved to a device together.

Why lists: detection images differ in size; the models batch (and pad) them
themselves, so ``collate_fn`` must not stack.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def collate_fn(
    batch: list[tuple[Tensor, dict[str, Any]]],
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """``[(image, target), ...]`` to ``([image, ...], [target, ...])`` (no stacking)."""
    if not batch:
        return [], []
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def batch_to_device(
    images: list[Tensor], targets: list[dict[str, Any]], device: torch.device | str
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """A collated batch on ``device``; non-tensor target fields (ids, names) stay as they are."""
    return [image.to(device, non_blocking=True) for image in images], [
        {k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets
    ]
