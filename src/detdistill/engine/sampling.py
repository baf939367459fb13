"""Batches that can start mid-epoch, and augmentation that depends only on (seed, epoch, index).

Together they make a resumed run see exactly the batches and augmentations the
interrupted run would have seen: the order of an epoch is a function of the
seed and the epoch, the random flip of a sample a function of seed, epoch and
sample index, whatever worker process loads it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from detdistill.data.loader import batch_to_device, collate_fn
from detdistill.errors import ConfigError


class ResumableBatchSampler(Sampler[list[int]]):
    """Shuffled (or ordered) batches of one rank's share, skipping ``start_batch`` batches.

    Ranks take interleaved indices of one global permutation, so batch ``i`` of
    ranks ``0..K-1`` together hold the same images as batch ``i`` of a single
    process with a K times larger batch. Incomplete last batches are dropped
    when training (``drop_last``) so every rank does the same number of steps;
    for evaluation (``drop_last=False``) ranks may get one image more or less,
    never a duplicate that would count twice in COCOeval.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ):
        if num_samples <= 0:
            raise ConfigError("the data set is empty: no image to train or evaluate on", "data")
        if drop_last and num_samples < batch_size * world_size:
            raise ConfigError(
                f"{num_samples} images are fewer than one global batch "
                f"({batch_size} x {world_size} processes); lower data.batch_size",
                "data.batch_size",
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        if self.drop_last:  # whole global batches only: every rank then takes as many steps
            step = self.batch_size * self.world_size
            order = order[: len(order) // step * step]
        return order[self.rank :: self.world_size]

    def batches_per_epoch(self) -> int:
        per_rank = len(self._indices())
        if self.drop_last:
            return per_rank // self.batch_size
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        indices = self._indices()
        for b in range(self.start_batch, self.batches_per_epoch()):
            yield indices[b * self.batch_size : (b + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch


class SeededAugmentation(Dataset):
    """Wraps a data set so each sample's random transforms are seeded by (seed, epoch, index).

    The global generators are restored afterwards, so the training process's own
    random stream is not disturbed when loading happens in the main process.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        sample_seed = (self.seed * 1_000_003 + self.epoch * 10_007 + index) % (2**31)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class TrainingBatches:
    """A run's training batches, made one way for training, ``auto`` weights and ``doctor``.

    Seeded augmentation (:class:`SeededAugmentation`), the shuffled resumable
    sampler, ``collate_fn`` and the move to the run's device: :meth:`epoch`
    gives one epoch's batches from any point, :meth:`first` the first batches
    of epoch 0, exactly those training starts with, so the weights ``auto``
    measures and the batches ``doctor`` shows are the ones the run trains on.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        *,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.dataset = SeededAugmentation(dataset, seed)
        self.sampler = ResumableBatchSampler(
            len(self.dataset), batch_size, shuffle=True, seed=seed, rank=rank, world_size=world_size
        )
        self.device = torch.device(device)
        self.num_workers = num_workers

    def __len__(self) -> int:
        """Batches per epoch (of this rank)."""
        return self.sampler.batches_per_epoch()

    def epoch(
        self, epoch: int, start_batch: int = 0, num_workers: int | None = None
    ) -> Iterator[tuple[list[Tensor], list[dict[str, Any]]]]:
        """Epoch ``epoch``'s batches from batch ``start_batch`` on (a resumed run's position).

        ``num_workers`` changes only who loads a sample, never what it is: the
        augmentation depends on (seed, epoch, index) alone.
        """
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start_batch)
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=collate_fn,
            num_workers=self.num_workers if num_workers is None else num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for images, targets in loader:
            yield batch_to_device(images, targets, self.device)

    def first(self, count: int) -> Iterator[tuple[list[Tensor], list[dict[str, Any]]]]:
        """The first ``count`` batches of epoch 0, loaded in this process."""
        return itertools.islice(self.epoch(0, num_workers=0), count)
