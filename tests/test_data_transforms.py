"""Transforms keep boxes consistent with pixels; the loader batches and shuffles reproducibly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from detdistill.data import CocoDetection, build_transforms, collate_fn
from detdistill.engine.sampling import ResumableBatchSampler, SeededAugmentation


def sample(h: int = 100, w: int = 200, boxes=((10.0, 20.0, 50.0, 60.0),)):
    image = tv_tensors.Image(
        torch.randint(
            0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
    )
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes), format="XYXY", canvas_size=(h, w)),
        "labels": torch.arange(len(boxes)),
        "image_id": 5,
        "orig_size": (h, w),
    }
    return image, target


@pytest.mark.parametrize(
    ("train", "size", "multiscale", "expected_size", "expected_box"),
    [
        (False, 100, (), (50, 100), [5.0, 10.0, 25.0, 30.0]),  # longest side 200 -> 100
        (False, 400, (), (200, 400), [20.0, 40.0, 100.0, 120.0]),  # upscaling too
        (True, 999, (64,), (32, 64), [3.2, 6.4, 16.0, 19.2]),  # multiscale overrides image_size
    ],
)
def test_resize_longest_side(train, size, multiscale, expected_size, expected_box):
    tf = build_transforms(train, size, hflip=0.0, multiscale=multiscale)
    image, target = tf(*sample())
    assert tuple(image.shape[-2:]) == expected_size
    assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    torch.testing.assert_close(
        target["boxes"].as_subclass(torch.Tensor), torch.tensor([expected_box])
    )
    assert target["image_id"] == 5 and tuple(target["orig_size"]) == (100, 200)


def test_flip_moves_boxes_with_pixels():
    flip = build_transforms(True, 100, hflip=1.0)
    keep = build_transforms(True, 100, hflip=0.0)
    image_f, target_f = flip(*sample())
    image_k, _ = keep(*sample())
    # x -> W' - x with W' = 100 after resizing: [5, 10, 25, 30] -> [75, 10, 95, 30]
    torch.testing.assert_close(
        target_f["boxes"].as_subclass(torch.Tensor), torch.tensor([[75.0, 10, 95, 30]])
    )
    torch.testing.assert_close(
        image_f.as_subclass(torch.Tensor), image_k.as_subclass(torch.Tensor).flip(-1)
    )


def test_multiscale_draws_from_the_list():
    tf = build_transforms(True, 128, hflip=0.5, multiscale=(60, 80, 100))
    torch.manual_seed(0)
    sizes = {tf(*sample())[0].shape[-1] for _ in range(30)}
    assert sizes == {60, 80, 100}


def test_tiny_boxes_dropped_in_training_only():
    boxes = ((10.0, 20.0, 50.0, 60.0), (0.0, 0.0, 1.0, 1.0))  # the second is 0.5 px after resizing
    _, train_t = build_transforms(True, 100, hflip=0.0)(*sample(boxes=boxes))
    _, eval_t = build_transforms(False, 100)(*sample(boxes=boxes))
    assert train_t["labels"].tolist() == [0] and len(train_t["boxes"]) == 1
    assert eval_t["labels"].tolist() == [0, 1]


def write_dataset(tmp_path: Path, n: int = 6) -> CocoDetection:
    (tmp_path / "img").mkdir()
    images, anns = [], []
    for i in range(1, n + 1):
        Image.fromarray(np.full((100, 200, 3), i * 20, np.uint8)).save(
            tmp_path / "img" / f"{i}.png"
        )
        images.append({"id": i, "file_name": f"{i}.png", "width": 200, "height": 100})
        anns.append({"id": 2 * i, "image_id": i, "category_id": 1, "bbox": [10, 20, 40, 40]})
        anns.append({"id": 2 * i + 1, "image_id": i, "category_id": 1, "bbox": [100, 50, 1, 1]})
    path = tmp_path / "ann.json"
    path.write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]})
    )
    return CocoDetection(tmp_path / "img", path)


def test_dataset_counts_boxes_dropped_by_transforms(tmp_path, caplog):
    ds = write_dataset(tmp_path)
    ds.transforms = build_transforms(True, 100, hflip=0.0)
    with caplog.at_level("WARNING", logger="detdistill.data"):
        image, target = ds[0]
        ds[1]
    assert ds.problems.counts == {"dropped_by_transform": 2}
    assert sum("dropped" in r.getMessage() for r in caplog.records) == 1  # warned once, then DEBUG
    assert target["size"] == (50, 100) and target["orig_size"] == (100, 200)
    torch.testing.assert_close(target["boxes"], torch.tensor([[5.0, 10, 25, 30]]))
    assert type(image) is torch.Tensor and type(target["boxes"]) is torch.Tensor


def test_collate_keeps_lists():
    a, b = (torch.zeros(3, 4, 5), {"image_id": 1}), (torch.zeros(3, 6, 7), {"image_id": 2})
    images, targets = collate_fn([a, b])
    assert [tuple(i.shape) for i in images] == [(3, 4, 5), (3, 6, 7)]
    assert [t["image_id"] for t in targets] == [1, 2]
    assert collate_fn([]) == ([], [])


def epoch_ids(ds, seed: int, epoch: int, num_workers: int = 0, **sampler_kwargs) -> list:
    """Image ids and first-box x of one epoch through the training path's loader."""
    augmented = SeededAugmentation(ds, seed)
    augmented.set_epoch(epoch)
    sampler = ResumableBatchSampler(len(ds), 2, shuffle=True, seed=seed, **sampler_kwargs)
    sampler.set_epoch(epoch)
    loader = DataLoader(augmented, batch_sampler=sampler, collate_fn=collate_fn,
                        num_workers=num_workers)  # fmt: skip
    return [(t["image_id"], t["boxes"][0, 0].item()) for _, targets in loader for t in targets]


def test_training_order_depends_on_seed_and_epoch_only(tmp_path):
    ds = write_dataset(tmp_path)
    a, again, other = epoch_ids(ds, 1, 0), epoch_ids(ds, 1, 0), epoch_ids(ds, 2, 0)
    assert a == again and [i for i, _ in a] != [i for i, _ in other]
    next_epoch = epoch_ids(ds, 1, 1)
    assert sorted(i for i, _ in a) == sorted(i for i, _ in next_epoch) == list(range(1, 7))
    assert [i for i, _ in a] != [i for i, _ in next_epoch]
    sequential = ResumableBatchSampler(6, 4, shuffle=False, drop_last=False)
    assert list(sequential) == [[0, 1, 2, 3], [4, 5]]
    resumed = ResumableBatchSampler(6, 2, shuffle=True, seed=1)
    resumed.set_epoch(0, start_batch=1)
    full = ResumableBatchSampler(6, 2, shuffle=True, seed=1)
    assert list(resumed) == list(full)[1:] and len(resumed) == 2


def test_every_rank_takes_the_same_number_of_training_steps():
    """Unequal steps would leave one rank waiting in an all-reduce forever (7 images,
    batch 2, 2 ranks gave 2 and 1 batches); the ranks' batch i together are the single
    process's batch i at K times the batch size."""
    for num_samples in range(1, 30):
        for batch_size in (1, 2, 3, 4):
            for world_size in (1, 2, 3):
                if num_samples < batch_size * world_size:
                    continue
                ranks = [
                    list(ResumableBatchSampler(num_samples, batch_size, True, 7, r, world_size))
                    for r in range(world_size)
                ]
                steps = num_samples // (batch_size * world_size)
                assert [len(batches) for batches in ranks] == [steps] * world_size
                single = list(ResumableBatchSampler(num_samples, batch_size * world_size, True, 7))
                for i in range(steps):
                    together = sorted(j for batches in ranks for j in batches[i])
                    assert together == sorted(single[i])


@pytest.mark.slow
def test_random_transforms_do_not_depend_on_the_worker_count(tmp_path):
    ds = write_dataset(tmp_path)
    ds.transforms = build_transforms(True, 100, hflip=0.5)
    in_process, workers = epoch_ids(ds, 0, 0), epoch_ids(ds, 0, 0, num_workers=2)
    assert in_process == workers
    assert in_process != epoch_ids(ds, 5, 0)
    assert {x for _, x in in_process} <= {5.0, 75.0}


def test_ranks_share_one_permutation_without_duplicates():
    ranks = [
        ResumableBatchSampler(7, 2, shuffle=True, seed=3, rank=r, world_size=2) for r in (0, 1)
    ]
    seen = [i for sampler in ranks for batch in sampler for i in batch]
    # one global batch (2 ranks x 2): both ranks take one step, 3 images wait for next epoch
    assert len(seen) == len(set(seen)) == 4 and [len(list(s)) for s in ranks] == [1, 1]
    evaluation = [
        ResumableBatchSampler(7, 2, shuffle=False, rank=r, world_size=2, drop_last=False)
        for r in (0, 1)
    ]
    assert sorted(i for s in evaluation for b in s for i in b) == list(range(7))
