"""The comparison a user makes first: Ultralytics' own distillation on our ``digits`` data.

    pip install ultralytics            # optional; without it the script says so and stops
    python benchmarks/peer_ultralytics.py --out benchmarks/results/peer_ultralytics.json

Converts the ``digits`` set (3000 train / 500 val, 128 px) to YOLO format,
then trains from scratch with the epochs of the ``digits`` RetinaNet presets
(the demo's when this comparison ran): a YOLO teacher
(``yolo11n``, 2.6 M parameters against our teacher's 2.1 M; 8 epochs), a
student of the same family scaled to our student's size (YOLO11 at depth
0.25, width 0.0625: 0.33 M against 0.29 M; 6 epochs), and the same student
with Ultralytics' distillation (``distill_model=`` the teacher, its default
``dis``). All three are scored by the same COCOeval as our table
(predictions at ``conf=0.001``, at most 100 per image), so mAP, the gain and
the share of the gap closed compare directly with those presets' table. Also
records prediction images/s. Ultralytics trains on CPU with
``min(8, cores - 1)`` threads (one on a 2-core machine) whatever the caller
sets; our demo's times are at 2 threads.

Ultralytics' defaults are made for schedules of 100 epochs and more: 3
warm-up epochs, and mosaic augmentation until the last 10. In 6-8 epochs
that leaves the models barely trained, so the script also takes training
settings for all three runs, e.g. for a short schedule::

    python benchmarks/peer_ultralytics.py --train-arg warmup_epochs=0.5 \
        --train-arg close_mosaic=8 --workdir runs/peer_ultralytics_short \
        --out benchmarks/results/peer_ultralytics_short.json

Offline: ``YOLO_OFFLINE`` is set, settings sync is off, plots (which fetch a
font) and AMP (whose check fetches weights) are disabled, and models are built
from the YAML files inside the package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from _common import emit, environment
from detdistill.data.embedded import embedded_dir, make_embedded
from detdistill.evaluation import coco_metrics


def require_ultralytics():
    os.environ.setdefault("YOLO_OFFLINE", "1")
    try:
        import ultralytics
        from ultralytics import YOLO, settings
    except ImportError:
        print(
            json.dumps(
                {
                    "benchmark": "peer_ultralytics",
                    "skipped": "ultralytics is not installed "
                    "(pip install ultralytics); nothing was run",
                }
            ),
        )
        sys.exit(0)
    settings.update({"sync": False})
    return ultralytics, YOLO


def student_yaml(ultralytics, workdir: Path) -> Path:
    """YOLO11 with one scale, depth 0.25 and width 0.0625: about our student's 0.29 M parameters."""
    base = Path(ultralytics.__file__).parent / "cfg" / "models" / "11" / "yolo11.yaml"
    config = yaml.safe_load(base.read_text())
    config["scales"] = {"p": [0.25, 0.0625, 1024]}
    path = workdir / "yolo11-student.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def to_yolo(coco_json: Path, images_dir: Path, out: Path) -> None:
    """One split as YOLO expects it: ``images/`` (links) and ``labels/*.txt`` (class cx cy w h, 0-1)."""
    data = json.loads(coco_json.read_text())
    class_index = {c["id"]: i for i, c in enumerate(data["categories"])}
    boxes: dict[int, list[tuple]] = {}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        boxes.setdefault(ann["image_id"], []).append((class_index[ann["category_id"]], x, y, w, h))
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    for image in data["images"]:
        link = out / "images" / image["file_name"]
        if not link.exists():
            link.symlink_to((images_dir / image["file_name"]).resolve())
        width, height = image["width"], image["height"]
        lines = [
            f"{c} {(x + w / 2) / width:.6f} {(y + h / 2) / height:.6f} {w / width:.6f} {h / height:.6f}"
            for c, x, y, w, h in boxes.get(image["id"], [])
        ]
        (out / "labels" / Path(image["file_name"]).with_suffix(".txt").name).write_text(
            "\n".join(lines) + ("\n" if lines else "")
        )


def coco_detections(
    model, coco_json: Path, images_dir: Path, size: int
) -> tuple[list[dict], float]:
    """Predictions on every val image as COCO detections, and images/s of the predict calls."""
    data = json.loads(coco_json.read_text())
    category = {i: c["id"] for i, c in enumerate(data["categories"])}
    detections, seconds = [], 0.0
    for image in data["images"]:
        start = time.perf_counter()
        (result,) = model.predict(
            str(images_dir / image["file_name"]), imgsz=size, conf=0.001, iou=0.6, max_det=100,
            device="cpu", verbose=False,
        )  # fmt: skip
        seconds += time.perf_counter() - start
        for (x1, y1, x2, y2), score, cls in zip(
            result.boxes.xyxy.tolist(), result.boxes.conf.tolist(), result.boxes.cls.tolist(),
            strict=True,
        ):  # fmt: skip
            detections.append({"image_id": image["id"], "category_id": category[int(cls)],
                               "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})  # fmt: skip
    return detections, len(data["images"]) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="runs/peer_ultralytics")
    parser.add_argument("--teacher", default="yolo11n.yaml")
    parser.add_argument("--student", default=None,
                        help="a model YAML (default: YOLO11 scaled to our student's size)")  # fmt: skip
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--student-epochs", type=int, default=6)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="share of the training images (a smoke run: 0.05)")  # fmt: skip
    parser.add_argument("--train-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="an Ultralytics training setting for all three runs, e.g. "
                             "close_mosaic=8 (values read as YAML)")  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results/peer_ultralytics.json")
    args = parser.parse_args()
    ultralytics, YOLO = require_ultralytics()

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.student is None:
        args.student = str(student_yaml(ultralytics, workdir))
    root = ".cache/detdistill/data"
    paths = make_embedded("digits", embedded_dir(root, "digits", 3000, 500, 0, args.size), 3000, 500,
                          seed=0, image_size=args.size)  # fmt: skip
    yolo = workdir / "yolo"
    for split in ("train", "val"):
        to_yolo(paths[f"{split}_annotations"], paths[f"{split}_images"], yolo / split)
    names = [c["name"] for c in json.loads(paths["val_annotations"].read_text())["categories"]]
    data_yaml = workdir / "digits.yaml"
    data_yaml.write_text(json.dumps({"path": str(yolo), "train": "train/images",
                                     "val": "val/images", "names": dict(enumerate(names))}))  # fmt: skip
    common = {"data": str(data_yaml), "imgsz": args.size, "batch": 16, "device": "cpu",
              "workers": 0, "seed": 0, "deterministic": True, "plots": False, "amp": False,
              "project": str(workdir), "exist_ok": True, "verbose": False, "val": False,
              "fraction": args.fraction}  # fmt: skip
    settings = {k: yaml.safe_load(v) for k, _, v in (a.partition("=") for a in args.train_arg)}
    common.update(settings)

    runs = {}
    for name, model_yaml, epochs, extra in (
        ("teacher", args.teacher, args.teacher_epochs, {}),
        ("student", args.student, args.student_epochs, {}),
        ("student_distilled", args.student, args.student_epochs,
         {"distill_model": str(workdir / "teacher" / "weights" / "last.pt")}),
    ):  # fmt: skip
        start = time.perf_counter()
        model = YOLO(model_yaml)
        model.train(epochs=epochs, name=name, **common, **extra)
        train_s = time.perf_counter() - start
        trained = YOLO(str(workdir / name / "weights" / "last.pt"))
        detections, images_per_s = coco_detections(
            trained, paths["val_annotations"], paths["val_images"], args.size
        )
        metrics = coco_metrics(paths["val_annotations"], detections)
        runs[name] = {"model": model_yaml, "epochs": epochs, **extra, "train_s": train_s,
                      "predict_images_per_s": images_per_s, **metrics}  # fmt: skip
        print(name, json.dumps(runs[name]), file=sys.stderr)
    teacher, student, distilled = (
        runs[k]["mAP"] for k in ("teacher", "student", "student_distilled")
    )
    gap = teacher - student
    emit({"benchmark": "peer_ultralytics", **environment(), "ultralytics": ultralytics.__version__,
          "image_size": args.size,
          "train_fraction": args.fraction, "train_settings": settings, "runs": runs,
          "gain": distilled - student, "gap_closed": (distilled - student) / gap if gap > 0 else None},
         args.out)  # fmt: skip


if __name__ == "__main__":
    main()
