"""Sliced inference: windows, the merge across windows, boxes back in image pixels, and the commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import batched_nms

import detdistill
from detdistill.cli import main
from detdistill.engine.evaluate_checkpoint import evaluate_checkpoint
from detdistill.slicing import (
    SlicedDetector,
    SliceSettings,
    merge_detections,
    slice_windows,
    window_starts,
)


def test_window_starts_worked_by_hand():
    # step 400 * 0.8 = 320: windows at 0 and 320, then one flush with the end (600)
    assert window_starts(1000, 400, 0.2) == [0, 320, 600]
    assert window_starts(300, 400, 0.2) == [0]  # smaller than a window: one window
    assert window_starts(400, 400, 0.5) == [0]
    assert window_starts(401, 400, 0.0) == [0, 1]
    assert window_starts(1000, 250, 0.0) == [0, 250, 500, 750]


@pytest.mark.parametrize(("height", "width"), [(1000, 700), (333, 1201), (50, 60)])
def test_windows_cover_every_pixel_and_stay_inside(height, width):
    windows = slice_windows(height, width, 256, 0.25)
    covered = torch.zeros(height, width, dtype=torch.bool)
    for x0, y0, x1, y1 in windows.tolist():
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert x1 - x0 == min(256, width) and y1 - y0 == min(256, height)
        covered[y0:y1, x0:x1] = True
    assert bool(covered.all())


def test_ios_merge_drops_a_cut_piece_that_iou_nms_keeps():
    boxes = torch.tensor(
        [
            [100.0, 100, 200, 200],  # the whole object, seen by one window
            [100.0, 100, 150, 200],  # the piece another window's border cut: IoU 0.5, IoS 1
            [100.0, 100, 150, 200],  # the same place, another class: kept
            [400.0, 400, 450, 450],  # elsewhere: kept
        ]
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 1, 0])
    assert merge_detections(boxes, scores, labels, "ios", 0.5).tolist() == [0, 2, 3]
    assert merge_detections(boxes, scores, labels, "nms", 0.5).tolist() == [0, 1, 2, 3]
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [0, 1, 2, 3]


class BrightBlobDetector(torch.nn.Module):
    """A stand-in detector: the box of the pixels brighter than 0.5, scored by its area."""

    detections_per_img = 10

    def forward(self, images):
        out = []
        for image in images:
            ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
            if len(xs) == 0:
                out.append({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                            "labels": torch.zeros(0, dtype=torch.int64)})  # fmt: skip
                continue
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]).float()
            out.append({"boxes": box, "scores": torch.tensor([len(xs) / 1e4]),
                        "labels": torch.tensor([0])})  # fmt: skip
        return out


def _ios_merge_by_loop(boxes, scores, labels, threshold):
    """The rule written plainly: best first, drop a box overlapping a kept one of its class."""
    kept = []
    for i in sorted(range(len(boxes)), key=lambda k: -float(scores[k])):
        x0, y0, x1, y1 = boxes[i].tolist()
        for j in kept:
            if labels[j] != labels[i]:
                continue
            a0, b0, a1, b1 = boxes[j].tolist()
            inter = max(0.0, min(x1, a1) - max(x0, a0)) * max(0.0, min(y1, b1) - max(y0, b0))
            smaller = min((x1 - x0) * (y1 - y0), (a1 - a0) * (b1 - b0))
            if inter / max(smaller, 1e-6) > threshold:
                break
        else:
            kept.append(i)
    return kept


def test_ios_merge_equals_a_plain_loop_on_random_detections():
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(300, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 5 + torch.rand(300, 2, generator=g) * 40], dim=1)
    scores = torch.rand(300, generator=g)
    labels = torch.randint(0, 4, (300,), generator=g)
    expected = _ios_merge_by_loop(boxes, scores, labels, 0.5)
    assert len(expected) < 250  # the random boxes overlap: the rule has work to do
    assert merge_detections(boxes, scores, labels, "ios", 0.5).tolist() == expected
    empty = torch.zeros(0, 4)
    assert merge_detections(empty, empty[:, 0], empty[:, 0].long(), "ios", 0.5).numel() == 0


class NestedBoxesDetector(torch.nn.Module):
    """Two boxes of one class, one inside the other: what its own NMS keeps."""

    def forward(self, images):
        boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [10.0, 10.0, 20.0, 20.0]])
        return [{"boxes": boxes, "scores": torch.tensor([0.9, 0.8]),
                 "labels": torch.tensor([0, 0])} for _ in images]  # fmt: skip


def test_an_image_of_one_window_gets_the_detectors_own_answer():
    """No window border to merge across: IoS must not drop the nested box the detector kept."""
    sliced = SlicedDetector(NestedBoxesDetector(), SliceSettings(64, 0.2))
    (result,) = sliced([torch.zeros(3, 50, 60)])
    assert result["boxes"].tolist() == [[0.0, 0.0, 40.0, 40.0], [10.0, 10.0, 20.0, 20.0]]


@pytest.mark.parametrize("full_image", [True, False])
def test_an_object_across_a_window_border_comes_back_whole_in_image_pixels(full_image):
    image = torch.zeros(3, 1000, 1000)
    image[:, 500:560, 380:430] = 1.0  # windows (size 400, overlap 0.2) start at 0, 320, 600
    sliced = SlicedDetector(BrightBlobDetector(), SliceSettings(400, 0.2, full_image=full_image))
    (result,) = sliced([image])
    # the window at x 0..400 sees only x 380..400 of it; the one at 320..720 sees it whole
    assert result["boxes"].tolist() == [[380.0, 500.0, 430.0, 560.0]]
    assert result["labels"].tolist() == [0]
    nms = SlicedDetector(
        BrightBlobDetector(), SliceSettings(400, 0.2, merge="nms", full_image=False)
    )
    assert len(nms([image])[0]["boxes"]) == 2  # IoU 0.4 between piece and whole: both kept


def test_slice_settings_are_checked():
    with pytest.raises(ValueError, match="overlap must be in"):
        SliceSettings(256, overlap=1.0)
    with pytest.raises(ValueError, match="size must be >= 1"):
        SliceSettings(0)


def test_sliced_prediction_and_evaluation_of_a_trained_model(tiny_checkpoint, tmp_path):
    predictor = detdistill.load(tiny_checkpoint)
    image = torch.rand(3, 150, 220)
    (plain,) = predictor.predict(image, score_threshold=0.0)
    (sliced,) = predictor.predict(image, score_threshold=0.0, slices=SliceSettings(64, 0.25))
    for result in (plain, sliced):
        boxes = result["boxes"]
        assert len(boxes) <= predictor.model.detections_per_img
        assert bool((boxes[:, 2] <= 220).all() and (boxes[:, 3] <= 150).all())
    metrics = evaluate_checkpoint(
        tiny_checkpoint, out=tmp_path / "m.json", slices=SliceSettings(48, 0.25)
    )
    assert metrics["slices"]["size"] == 48 and 0.0 <= metrics["metrics"]["mAP"] <= 1.0


def test_eval_with_slices_on_a_voc_folder_of_mixed_sizes_and_formats(tiny_checkpoint, tmp_path):
    root = tmp_path / "voc"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = []
    for i, (ext, (h, w)) in enumerate(
        [(".png", (90, 130)), (".jpg", (200, 150)), (".tif", (120, 260))]
    ):
        stem = f"img{i}"
        ids.append(stem)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "JPEGImages" / f"{stem}{ext}"
        )
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}{ext}</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size><object><name>circle</name>"
            "<difficult>0</difficult><bndbox><xmin>10</xmin><ymin>10</ymin><xmax>40</xmax>"
            "<ymax>50</ymax></bndbox></object></annotation>"
        )
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(ids) + "\n")
    out = tmp_path / "sliced.json"
    code = main(["eval", str(tiny_checkpoint), "--data", str(root), "--format", "voc",
                 "--slice-size", "64", "--slice-overlap", "0.25", "--out", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(Path(out).read_text())
    assert result["images"] == 3 and result["slices"]["size"] == 64
    assert result["data_problems"]["counts"] == {}


def test_predict_command_slices_and_records_it(tiny_checkpoint, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (150, 230, 3), dtype=np.uint8)).save(
        images / "wide.png"
    )
    out = tmp_path / "out"
    code = main(["predict", str(tiny_checkpoint), str(images), "--out", str(out),
                 "--slice-size", "64", "--slice-merge", "nms", "--no-progress"])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["slices"]["size"] == 64 and summary["slices"]["merge"] == "nms"
    for result in json.loads((out / "results.json").read_text()):
        x, y, w, h = result["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 230.01 and y + h <= 150.01
    assert main(["predict", str(tiny_checkpoint), str(images), "--out", str(out),
                 "--slice-size", "64", "--slice-overlap", "1.5"]) == 2  # fmt: skip
