"""CocoDetection: the sample format, class mapping, and every bad-input case a loader must count."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detdistill.data import (
    AnnotationFormatError,
    ClassMismatchError,
    CocoDetection,
    DataError,
    ImageReadError,
    check_class_names,
    collate_fn,
)
from detdistill.engine.builders import build_eval_loader

CATS = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]  # ids deliberately unsorted


def write_image(path: Path, h: int = 40, w: int = 60, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def make_coco(tmp_path: Path, annotations: list[dict] | None = None, images: list[dict] | None = None,
              categories: list[dict] | None = None, write: tuple[int, ...] = (1, 2)) -> tuple[Path, Path]:  # fmt: skip
    """Two 40x60 images (ids 1 and 2); ``write`` says which files exist on disk."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    images = images if images is not None else [
        {"id": 1, "file_name": "a.png", "width": 60, "height": 40},
        {"id": 2, "file_name": "b.png", "width": 60, "height": 40},
    ]  # fmt: skip
    for im in images:
        if im["id"] in write:
            write_image(
                img_dir / im["file_name"], im.get("height", 40), im.get("width", 60), im["id"]
            )
    if annotations is None:
        annotations = [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 7,
                "bbox": [10, 5, 20, 10],
                "area": 200,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 3,
                "bbox": [30.5, 20, 10, 15],
                "area": 150,
                "iscrowd": 0,
            },
        ]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": categories if categories is not None else CATS}))  # fmt: skip
    return img_dir, ann


def ann(i: int, image_id: int, cat: int, bbox: list, **kw) -> dict:
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, **kw}


def test_sample_format_and_class_order(tmp_path):
    img_dir, path = make_coco(tmp_path)
    ds = CocoDetection(img_dir, path)
    assert len(ds) == 2
    assert ds.class_names == ["dog", "cat"]  # category-id order
    assert ds.category_ids == [3, 7]
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 40, 60)
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert set(target) == {"boxes", "labels", "image_id", "orig_size", "size"}
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    torch.testing.assert_close(
        target["boxes"], torch.tensor([[10.0, 5, 30, 15], [30.5, 20, 40.5, 35]])
    )
    assert target["labels"].tolist() == [1, 0]
    assert (
        target["image_id"] == 1 and target["orig_size"] == (40, 60) and target["size"] == (40, 60)
    )
    # the pixels are the file's
    expected = (
        torch.from_numpy(np.array(Image.open(img_dir / "a.png"))).permute(2, 0, 1).float() / 255
    )
    torch.testing.assert_close(image, expected)
    # image 2 has no objects: kept as a negative
    _, negative = ds[1]
    assert negative["boxes"].shape == (0, 4) and negative["labels"].shape == (0,)
    assert ds.problems.info["negative_images"] == 1
    assert not ds.problems


def test_given_class_names_reorder_labels(tmp_path):
    img_dir, path = make_coco(tmp_path)
    ds = CocoDetection(img_dir, path, class_names=["cat", "dog"])
    assert ds.category_ids == [7, 3]
    assert ds[0][1]["labels"].tolist() == [0, 1]


def test_class_mismatch_names_the_classes(tmp_path):
    img_dir, path = make_coco(tmp_path)
    with pytest.raises(ClassMismatchError) as info:
        CocoDetection(img_dir, path, class_names=["cat", "bird"])
    assert info.value.missing == ["bird"] and info.value.extra == ["dog"]
    assert "bird" in str(info.value) and "dog" in str(info.value)
    with pytest.raises(ClassMismatchError, match="horse"):
        check_class_names(["cat", "dog", "horse"], ["cat", "dog"], what="student")


def test_corrupt_json_names_file_and_line(tmp_path):
    img_dir, path = make_coco(tmp_path)
    path.write_text('{"images": [1, 2,\n  "oops" }')
    with pytest.raises(AnnotationFormatError, match=r"ann\.json.*invalid JSON.*line 2"):
        CocoDetection(img_dir, path)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotations[0].bbox"),
        (lambda d: d["annotations"][1].pop("category_id"), "annotations[1].category_id"),
        (lambda d: d["annotations"][0].update(bbox=[1, "2", 3, 4]), "annotations[0].bbox"),
        (lambda d: d["images"][1].update(id="2"), "images[1].id"),
        (lambda d: d["images"][0].update(width=0), "images[0].width"),
        (lambda d: d["categories"][0].pop("name"), "categories[0].name"),
        (lambda d: d.update(images={"id": 1}), "images"),
        (lambda d: d.pop("categories"), "categories"),
        (lambda d: d["images"].append(dict(d["images"][0])), "images.id[2]"),
    ],
)
def test_schema_violations_name_the_field(tmp_path, mutate, field):
    img_dir, path = make_coco(tmp_path)
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(AnnotationFormatError) as info:
        CocoDetection(img_dir, path)
    assert info.value.field == field
    assert str(path) in str(info.value) and field in str(info.value)


def test_bad_boxes_dropped_or_clipped_and_counted_once(tmp_path, caplog):
    annotations = [
        ann(1, 1, 7, [10, 5, 20, 10]),  # fine
        ann(2, 1, 7, [10, 5, 0, 10]),  # zero width
        ann(3, 1, 3, [10, 5, 5, -3]),  # negative height
        ann(4, 1, 3, [50, 30, 20, 20]),  # partly outside -> clipped to [50, 30, 60, 40]
        ann(5, 1, 3, [70, 50, 5, 5]),  # entirely outside
        ann(6, 3, 3, [1, 1, 5, 5]),  # unknown image
        ann(7, 1, 99, [1, 1, 5, 5]),  # unknown category
        ann(8, 2, 3, [-5, -5, 10, 10]),  # clipped to [0, 0, 5, 5]
    ]
    img_dir, path = make_coco(tmp_path, annotations)
    with caplog.at_level(logging.WARNING, logger="detdistill.data"):
        ds = CocoDetection(img_dir, path)
    counts = ds.problems.counts
    assert counts == {
        "box_nonpositive_size": 2,
        "box_clipped": 2,
        "box_outside_image": 1,
        "unknown_image_id": 1,
        "unknown_category_id": 1,
    }
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one summary per data set, not one line per box
    assert "box_nonpositive_size=2" in warnings[0].getMessage()
    assert "unknown_category_id=1" in warnings[0].getMessage()
    t1, t2 = ds[0][1], ds[1][1]
    torch.testing.assert_close(t1["boxes"], torch.tensor([[10.0, 5, 30, 15], [50, 30, 60, 40]]))
    torch.testing.assert_close(t2["boxes"], torch.tensor([[0.0, 0, 5, 5]]))
    # the evaluation ground truth holds exactly the kept boxes
    gt = ds.coco_ground_truth
    assert len(gt["annotations"]) == 3
    assert {a["image_id"] for a in gt["annotations"]} == {1, 2}
    assert ds.problems.as_dict()["counts"]["box_clipped"] == 2


def test_nonfinite_box_is_dropped(tmp_path):
    annotations = [ann(1, 1, 7, [10, 5, 20, 10]), ann(2, 1, 7, [float("nan"), 5, 20, 10])]
    img_dir, path = make_coco(tmp_path, annotations)
    ds = CocoDetection(img_dir, path)
    assert ds.problems.counts == {"box_nonfinite": 1}
    assert len(ds[0][1]["boxes"]) == 1


def test_crowd_is_ignored_for_training_kept_for_eval(tmp_path):
    annotations = [ann(1, 1, 7, [10, 5, 20, 10]), ann(2, 1, 3, [30, 20, 10, 10], iscrowd=1)]
    img_dir, path = make_coco(tmp_path, annotations)
    ds = CocoDetection(img_dir, path)
    assert ds[0][1]["labels"].tolist() == [1]
    assert [a["iscrowd"] for a in ds.coco_ground_truth["annotations"]] == [0, 1]
    assert ds.problems.info["crowd_ignored"] == 1 and not ds.problems


def test_missing_image_is_dropped_and_counted(tmp_path, caplog):
    img_dir, path = make_coco(tmp_path, write=(1,))
    with caplog.at_level(logging.WARNING, logger="detdistill.data"):
        ds = CocoDetection(img_dir, path)
    assert len(ds) == 1 and ds.image_ids == [1]
    assert ds.problems.counts == {"missing_image": 1}
    assert "b.png" in ds.problems.examples["missing_image"][0]
    assert "missing_image=1" in caplog.text
    assert [im["id"] for im in ds.coco_ground_truth["images"]] == [1]


def test_all_images_missing_is_an_error(tmp_path):
    img_dir, path = make_coco(tmp_path, write=())
    with pytest.raises(FileNotFoundError, match="none of the 2 images"):
        CocoDetection(img_dir, path)
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        CocoDetection(img_dir, tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="image directory"):
        CocoDetection(tmp_path / "nope", path)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def make_jpeg_coco(tmp_path: Path) -> tuple[Path, Path]:
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 60, "height": 40} for i in (1, 2, 3)]
    img_dir, path = make_coco(
        tmp_path, [ann(1, 2, 7, [1, 1, 5, 5])], images=images, write=(1, 2, 3)
    )
    truncate(img_dir / "2.jpg")
    return img_dir, path


def test_truncated_jpeg_is_skipped_counted_and_logged(tmp_path, caplog):
    img_dir, path = make_jpeg_coco(tmp_path)
    ds = CocoDetection(img_dir, path)
    assert len(ds) == 3  # found only when loaded
    with caplog.at_level(logging.WARNING, logger="detdistill.data"):
        _, target = ds[1]
    assert target["image_id"] == 3  # the next readable image replaces it
    assert ds.problems.counts == {"unreadable_image": 1}
    assert "2.jpg" in caplog.text and "truncated" in caplog.text
    caplog.clear()
    ds[1]
    assert ds.problems.counts["unreadable_image"] == 1 and not caplog.records  # once per file
    images, targets = collate_fn([ds[i] for i in range(3)])
    assert [t["image_id"] for t in targets] == [1, 3, 3] and len(images) == 3


def test_truncated_jpeg_raise_and_verify_modes(tmp_path):
    img_dir, path = make_jpeg_coco(tmp_path)
    strict = CocoDetection(img_dir, path, on_bad_image="raise")
    with pytest.raises(ImageReadError, match=r"2\.jpg.*truncated"):
        strict[1]
    verified = CocoDetection(img_dir, path, verify_images=True)
    assert verified.image_ids == [1, 3]
    assert verified.problems.counts == {"unreadable_image": 1}


def test_not_an_image_and_size_mismatch(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 60, "height": 40} for i in (1, 2, 3)]
    img_dir, path = make_coco(tmp_path, images=images, write=(1, 2, 3))
    (img_dir / "1.png").write_bytes(b"this is not a png")
    write_image(img_dir / "2.png", h=41, w=60)
    ds = CocoDetection(img_dir, path, verify_images=True)
    assert ds.image_ids == [3]
    assert ds.problems.counts == {"unreadable_image": 1, "image_size_mismatch": 1}
    with pytest.raises(ImageReadError, match=r"1\.png.*cannot read image"):
        CocoDetection(img_dir, path, verify_images=True, on_bad_image="raise")
    (img_dir / "3.png").write_bytes(b"")
    with pytest.raises(DataError, match="no readable image"):
        CocoDetection(img_dir, path, verify_images=True)


def test_missing_width_height_read_from_header(tmp_path):
    images = [
        {"id": 1, "file_name": "a.png"},
        {"id": 2, "file_name": "b.png", "width": 60, "height": 40},
    ]
    img_dir, path = make_coco(tmp_path, images=images)
    ds = CocoDetection(img_dir, path)
    assert ds.records[0].height == 40 and ds.records[0].width == 60
    assert ds[0][1]["orig_size"] == (40, 60)


def test_loader_batches_lists(tmp_path):
    img_dir, path = make_coco(tmp_path)
    ds = CocoDetection(img_dir, path)
    images, targets = next(iter(build_eval_loader(ds, 2, num_workers=0)))
    assert isinstance(images, list) and len(images) == 2 and targets[0]["image_id"] == 1
