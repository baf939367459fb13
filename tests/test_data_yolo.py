"""YoloDetection and write_yolo: the layout, every planted fault counted, and a COCO round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from detdistill.cli import main
from detdistill.data import (
    PROBLEM_KINDS,
    AnnotationFormatError,
    ClassMismatchError,
    CocoDetection,
    DataError,
    ImageReadError,
    YoloDetection,
    make_embedded,
    write_yolo,
)
from detdistill.data.yolo import label_path
from detdistill.engine.builders import LoadedModel, build_datasets
from detdistill.engine.config import DataConfig, load_config
from detdistill.engine.evaluate_checkpoint import evaluation_data
from detdistill.engine.presets import preset_path
from detdistill.errors import ConfigError

H, W = 24, 32  # every test image is 32 wide, 24 high


def write_image(path: Path, h: int = H, w: int = W, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def write_labels(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_yaml(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def simple_set(root: Path, names: object = ("cat", "dog"), **extra: object) -> Path:
    """``train`` and ``val`` with one image each, one box each; returns data.yaml."""
    for split, line in (("train", "0 0.5 0.5 0.5 0.5\n"), ("val", "1 0.25 0.25 0.5 0.5\n")):
        write_image(root / "images" / split / "a.png")
        write_labels(root / "labels" / split / "a.txt", line)
    names = list(names) if isinstance(names, tuple) else names
    return write_yaml(
        root / "data.yaml", {"train": "images/train", "val": "images/val", "names": names, **extra}
    )


# --------------------------------------------------------------------------- planted faults

A_LABELS = """\
0 0.5 0.5 0.5 0.5
1 0.5 0.5 0.25
x 0.5 0.5 0.1 0.1
5 0.5 0.5 0.1 0.1
1.5 0.5 0.5 0.1 0.1

1 0.05 0.5 0.2 0.5
0 1.5 0.5 0.2 0.2
0 0.5 0.5 0 0.2
1 0.1 0.5 0.201 0.2
"""


@pytest.fixture
def faulty(tmp_path: Path) -> Path:
    """A train split with one of every fault (see A_LABELS) and odd files around it."""
    root = tmp_path / "ds"
    images, labels = root / "images" / "train", root / "labels" / "train"
    write_image(images / "a.png", seed=1)
    write_labels(labels / "a.txt", A_LABELS)
    write_image(images / "b.png", seed=2)  # no label file: background
    write_image(images / "c.png", seed=3)
    write_labels(labels / "c.txt", "\n  \n")  # empty label file: background
    (images / "d.jpg").write_bytes(b"not a jpeg at all" * 10)  # unreadable
    write_image(images / "sub" / "e.PNG", seed=5)  # nested, upper-case suffix
    write_labels(labels / "sub" / "e.txt", "1 0.25 0.25 0.5 0.5\n")
    (images / "notes.txt").write_text("not an image\n")
    return write_yaml(
        root / "data.yaml",
        {"path": ".", "train": "images/train", "val": "images/train", "names": ["cat", "dog"]},
    )


def test_planted_faults_are_counted_exactly(faulty):
    ds = YoloDetection(faulty, "train")
    assert dict(ds.problems.counts) == {
        "label_malformed": 2,  # 4 fields; non-numeric class
        "label_class_out_of_range": 2,  # 5 with two classes; 1.5
        "box_clipped": 1,  # x from -0.05
        "box_outside_image": 1,  # cx 1.5
        "box_nonpositive_size": 1,  # w 0
        "unreadable_image": 1,  # d.jpg
    }
    info = ds.problems.info
    assert info["background_images"] == 2  # b (no file) and c (blank file)
    assert info["images"] == 4 and info["negative_images"] == 2
    assert info["annotations"] == 4  # a: good, clipped, within tolerance; e: one
    assert [r.file_name for r in ds.records] == [
        "images/train/a.png",
        "images/train/b.png",
        "images/train/c.png",
        "images/train/sub/e.PNG",
    ]
    assert ds.image_ids == [1, 2, 3, 5]  # positions in sorted order; d.jpg was 4
    assert ds.category_ids == [1, 2] and ds.class_names == ["cat", "dog"]

    image, target = ds[0]
    assert image.shape == (3, H, W) and target["orig_size"] == (H, W)
    expected = torch.tensor(
        [
            [8.0, 6.0, 24.0, 18.0],  # 0.5 +- 0.25 of 32 and 24
            [0.0, 6.0, 4.8, 18.0],  # (0.05 - 0.1) * 32 = -1.6 clipped to 0
            [0.0, 9.6, 6.416, 14.4],  # -0.0005 * 32 = -0.016: within the tolerance
        ]
    )
    torch.testing.assert_close(target["boxes"], expected, atol=1e-4, rtol=0)
    assert target["labels"].tolist() == [0, 1, 1]
    assert ds[3][1]["boxes"].tolist() == [[0.0, 0.0, 16.0, 12.0]]


def test_problem_examples_name_the_label_file_and_line(faulty):
    ds = YoloDetection(faulty, "train")
    ex = ds.problems.examples
    assert "a.txt:2:" in ex["label_malformed"][0] and "5 fields" in ex["label_malformed"][0]
    assert "a.txt:3:" in ex["label_malformed"][1]
    assert "a.txt:4:" in ex["label_class_out_of_range"][0]
    assert ex["box_clipped"][0].endswith("a.txt:7")
    assert ex["box_outside_image"][0].endswith("a.txt:8")
    assert ex["box_nonpositive_size"][0].endswith("a.txt:9")
    assert "d.jpg" in ex["unreadable_image"][0]
    for kind in ds.problems.counts:
        assert kind in PROBLEM_KINDS


def test_raise_modes(faulty):
    with pytest.raises(AnnotationFormatError) as exc:
        YoloDetection(faulty, "train", on_bad_label="raise")
    message = str(exc.value)
    assert "a.txt" in message and "line 2" in message and "\n" not in message
    with pytest.raises(ImageReadError, match=r"d\.jpg"):
        YoloDetection(faulty, "train", on_bad_image="raise")


def test_label_file_not_text_drops_its_image(tmp_path):
    data = simple_set(tmp_path)
    (tmp_path / "labels" / "train" / "a.txt").write_bytes(b"\xff\xfe\x00garbage")
    write_image(tmp_path / "images" / "train" / "b.png")
    ds = YoloDetection(data, "train")
    assert dict(ds.problems.counts) == {"label_unreadable": 1}
    assert [r.file_name for r in ds.records] == ["images/train/b.png"]


def test_symlinked_images_folder_keeps_its_labels(tmp_path):
    write_image(tmp_path / "storage" / "pics" / "a.png")
    (tmp_path / "ds" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "images" / "train").symlink_to(tmp_path / "storage" / "pics")
    write_labels(tmp_path / "ds" / "labels" / "train" / "a.txt", "0 0.5 0.5 0.5 0.5\n")
    data = write_yaml(tmp_path / "ds" / "data.yaml", {"train": "images/train", "names": ["cat"]})
    ds = YoloDetection(data, "train")
    assert ds.problems.info["background_images"] == 0
    assert ds[0][1]["boxes"].tolist() == [[8.0, 6.0, 24.0, 18.0]]


def test_label_path_replaces_the_last_images_folder():
    assert label_path("/d/images/x/images/train/a.jpg") == Path("/d/images/x/labels/train/a.txt")
    assert label_path("/d/train/a.b.JPG") == Path("/d/train/a.b.txt")
    assert label_path("/d/images/a.jpg") == Path("/d/labels/a.txt")


# --------------------------------------------------------------------------- data.yaml


@pytest.mark.parametrize(
    "names", [["cat", "dog"], {0: "cat", 1: "dog"}, {1: "dog", 0: "cat"}, {"0": "cat", "1": "dog"}]
)
def test_names_as_list_or_mapping(tmp_path, names):
    ds = YoloDetection(simple_set(tmp_path, names), "val")
    assert ds.class_names == ["cat", "dog"]
    assert ds[0][1]["labels"].tolist() == [1]
    assert ds[0][1]["boxes"].tolist() == [[0.0, 0.0, 16.0, 12.0]]


def test_numeric_names_become_strings_and_nc_is_checked(tmp_path):
    ds = YoloDetection(simple_set(tmp_path, [0, 1], nc=2), "train")
    assert ds.class_names == ["0", "1"]


def test_given_class_names_reorder_labels_and_are_checked(tmp_path):
    data = simple_set(tmp_path)
    ds = YoloDetection(data, "train", class_names=["dog", "cat"])
    assert ds[0][1]["labels"].tolist() == [1]  # cat
    assert ds.category_ids == [2, 1]  # the yaml's ids + 1
    assert ds.coco_ground_truth["categories"] == [
        {"id": 2, "name": "dog"},
        {"id": 1, "name": "cat"},
    ]
    assert ds.coco_ground_truth["annotations"][0]["category_id"] == 1
    with pytest.raises(ClassMismatchError, match="bird"):
        YoloDetection(data, "train", class_names=["cat", "dog", "bird"])


def test_list_file_split_with_a_missing_image(tmp_path):
    root = tmp_path / "root"
    simple_set(root)
    write_image(root / "images" / "extra" / "b.png")
    write_labels(root / "labels" / "extra" / "b.txt", "0 0.5 0.5 1 1\n")
    (root / "val.txt").write_text(
        f"./images/val/a.png\n{root / 'images' / 'extra' / 'b.png'}\n\nimages/val/gone.png\n"
    )
    data = write_yaml(
        tmp_path / "cfg" / "data.yaml",
        {"path": "../root", "train": ["images/train", "images/extra"], "val": "val.txt",
         "names": ["cat", "dog"]},
    )  # fmt: skip
    val = YoloDetection(data, "val")
    assert [r.file_name for r in val.records] == ["images/val/a.png", "images/extra/b.png"]
    assert dict(val.problems.counts) == {"missing_image": 1}
    assert "gone.png" in val.problems.examples["missing_image"][0]
    assert val[1][1]["boxes"].tolist() == [[0.0, 0.0, 32.0, 24.0]]
    train = YoloDetection(data, "train")  # a list of folders
    assert [r.file_name for r in train.records] == ["images/train/a.png", "images/extra/b.png"]


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ({"train": "images/train", "val": "images/val"}, "names"),
        ({"train": "images/train", "names": ["cat", "dog"]}, "val"),
        ({"train": "images/train", "val": None, "names": ["cat", "dog"]}, "val"),
        ({"train": "images/train", "val": "images/nope", "names": ["cat", "dog"]}, "val"),
        ({"train": "images/train", "val": ["images/val", 3], "names": ["a", "b"]}, "val[1]"),
        ({"val": "images/val", "names": "cat dog"}, "names"),
        ({"val": "images/val", "names": {0: "cat", 2: "dog"}}, "names"),
        ({"val": "images/val", "names": ["cat", "cat"]}, "names"),
        ({"val": "images/val", "names": ["cat", None]}, "names[1]"),
        ({"val": "images/val", "names": ["cat", "dog"], "nc": 3}, "nc"),
        ({"path": "nowhere", "val": "images/val", "names": ["cat", "dog"]}, "path"),
        ({"val": "labels/val", "names": ["cat", "dog"]}, "val"),  # a folder without images
    ],
)
def test_bad_data_yaml_is_one_line_naming_file_and_key(tmp_path, content, key):
    simple_set(tmp_path)
    data = write_yaml(tmp_path / "bad.yaml", content)
    with pytest.raises(AnnotationFormatError) as exc:
        YoloDetection(data, "val")
    message = str(exc.value)
    assert str(data) in message and f"field '{key}'" in message and "\n" not in message


@pytest.mark.parametrize("text", ["- train\n- val\n", "train: [images\n", "42\n"])
def test_data_yaml_not_a_mapping_or_not_yaml(tmp_path, text):
    data = tmp_path / "data.yaml"
    data.write_text(text)
    with pytest.raises(AnnotationFormatError) as exc:
        YoloDetection(data, "val")
    assert str(data) in str(exc.value) and "\n" not in str(exc.value)


def test_missing_data_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.yaml"):
        YoloDetection(tmp_path / "data.yaml")


# --------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes")
    return make_embedded("shapes", root / "coco", num_train=6, num_val=3, image_size=64)


def coco_splits(paths: dict[str, Path]) -> dict[str, tuple[Path, Path]]:
    return {s: (paths[f"{s}_images"], paths[f"{s}_annotations"]) for s in ("train", "val")}


def test_coco_round_trip(shapes, tmp_path):
    data = write_yolo(coco_splits(shapes), tmp_path / "yolo")
    assert data == tmp_path / "yolo" / "data.yaml"
    config = yaml.safe_load(data.read_text())
    assert config["train"] == "images/train" and config["val"] == "images/val"
    assert Path(config["path"]) == tmp_path / "yolo"
    for split in ("train", "val"):
        coco = CocoDetection(shapes[f"{split}_images"], shapes[f"{split}_annotations"])
        yolo = YoloDetection(data, split)
        assert yolo.class_names == coco.class_names and yolo.category_ids == coco.category_ids
        assert not yolo.problems and yolo.problems.info["background_images"] == 0
        assert yolo.image_ids == coco.image_ids
        for y, c in zip(yolo.records, coco.records, strict=True):
            assert (y.height, y.width) == (c.height, c.width)
            assert y.path.read_bytes() == c.path.read_bytes()
            np.testing.assert_allclose(y.boxes, c.boxes, atol=1e-3, rtol=0)
            np.testing.assert_array_equal(y.labels, c.labels)
        # what COCOeval is given: the same images, categories and boxes
        gy, gc = yolo.coco_ground_truth, coco.coco_ground_truth
        assert gy["categories"] == gc["categories"]
        assert [i["id"] for i in gy["images"]] == [i["id"] for i in gc["images"]]
        for key in ("image_id", "category_id", "iscrowd"):
            assert [a[key] for a in gy["annotations"]] == [a[key] for a in gc["annotations"]]
        np.testing.assert_allclose(
            [a["bbox"] for a in gy["annotations"]],
            [a["bbox"] for a in gc["annotations"]],
            atol=1e-3,
        )
    assert not list(tmp_path.glob(".yolo.tmp-*"))  # the temporary folder was renamed


def test_export_leaves_out_crowd_keeps_backgrounds_and_reexports(tmp_path):
    images = tmp_path / "coco" / "images"
    write_image(images / "a.png")
    write_image(images / "sub" / "b.png")
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [8, 6, 16, 12], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [0, 0, 4, 4], "iscrowd": 1},
    ]
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": W, "height": H},
            {"id": 2, "file_name": "sub/b.png", "width": W, "height": H},
        ],
        "annotations": annotations,
        "categories": [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}],
    }
    ann = tmp_path / "coco" / "val.json"
    ann.write_text(json.dumps(coco))
    data = write_yolo({"val": (images, ann)}, tmp_path / "yolo", images="symlink")
    out = tmp_path / "yolo"
    assert (
        out / "labels" / "val" / "a.txt"
    ).read_text() == "0 0.500000 0.500000 0.500000 0.500000\n"
    assert (out / "labels" / "val" / "sub" / "b.txt").read_text() == ""  # background, explicit
    assert (out / "images" / "val" / "a.png").is_symlink()
    ds = YoloDetection(data, "val")
    assert ds.problems.info["background_images"] == 1
    assert ds[0][1]["boxes"].tolist() == [[8.0, 6.0, 24.0, 18.0]]

    again = write_yolo({"val": ds}, tmp_path / "again", images="hardlink")  # YOLO to YOLO
    assert (tmp_path / "again" / "labels" / "val" / "sub" / "b.txt").is_file()
    assert [r.file_name for r in YoloDetection(again, "val").records] == [
        "images/val/a.png",
        "images/val/sub/b.png",
    ]
    with pytest.raises(DataError, match="not an empty folder"):
        write_yolo({"val": ds}, tmp_path / "again")


# --------------------------------------------------------------------------- wiring


def test_build_datasets_with_format_yolo(tmp_path):
    data = simple_set(tmp_path / "ds")
    base = ["data.format=yolo", "data.num_workers=0", "data.image_size=64"]
    cfg = load_config(preset_path("digits_teacher"), [*base, f"data.yaml={data}"])
    splits = build_datasets(cfg.data)
    assert isinstance(splits.train, YoloDetection) and isinstance(splits.val, YoloDetection)
    assert splits.class_names == ["cat", "dog"] == splits.train.class_names
    image, target = splits.val[0]
    assert image.shape[-2:] == target["size"] and max(target["size"]) == 64
    assert build_datasets(cfg.data, train=False).train.split == "val"
    with pytest.raises(ConfigError, match=r"data.format=yolo needs data.yaml"):
        build_datasets(load_config(preset_path("digits_teacher"), base).data)


def test_evaluation_data_reads_a_data_yaml(tmp_path):
    data = simple_set(tmp_path)
    section = DataConfig(image_size=64)
    loaded = LoadedModel(nn.Identity(), class_names=["dog", "cat"], payload={}, data=section)
    dataset, description, tag = evaluation_data(loaded, data, data_format="yolo", split="val")
    assert isinstance(dataset, YoloDetection) and dataset.class_names == ["dog", "cat"]
    assert description == f"yolo data `{data}` split `val`" and tag == "data_val"
    with pytest.raises(ConfigError, match="--images"):
        evaluation_data(loaded, data, images=tmp_path, data_format="yolo")
    # An Ultralytics checkpoint records no data set: nothing is generated in its place.
    foreign = LoadedModel(nn.Identity(), class_names=["dog", "cat"], payload={}, data=section)
    with pytest.raises(ConfigError, match="^--data is needed: an Ultralytics checkpoint"):
        evaluation_data(foreign)


def test_cli_data_make_yolo(tmp_path, capsys, monkeypatch):
    out = tmp_path / "digits"
    args = ["data", "make", "digits", "--format", "yolo", "--out", str(out)]
    assert main([*args, "--num-train", "3", "--num-val", "2", "--image-size", "32"]) == 0
    printed = capsys.readouterr().out
    assert f"data_yaml: {out / 'data.yaml'}" in printed
    train = YoloDetection(out / "data.yaml", "train")
    assert len(train) == 3 and len(YoloDetection(out / "data.yaml", "val")) == 2
    assert train.class_names == [str(i) for i in range(10)] and not train.problems
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]  # no temporary left

    def generate(*args, **kwargs):
        raise AssertionError("the folder is refused before any image is generated")

    monkeypatch.setattr("detdistill.data.make_embedded", generate)
    assert main([*args, "--num-train", "3", "--num-val", "2"]) == 2  # refuses to overwrite
    err = capsys.readouterr().err
    assert "not an empty folder" in err and err.count("\n") == 1


def test_cli_eval_on_yolo_matches_coco(tiny_checkpoint, tmp_path):
    from conftest import tiny_data_dir

    shapes = tiny_data_dir(tiny_checkpoint.parent.parent)
    data = write_yolo({"val": (shapes / "val", shapes / "val.json")}, tmp_path / "yolo")
    metrics = {}
    for fmt, extra in (("yolo", [str(data)]), ("coco", [str(shapes / "val.json"), "--images",
                                                      str(shapes / "val")])):  # fmt: skip
        out = tmp_path / f"{fmt}.json"
        args = ["eval", str(tiny_checkpoint), "--format", fmt, "--data", *extra]
        assert main([*args, "--out", str(out)]) == 0
        metrics[fmt] = json.loads(out.read_text())["metrics"]
    for key, value in metrics["coco"].items():
        assert metrics["yolo"][key] == pytest.approx(value, abs=1e-6), key


def test_an_exif_rotated_image_is_read_as_stored_and_counted(tmp_path):
    """Ultralytics' tools label the view an EXIF orientation rotates to; detdistill reads
    pixels as stored (as for COCO and VOC), so such an image is counted for a look."""
    root = tmp_path / "ds"
    data = simple_set(root)
    rotated = root / "images" / "val" / "b.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.new("RGB", (200, 100)).save(rotated, exif=exif)
    write_labels(root / "labels" / "val" / "b.txt", "0 0.5 0.25 0.5 0.5\n")
    dataset = YoloDetection(data, "val")
    assert dataset.problems.counts["exif_rotated"] == 1
    assert "b.jpg: EXIF orientation 6" in dataset.problems.examples["exif_rotated"][0]
    _, target = dataset[1]
    assert target["boxes"].tolist() == [[50.0, 0.0, 150.0, 50.0]]  # the stored 200 x 100 grid
