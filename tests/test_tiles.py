"""Tiled training: the box rule of a crop, deterministic tiles, and a tiled run end to end."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import train_tiny
from detdistill.data.tiles import TiledDataset, TileSettings, crop_targets
from detdistill.engine.sampling import SeededAugmentation
from detdistill.errors import ConfigError


def test_crop_rule_worked_by_hand():
    boxes = torch.tensor(
        [
            [20.0, 20, 30, 30],  # inside: kept, shifted by the window origin
            [0.0, 20, 20, 30],  # half inside (x 10..20 of 0..20): visible 0.5, kept, clipped
            [0.0, 40, 25, 50],  # 15 of 25 px wide inside: 0.6, kept
            [0.0, 0, 16, 10],  # 6 x 0 inside: nothing visible, dropped
            [50.0, 50, 70, 60],  # 10 of 20 px: 0.5, kept
            [55.0, 0, 75, 20],  # x 55..60 of 55..75, y 10..20 of 0..20: 0.25 x 0.5, dropped
        ]
    )
    labels = torch.arange(6)
    kept, kept_labels = crop_targets(boxes, labels, (10, 10, 60, 60), min_visible=0.5)
    assert kept_labels.tolist() == [0, 1, 2, 4]
    assert kept.tolist() == [[10, 10, 20, 20], [0, 10, 10, 20], [0, 30, 15, 40], [40, 40, 50, 50]]
    strict, _ = crop_targets(boxes, labels, (10, 10, 60, 60), min_visible=0.6)
    assert len(strict) == 2  # only the box fully inside and the 0.6 one


class Scene(torch.utils.data.Dataset):
    """One 200 x 300 image with two small objects, at native resolution."""

    def __len__(self):
        return 1

    def __getitem__(self, index):
        image = torch.rand(3, 200, 300, generator=torch.Generator().manual_seed(index))
        boxes = torch.tensor([[30.0, 40, 50, 60], [240.0, 150, 262, 170]])
        return image, {"boxes": boxes, "labels": torch.tensor([1, 2]), "image_id": 7,
                       "orig_size": (200, 300), "size": (200, 300)}  # fmt: skip


def test_tiles_are_deterministic_per_seed_epoch_and_index_and_hold_their_objects():
    tiled = TiledDataset(Scene(), TileSettings(64, per_image=5, object_centred=1.0))
    assert len(tiled) == 5
    seeded = SeededAugmentation(tiled, seed=3)
    first = [seeded[i] for i in range(5)]
    again = [seeded[i] for i in range(5)]
    for (a, ta), (b, tb) in zip(first, again, strict=True):
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    seeded.set_epoch(1)
    assert any(not torch.equal(a, seeded[i][0]) for i, (a, _) in enumerate(first))
    for image, target in first:
        assert image.shape == (3, 64, 64) and target["size"] == (64, 64)
        assert target["image_id"] == 7 and target["orig_size"] == (200, 300)
        assert len(target["boxes"]) >= 1  # centred on an object: it is in the tile
        assert bool((target["boxes"] >= 0).all() and (target["boxes"] <= 64).all())


def test_an_image_smaller_than_a_tile_is_used_whole():
    tiled = TiledDataset(Scene(), TileSettings(512, per_image=1))
    image, target = tiled[0]
    assert image.shape == (3, 200, 300) and len(target["boxes"]) == 2


@pytest.mark.slow
def test_a_tiled_run_trains_and_evaluates_sliced(tmp_path):
    # 48 px tiles of the 64 px images (a 32 px tile would leave GroupNorm one value per
    # group at stride 32 for a single image, which torch refuses)
    model = train_tiny(tmp_path, "tiled", "data.tiles={size: 48, per_image: 2}")
    run_dir = model.parent
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and 0.0 <= summary["metrics"]["mAP"] <= 1.0
    # 16 training images x 2 tiles, batch 4: 8 steps in the one epoch
    assert summary["step"] == 8
    with pytest.raises(ConfigError, match="tiles and data.multiscale"):
        train_tiny(tmp_path, "both", "data.tiles={size: 48}", "data.multiscale=[48, 64]")


@pytest.mark.parametrize(("override", "key"), [("data.tiles={size: 0}", "data.tiles.size"),
                                               ("data.tiles={size: 64, per_image: -1}", "data.tiles.per_image"),
                                               ("data.tiles={size: 64, min_visible: 0}", "data.tiles.min_visible")])  # fmt: skip
def test_bad_tile_options_are_one_line_errors_naming_the_key(override, key):
    from detdistill.engine.presets import load_preset_or_file

    with pytest.raises(ConfigError, match=key) as info:
        load_preset_or_file("digits_teacher", [override])
    assert "\n" not in str(info.value)
