"""Embedded data sets: deterministic, cached atomically, sane boxes, loadable as COCO."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import detdistill.data.embedded as embedded
from conftest import TINY_OVERRIDES, tiny_data_dir
from detdistill.data import CocoDetection, make_embedded
from detdistill.engine.builders import build_datasets
from detdistill.engine.config import load_config
from detdistill.engine.presets import preset_path


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("embedded")
    return {
        name: make_embedded(name, root / name, num_train=120, num_val=20, seed=0)
        for name in ("shapes", "digits")
    }


def annotations(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    coco = json.loads(path.read_text())
    boxes = np.array([a["bbox"] for a in coco["annotations"]], dtype=float).reshape(-1, 4)
    cats = np.array([a["category_id"] for a in coco["annotations"]])
    return boxes, cats, coco


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shapes", "digits"])
def test_same_seed_byte_identical_other_seed_different(generated, tmp_path, name):
    again = make_embedded(name, tmp_path / "again", num_train=120, num_val=20, seed=0)
    other = make_embedded(name, tmp_path / "other", num_train=120, num_val=20, seed=1)
    for split in ("train", "val"):
        key = f"{split}_annotations"
        assert again[key].read_bytes() == generated[name][key].read_bytes()
        assert other[key].read_bytes() != generated[name][key].read_bytes()
    first = sorted(generated[name]["train_images"].iterdir())[0]
    assert (again["train_images"] / first.name).read_bytes() == first.read_bytes()


@pytest.mark.parametrize(
    ("name", "num_classes", "min_side", "max_side"), [("shapes", 6, 12, 64), ("digits", 10, 12, 30)]
)
def test_sanity(generated, name, num_classes, min_side, max_side):
    paths = generated[name]
    boxes, cats, coco = annotations(paths["train_annotations"])
    assert len(coco["images"]) == 120 and len(coco["categories"]) == num_classes
    assert set(cats.tolist()) == set(range(1, num_classes + 1))  # every class occurs
    x, y, w, h = boxes.T
    assert (x >= 0).all() and (y >= 0).all() and (w > 0).all() and (h > 0).all()
    assert (x + w <= 128).all() and (y + h <= 128).all()
    side = np.sqrt(w * h)
    assert side.min() < min_side and side.max() > max_side  # size spread across FPN levels
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=121)[1:]
    if name == "digits":
        assert per_image.min() >= 1 and per_image.max() <= 6
    else:
        counts = np.bincount(cats)[1:]
        assert counts.max() > 1.5 * counts.min()  # imbalanced on purpose
    with Image.open(paths["train_images"] / coco["images"][0]["file_name"]) as im:
        assert im.size == (128, 128) and im.mode == "RGB"
    ds = CocoDetection(paths["val_images"], paths["val_annotations"])
    assert not ds.problems and ds.class_names == [c["name"] for c in coco["categories"]]
    image, target = ds[0]
    assert image.shape == (3, 128, 128) and target["size"] == (128, 128)


def test_digit_boxes_hold_ink(generated):
    """Each digit's box holds ink that stands out from the rest of the box."""
    paths = generated["digits"]
    coco = json.loads(paths["val_annotations"].read_text())
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["bbox"])
    contrasts = []
    for im in coco["images"]:
        pixels = np.asarray(Image.open(paths["val_images"] / im["file_name"]), dtype=float)
        for x, y, w, h in by_image[im["id"]]:
            inside = pixels[y : y + h, x : x + w].reshape(-1, 3)
            contrasts.append(np.abs(inside - np.median(inside, axis=0)).max())
    assert np.median(contrasts) > 40  # ink stands out from the local background


def test_cache_reused_and_regenerated(tmp_path, monkeypatch):
    out = tmp_path / "set"
    paths = make_embedded("shapes", out, 4, 2, seed=0)
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["num_train"] == 4 and manifest["sha256"]["train.json"]
    calls = []
    real = embedded.write_split
    monkeypatch.setattr(embedded, "write_split", lambda *a: calls.append(a) or real(*a))
    make_embedded("shapes", out, 4, 2, seed=0)
    assert calls == []  # reused
    make_embedded("shapes", out, 5, 2, seed=0)
    assert len(calls) == 2  # manifest differs: regenerated
    assert len(json.loads((out / "train.json").read_text())["images"]) == 5
    (out / "val" / "000001.jpg").unlink()  # a damaged cache is regenerated too
    make_embedded("shapes", out, 5, 2, seed=0)
    assert len(calls) == 4 and (out / "val" / "000001.jpg").is_file()


def test_interrupted_generation_leaves_no_cache(tmp_path, monkeypatch):
    out = tmp_path / "set"
    make_embedded("shapes", out, 3, 1, seed=0)
    before = (out / "train.json").read_bytes()

    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "write_split", boom)
    with pytest.raises(KeyboardInterrupt):
        make_embedded("shapes", out, 9, 1, seed=0)
    assert (out / "train.json").read_bytes() == before  # the old complete cache is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temporary leftovers
    with pytest.raises(KeyboardInterrupt):
        make_embedded("shapes", tmp_path / "new", 3, 1, seed=0)
    assert not (tmp_path / "new").exists()


def test_refuses_foreign_directory_and_bad_arguments(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_embedded("shapes", foreign, 2, 1)
    assert (foreign / "thesis.tex").read_text() == "precious"
    with pytest.raises(ValueError, match="unknown embedded data set"):
        make_embedded("mnist", tmp_path / "x", 2, 1)


def test_val_independent_of_train_size(tmp_path):
    a = make_embedded("digits", tmp_path / "a", 3, 4, seed=7)
    b = make_embedded("digits", tmp_path / "b", 6, 4, seed=7)
    assert a["val_annotations"].read_bytes() == b["val_annotations"].read_bytes()


def _build_tiny_data(root: Path, *extra: str) -> None:
    cfg = load_config(preset_path("digits_teacher"), [*TINY_OVERRIDES, f"data.root={root}", *extra])
    build_datasets(cfg.data)


def _stamp(train_json: Path) -> tuple[str, int]:
    return train_json.read_text(), train_json.stat().st_mtime_ns


def test_run_seed_does_not_change_the_data_but_data_seed_does(tmp_path):
    _build_tiny_data(tmp_path, "seed=1")
    first = _stamp(tiny_data_dir(tmp_path) / "train.json")
    _build_tiny_data(tmp_path, "seed=2")
    assert _stamp(tiny_data_dir(tmp_path) / "train.json") == first  # same images, not rewritten
    _build_tiny_data(tmp_path, "seed=2", "data.seed=1")
    assert (tiny_data_dir(tmp_path, seed=1) / "train.json").read_text() != first[0]


def test_runs_with_different_data_settings_share_a_root_without_rewriting_each_other(tmp_path):
    _build_tiny_data(tmp_path)
    small = _stamp(tiny_data_dir(tmp_path) / "train.json")
    _build_tiny_data(tmp_path, "data.num_train=20")
    _build_tiny_data(tmp_path, "data.seed=3")
    assert _stamp(tiny_data_dir(tmp_path) / "train.json") == small
    larger = json.loads((tiny_data_dir(tmp_path, num_train=20) / "train.json").read_text())
    assert len(larger["images"]) == 20
    assert len(list(tmp_path.iterdir())) == 3


def test_digits_large_scenes_have_their_own_size_and_small_digits(tmp_path):
    from PIL import Image

    from detdistill.data.embedded.digits_large import MAX_HEIGHT

    paths = make_embedded("digits_large", tmp_path / "large", 3, 1, seed=0, image_size=512)
    coco = json.loads(paths["train_annotations"].read_text())
    sizes = set()
    for image in coco["images"]:
        with Image.open(paths["train_images"] / image["file_name"]) as im:
            assert im.size == (image["width"], image["height"])
        assert 256 <= image["width"] == image["height"] <= 512
        sizes.add(image["width"])
    assert len(sizes) > 1  # each scene draws its own side
    by_image = {i["id"]: i for i in coco["images"]}
    assert len(coco["annotations"]) >= 3
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        image = by_image[ann["image_id"]]
        assert 2 <= h <= MAX_HEIGHT and x >= 0 and y >= 0
        assert x + w <= image["width"] and y + h <= image["height"]


def test_data_make_offers_every_embedded_set():
    from detdistill.cli import build_parser
    from detdistill.data import EMBEDDED_DATASETS

    text = build_parser().parse_args(["data", "make", "digits_large", "--out", "x"])
    assert text.name == "digits_large"
    for name in EMBEDDED_DATASETS:
        build_parser().parse_args(["data", "make", name, "--out", "x"])
