"""Batching for detection: lists of variable-size images, distributed or seeded sampling.

Why lists: detection images differ in size; the models batch (and pad) them
themselves, so ``collate_fn`` must not stack.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
)


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


def _seed_worker(worker_id: int) -> None:
    """Seed ``random`` and NumPy from the worker's torch seed (itself derived from the loader's)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    distributed: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A ``DataLoader`` with :func:`collate_fn` and reproducible order.

    - ``distributed``: a :class:`DistributedSampler` (shuffled when ``train``,
      with ``seed``). The caller must call ``loader.sampler.set_epoch(epoch)``
      at the start of every epoch, or each epoch repeats the same order. For
      evaluation it pads the last ranks with repeated images; the evaluator
      deduplicates by ``image_id``.
    - otherwise: shuffled when ``train`` by a ``torch.Generator`` seeded with
      ``seed`` (a new permutation each epoch, the same sequence every run);
      sequential for evaluation.

    Worker processes get seeds derived from the same generator, so random
    transforms are reproducible with ``num_workers > 0`` too. With
    ``num_workers=0`` they draw from the global torch RNG: seed it for
    reproducible augmentation. The last partial batch is kept.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    if distributed:
        sampler: Any = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=False)
    elif train:
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=generator,
        persistent_workers=num_workers > 0,
        drop_last=False,
    )
