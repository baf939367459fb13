"""VOCDetection: round trip through XML, difficult objects, and malformed files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detdistill.data import VOC_CLASSES, AnnotationFormatError, ClassMismatchError, VOCDetection
from detdistill.evaluation import coco_metrics


def xml_for(filename: str, w: int, h: int, objects: list[tuple]) -> str:
    """objects: (name, difficult, xmin, ymin, xmax, ymax) in VOC's 1-based pixels."""
    parts = [f"<annotation><filename>{filename}</filename>"
             f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"]  # fmt: skip
    for name, difficult, x1, y1, x2, y2 in objects:
        parts.append(
            f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


SCENES = {
    "2007_000001": (50, 40, [("dog", 0, 1, 1, 50, 40), ("person", 0, 11, 6, 30, 25)]),
    "2007_000002": (64, 48, [("cat", 0, 5, 5, 20, 20), ("cat", 1, 30, 30, 40, 45)]),
    "2007_000003": (32, 32, []),
}


def make_voc(root: Path, scenes: dict = SCENES, split: str = "train") -> Path:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, (w, h, objects) in scenes.items():
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        (root / "Annotations" / f"{name}.xml").write_text(xml_for(f"{name}.jpg", w, h, objects))
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(scenes) + "\n")
    return root


def test_round_trip(tmp_path):
    ds = VOCDetection(make_voc(tmp_path))
    assert ds.class_names == list(VOC_CLASSES) and ds.category_ids == list(range(1, 21))
    assert len(ds) == 3 and ds.image_ids == [1, 2, 3]
    image, t = ds[0]
    assert image.shape == (3, 40, 50) and t["orig_size"] == (40, 50)
    # 1-based inclusive pixels -> continuous coordinates: whole image is (0, 0, W, H)
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.0, 0, 50, 40], [10, 5, 30, 25]]))
    assert t["labels"].tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    # difficult objects are not training targets ...
    t2 = ds[1][1]
    torch.testing.assert_close(t2["boxes"], torch.tensor([[4.0, 4, 20, 20]]))
    assert ds.problems.info["difficult_ignored"] == 1 and ds.problems.info["negative_images"] == 1
    assert ds[2][1]["boxes"].shape == (0, 4)
    # ... but ignore regions (iscrowd) in the COCO ground truth
    gt = ds.coco_ground_truth
    assert [(a["image_id"], a["iscrowd"]) for a in gt["annotations"]] == [
        (1, 0),
        (1, 0),
        (2, 0),
        (2, 1),
    ]
    assert gt["annotations"][1]["bbox"] == [10.0, 5.0, 20.0, 20.0]
    assert [c["name"] for c in gt["categories"]] == list(VOC_CLASSES)
    assert not ds.problems


def test_voc_ground_truth_scores_perfect_detections(tmp_path):
    ds = VOCDetection(make_voc(tmp_path), include_difficult=False)
    dets = [
        {**{k: a[k] for k in ("image_id", "category_id", "bbox")}, "score": 0.9}
        for a in ds.coco_ground_truth["annotations"]
        if not a["iscrowd"]
    ]
    assert coco_metrics(ds.coco_ground_truth, dets)["mAP"] == pytest.approx(1.0)
    # a detection on the difficult object is neither a true nor a false positive
    difficult = next(a for a in ds.coco_ground_truth["annotations"] if a["iscrowd"])
    extra = {
        "image_id": 2,
        "category_id": difficult["category_id"],
        "bbox": difficult["bbox"],
        "score": 0.95,
    }
    assert coco_metrics(ds.coco_ground_truth, [*dets, extra])["mAP"] == pytest.approx(1.0)


def test_include_difficult(tmp_path):
    ds = VOCDetection(make_voc(tmp_path), include_difficult=True)
    assert len(ds[1][1]["boxes"]) == 2 and ds.problems.info["difficult_ignored"] == 0


def test_custom_classes_and_mismatch(tmp_path):
    root = make_voc(tmp_path, {"a": (20, 20, [("widget", 0, 2, 2, 10, 10)])})
    ds = VOCDetection(root)  # not VOC names: inferred
    assert ds.class_names == ["widget"]
    ds = VOCDetection(root, class_names=["gadget", "widget"])  # unused classes are fine
    assert ds[0][1]["labels"].tolist() == [1]
    with pytest.raises(ClassMismatchError, match="widget") as info:
        VOCDetection(root, class_names=["gadget"])
    assert info.value.extra == ["widget"] and info.value.missing == []


def test_a_malformed_xml_is_a_counted_skip_and_strict_mode_names_it(tmp_path):
    root = make_voc(tmp_path)
    bad = root / "Annotations" / "2007_000002.xml"
    bad.write_text("<annotation><object><name>cat</name></annotation>")
    ds = VOCDetection(root)
    assert ds.problems.counts == {"bad_annotation": 1}
    assert ds.image_ids == [1, 3]  # every valid image is kept, the broken one alone is lost
    assert "2007_000002.xml" in str(ds.problems.as_dict()) and "invalid XML" in str(
        ds.problems.as_dict()
    )
    with pytest.raises(AnnotationFormatError, match=r"2007_000002\.xml.*invalid XML"):
        VOCDetection(root, on_bad_annotation="raise")


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("<xmin>5</xmin>", "", "object[0]/bndbox/xmin"),
        ("<xmin>5</xmin>", "<xmin>five</xmin>", "object[0]/bndbox/xmin"),
        ("<name>cat</name>", "<name></name>", "object[0]/name"),
        ("<difficult>1</difficult>", "<difficult>yes</difficult>", "object[1]/difficult"),
    ],
)
def test_schema_violations_name_the_element(tmp_path, old, new, field):
    root = make_voc(tmp_path)
    path = root / "Annotations" / "2007_000002.xml"
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(AnnotationFormatError) as info:
        VOCDetection(root, on_bad_annotation="raise")
    assert info.value.field == field and "2007_000002.xml" in str(info.value)


def test_missing_files_and_bad_boxes_are_counted(tmp_path):
    scenes = {
        **SCENES,
        "2007_000004": (40, 40, [("dog", 0, 10, 10, 9, 20), ("dog", 0, 30, 30, 60, 50)]),
    }
    root = make_voc(tmp_path, scenes)
    (root / "Annotations" / "2007_000001.xml").unlink()
    (root / "JPEGImages" / "2007_000003.jpg").unlink()
    ds = VOCDetection(root)
    assert ds.problems.counts == {
        "missing_annotation": 1,
        "missing_image": 1,
        "box_nonpositive_size": 1,
        "box_clipped": 1,
    }
    assert ds.image_ids == [2, 4]
    torch.testing.assert_close(ds[1][1]["boxes"], torch.tensor([[29.0, 29, 40, 40]]))
    with pytest.raises(FileNotFoundError, match="split file"):
        VOCDetection(root, split="val")
