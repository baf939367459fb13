"""Inference API and ``run_predict``: input types, original coordinates, bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import detdistill
from conftest import tiny_data_dir
from detdistill.cli import main as cli_main
from detdistill.predict import NoImagesError, PredictOptionError, Predictor, load, run_predict

TRAIN_SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models gain nothing from threads (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def trained(tiny_checkpoint) -> dict[str, Path]:
    tmp = tiny_checkpoint.parent.parent
    images = sorted((tiny_data_dir(tmp) / "val").glob("*.jpg"))
    assert len(images) >= 4
    return {"checkpoint": tiny_checkpoint, "images": images, "tmp": tmp}


@pytest.fixture(scope="module")
def predictor(trained) -> Predictor:
    return load(trained["checkpoint"])


def _same(a: dict, b: dict, atol: float = 0.0) -> None:
    torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=atol)
    torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=atol)
    assert torch.equal(a["labels"], b["labels"])
    assert a["names"] == b["names"]


def test_load_gives_an_eval_model_with_class_names(trained, predictor):
    assert not predictor.model.training
    payload = torch.load(trained["checkpoint"], weights_only=True)
    assert predictor.class_names == payload["class_names"]
    assert predictor.image_size == TRAIN_SIZE
    lazy = detdistill.load(trained["checkpoint"])
    assert isinstance(lazy, Predictor) and lazy.class_names == predictor.class_names


def test_every_input_type_gives_the_same_detections(trained, predictor):
    path = trained["images"][0]
    array = np.array(Image.open(path).convert("RGB"))
    pil = Image.open(path)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    kwargs = {"score_threshold": 0.0, "max_detections": 20}
    reference = predictor.predict(str(path), **kwargs)
    assert len(reference) == 1 and len(reference[0]["scores"]) == 20
    for image in (path, pil, array, tensor, torch.from_numpy(array).permute(2, 0, 1)):
        _same(predictor.predict(image, **kwargs)[0], reference[0])
    batch = predictor.predict([path, array], **kwargs)  # a list: one padded batch
    assert len(batch) == 2
    _same(batch[0], batch[1])
    _same(batch[0], reference[0], atol=1e-4)  # batched convolutions round differently
    det = reference[0]
    assert det["names"] == [predictor.class_names[i] for i in det["labels"].tolist()]
    assert bool((det["scores"][:-1] >= det["scores"][1:]).all()), "best first"


def test_boxes_are_in_the_original_image_coordinates(trained, predictor):
    height, width = 90, 150  # not the training size, and not square
    image = Image.open(trained["images"][1]).convert("RGB").resize((width, height))
    det = predictor.predict(image, score_threshold=0.0, max_detections=300)[0]
    boxes = det["boxes"]
    assert boxes.shape[0] > 0
    assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all())
    assert float(boxes[:, 2].max()) <= width and float(boxes[:, 3].max()) <= height
    assert bool((boxes[:, 2:] >= boxes[:, :2]).all())
    # Mapped back from the 64-px network input: boxes reach past 64 px horizontally.
    assert float(boxes[:, 2].max()) > 1.5 * TRAIN_SIZE


def test_overrides_apply_to_one_call_only(predictor):
    before = (predictor.model.score_thresh, predictor.model.detections_per_img)
    det = predictor.predict(torch.rand(3, 50, 70), score_threshold=0.0, max_detections=3)[0]
    assert len(det["scores"]) == 3
    assert (predictor.model.score_thresh, predictor.model.detections_per_img) == before
    assert predictor.predict(torch.rand(3, 50, 70), score_threshold=1.0)[0]["boxes"].shape == (
        0,
        4,
    )
    with pytest.raises(PredictOptionError, match="max_detections"):
        predictor.predict(torch.rand(3, 50, 70), max_detections=0)
    with pytest.raises(TypeError, match="path, a PIL image"):
        predictor.predict(42)
    with pytest.raises(ValueError, match="numpy image"):
        predictor.predict(np.zeros((3, 5, 5, 2), dtype=np.uint8))


def _mixed_folder(trained, root: Path) -> dict[str, Path]:
    images = trained["images"]
    (root / "sub").mkdir(parents=True)
    shutil.copy(images[0], root / "a.jpg")
    shutil.copy(images[1], root / "sub" / "a.jpg")  # same name in a subfolder
    Image.open(images[2]).convert("RGB").resize((100, 70)).save(root / "c.png")
    data = images[3].read_bytes()
    (root / "broken.jpg").write_bytes(data[: len(data) // 3])  # truncated JPEG
    (root / "notes.txt").write_text("not an image\n")
    return {"valid": [root / "a.jpg", root / "sub" / "a.jpg", root / "c.png"]}


def test_run_predict_on_a_folder_with_bad_files(trained, tmp_path):
    folder = _mixed_folder(trained, tmp_path / "in")
    out = tmp_path / "out"
    summary = run_predict(
        trained["checkpoint"],
        [str(tmp_path / "in")],
        out,
        score_threshold=0.0,
        max_detections=5,
        batch_size=2,
        show_progress=False,
    )
    assert summary["images"] == 3
    assert summary["detections"] == 15
    assert summary["skipped"] == 2
    assert summary["out"] == out
    reasons = {Path(s["file"]).name: s["reason"] for s in summary["skipped_files"]}
    assert set(reasons) == {"broken.jpg", "notes.txt"}
    assert "runcated" in reasons["broken.jpg"]
    assert "extension" in reasons["notes.txt"]

    info = json.loads((out / "summary.json").read_text())
    assert {Path(i["file_name"]) for i in info["images"]} == set(folder["valid"])
    assert [i["id"] for i in info["images"]] == [1, 2, 3]
    assert len({i["output"] for i in info["images"]}) == 3, "same file names must not collide"
    for entry in info["images"]:
        drawn = Image.open(out / entry["output"])
        original = Image.open(entry["file_name"])
        assert drawn.size == original.size == (entry["width"], entry["height"])
    assert {c["id"] for c in info["categories"]} == set(range(1, 7))
    assert [s["file"] for s in info["skipped"]] == [s["file"] for s in summary["skipped_files"]]

    results = json.loads((out / "results.json").read_text())
    assert isinstance(results, list) and len(results) == 15
    sizes = {i["id"]: (i["width"], i["height"]) for i in info["images"]}
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score"}
        assert r["image_id"] in sizes and 1 <= r["category_id"] <= 6
        x, y, w, h = r["bbox"]
        width, height = sizes[r["image_id"]]
        assert w >= 0 and h >= 0 and x >= 0 and y >= 0
        assert x + w <= width + 0.01 and y + h <= height + 0.01
        assert 0.0 <= r["score"] <= 1.0

    # The files load into a COCO evaluator as ground-truth skeleton + results.
    from pycocotools.coco import COCO

    gt = COCO()
    gt.dataset = {"images": info["images"], "categories": info["categories"], "annotations": []}
    gt.createIndex()
    dt = gt.loadRes(str(out / "results.json"))
    assert len(dt.getAnnIds()) == 15


def test_run_predict_without_images_is_a_clear_error(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(NoImagesError, match="no image files"):
        run_predict(trained["checkpoint"], [tmp_path / "empty"], tmp_path / "o1")
    with pytest.raises(FileNotFoundError, match="input not found"):
        run_predict(trained["checkpoint"], [tmp_path / "missing"], tmp_path / "o2")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(NoImagesError, match="could be read"):
        run_predict(trained["checkpoint"], [bad], tmp_path / "o3", show_progress=False)
    assert "x.jpg" in (tmp_path / "o3" / "summary.json").read_text()


def test_cli_predict(trained, tmp_path, capsys):
    code = cli_main(
        [
            "predict",
            str(trained["checkpoint"]),
            str(trained["images"][0]),
            "--out",
            str(tmp_path / "cli"),
            "--no-progress",
        ]
    )
    assert code == 0
    assert "1 images" in capsys.readouterr().out
    assert (tmp_path / "cli" / trained["images"][0].name).is_file()
    code = cli_main(
        ["predict", str(trained["checkpoint"]), str(tmp_path / "nowhere"), "--out", "x"]
    )
    assert code == 2
    assert "input not found" in capsys.readouterr().err
    taken = tmp_path / "taken.txt"  # --out names a file: one line, not a traceback
    taken.write_text("a file, not a folder\n")
    argv = ["predict", str(trained["checkpoint"]), str(trained["images"][0]), "--out", str(taken)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "File exists" in err and str(taken) in err
