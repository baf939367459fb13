"""The table a YOLO user asks for: our distillation beside Ultralytics' own, on one YOLO pair.

Two steps, both resumable (a finished run is read back, not trained again):

    # 1. Ultralytics' trainer: the student alone and with its own distillation
    #    (distill_model= the teacher's ultralytics.pt, default dis), seeds 0 1 2
    python benchmarks/yolo_table.py ultralytics --workdir runs/yolo_table \\
        --data runs/yolo_table/digits_yolo/data.yaml --teacher runs/yolo_table/teacher/ultralytics.pt

    # 2. the table: those rows next to detdistill's rows (benchmarks/method_table.py JSONs)
    python benchmarks/yolo_table.py table --workdir runs/yolo_table \\
        --ours benchmarks/results/digits_yolo_methods.json --out benchmarks/results/digits_yolo_table.json

Every row is scored by the same COCOeval (detdistill's evaluator on the YOLO
data's validation split); each Ultralytics-trained checkpoint also carries
Ultralytics' own ``val`` mAP50-95 on the same images, so the two tools'
numbers for one checkpoint can be compared.

Ultralytics' recipe is fit to the short schedule and the same for its baseline
and its distilled student: SGD at lr0 0.01, warm-up 0.5 epochs, no mosaic
(its defaults pick AdamW at a tiny rate and mosaic, which reach 5-7 mAP in 8
epochs here), no left-right flip (a mirrored digit is another digit; our
recipe does not flip either); everything else is its default.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

from _common import emit, environment

STUDENT_SCALE = {"depth": 0.25, "width": 0.0625, "max_channels": 1024}
RECIPE = {"optimizer": "SGD", "lr0": 0.01, "warmup_epochs": 0.5, "mosaic": 0.0, "fliplr": 0.0}


def student_yaml(workdir: Path) -> Path:
    """yolo11n.yaml at the student's scale, as a file Ultralytics' trainer can build."""
    from ultralytics.nn.tasks import yaml_model_load

    spec = copy.deepcopy(yaml_model_load("yolo11n.yaml"))
    spec["scales"] = {"custom": [STUDENT_SCALE[k] for k in ("depth", "width", "max_channels")]}
    spec.pop("scale", None)
    spec.pop("yaml_file", None)
    path = workdir / "yolo11-student.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def our_metrics(checkpoint: Path, data_yaml: Path, image_size: int) -> dict:
    """detdistill's COCOeval of an Ultralytics checkpoint on the data's validation split."""
    import torch

    from detdistill.data import YoloDetection, build_transforms
    from detdistill.engine.builders import build_eval_loader
    from detdistill.evaluation import evaluate
    from detdistill.models import build_detector

    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    source = payload.get("ema") or payload["model"]
    val = YoloDetection(data_yaml, "val", build_transforms(False, image_size))
    model = build_detector(
        "yolo", num_classes=val.num_classes, cfg=source.yaml, image_size=image_size
    )
    model.load_ultralytics_weights(checkpoint)
    result = evaluate(model, build_eval_loader(val, 16, 0), val, progress=False)
    return {k: 100 * result[k] for k in ("mAP", "AP50", "AP75")}


def ultralytics_val(checkpoint: Path, data_yaml: Path, image_size: int, rect: bool = True) -> dict:
    """Ultralytics' own validation of the same checkpoint (conf 0.001, IoU 0.7), in percent.

    ``rect=True`` is its default: each batch is letterboxed to
    ``ceil(size / stride + 0.5) * stride``, so 128 px images are padded into
    160 px; ``rect=False`` letterboxes to ``image_size`` as detdistill does.
    """
    from ultralytics import YOLO

    metrics = YOLO(str(checkpoint)).val(
        data=str(data_yaml), imgsz=image_size, batch=16, device="cpu", workers=0, rect=rect,
        plots=False, verbose=False, project=str(checkpoint.parent), name="val", exist_ok=True,
    )  # fmt: skip
    return {"mAP": 100 * float(metrics.box.map), "AP50": 100 * float(metrics.box.map50)}


def train_ultralytics(args: argparse.Namespace) -> None:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import torch
    from ultralytics import YOLO

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model_yaml = student_yaml(workdir)
    data_yaml = Path(args.data).resolve()
    rows_file = workdir / "ultralytics_rows.json"
    rows = json.loads(rows_file.read_text())["rows"] if rows_file.exists() else []
    for row in args.rows:
        for seed in args.seeds:
            name = f"ultralytics_{row}_s{seed}"
            run_dir = workdir / name
            result_file = run_dir / "row.json"
            if result_file.exists():
                continue
            if row == "distill" and args.teacher is None:
                sys.exit("the distill row needs --teacher (the teacher's ultralytics.pt)")
            extra = {"distill_model": str(Path(args.teacher).resolve())} if row == "distill" else {}
            start = time.perf_counter()
            YOLO(str(model_yaml)).train(
                data=str(data_yaml), epochs=args.epochs, imgsz=args.image_size, batch=16,
                workers=0, device="cpu", seed=seed, deterministic=True, plots=False,
                project=str(workdir), name=name, exist_ok=True, amp=False, verbose=False,
                **RECIPE, **extra,
            )  # fmt: skip
            wall = time.perf_counter() - start
            checkpoint = run_dir / "weights" / "last.pt"
            record = {
                "name": name, "method": f"ultralytics {row}", "seed": seed, "trainer": "ultralytics",
                "recipe": {**RECIPE, "epochs": args.epochs, "imgsz": args.image_size, **extra},
                **our_metrics(checkpoint, data_yaml, args.image_size),
                "ultralytics_val": ultralytics_val(checkpoint, data_yaml, args.image_size),
                "wall_time_s": wall, "run_dir": str(run_dir),
            }  # fmt: skip
            result_file.write_text(json.dumps(record, indent=2) + "\n")
            rows = [r for r in rows if r["name"] != name] + [record]
            rows_file.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
            print(json.dumps(record), flush=True)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def make_table(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    theirs = json.loads((workdir / "ultralytics_rows.json").read_text())
    teacher_pt, data_yaml = Path(args.teacher), Path(args.data)
    parity = {  # one checkpoint scored by both tools on the same images
        "checkpoint": str(teacher_pt),
        "detdistill_cocoeval": our_metrics(teacher_pt, data_yaml, args.image_size),
        "ultralytics_val": ultralytics_val(teacher_pt, data_yaml, args.image_size),
        "ultralytics_val_rect_false": ultralytics_val(
            teacher_pt, data_yaml, args.image_size, False
        ),
    }
    runs, teacher = [], None
    for item in args.ours:  # PATH, or PATH@RECIPE for rows trained with another recipe
        path, _, recipe = item.partition("@")
        ours = json.loads(Path(path).read_text())
        teacher = ours["teacher"]
        for run in ours["runs"]:
            name = "student alone" if run["method"] == "none" else run["method"]
            runs.append({**run, "method": name, "trainer": "detdistill", "recipe": recipe or "sgd",
                         "mAP": 100 * run["mAP"], "AP50": 100 * run["AP50"]})  # fmt: skip
    runs += [{**r, "recipe": "ultralytics"} for r in theirs["rows"]]
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for run in runs:  # one row per (trainer, recipe, method); a seed counts once
        rows = groups.setdefault((run["trainer"], run["recipe"], run["method"]), [])
        if run["seed"] not in {r["seed"] for r in rows}:
            rows.append(run)
    teacher_map = 100 * teacher["mAP"]
    summary = []
    for (trainer, recipe, method), rows in groups.items():
        mean, std = mean_std([r["mAP"] for r in rows])
        # Each row against the student alone of its own trainer and recipe, at the same seeds.
        alone = groups.get((trainer, recipe, "student alone")) or groups.get(
            (trainer, recipe, "ultralytics alone")
        )
        alone_at = {r["seed"]: r["mAP"] for r in alone or []}
        matched = [alone_at[r["seed"]] for r in rows if r["seed"] in alone_at]
        base = mean_std(matched)[0] if matched else math.nan
        summary.append({
            "method": method, "trainer": trainer, "recipe": recipe,
            "seeds": sorted(r["seed"] for r in rows), "mAP_mean": mean, "mAP_std": std,
            "gain": mean - base, "gap_closed": (mean - base) / (teacher_map - base),
            "chosen_weights": rows[0].get("chosen_weights"),
        })  # fmt: skip
    summary.sort(key=lambda r: (r["trainer"], r["recipe"], -r["mAP_mean"]))
    lines = [f"teacher (YOLO11n, detdistill's trainer): {teacher_map:.1f} mAP", "",
             "| trainer, recipe | row | seeds | mAP | gain over the student alone | gap closed |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in summary:
        gain = "" if r["method"] in ("student alone", "ultralytics alone") else f"{r['gain']:+.1f}"
        closed = "" if not gain else f"{100 * r['gap_closed']:.0f}%"
        lines.append(
            f"| {r['trainer']}, {r['recipe']} | {r['method']} | {len(r['seeds'])} | "
            f"{r['mAP_mean']:.1f} ± {r['mAP_std']:.1f} | {gain} | {closed} |"
        )
    emit({"benchmark": "yolo_table", **environment(), "teacher": teacher,
          "teacher_parity": parity, "summary": summary, "runs": runs}, args.out)  # fmt: skip
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="step", required=True)
    train = sub.add_parser("ultralytics", help="train and score the rows of Ultralytics' trainer")
    train.add_argument("--workdir", default="runs/yolo_table")
    train.add_argument("--data", required=True, help="the YOLO data.yaml")
    train.add_argument("--teacher", help="the teacher as an Ultralytics .pt (for the distill row)")
    train.add_argument(
        "--rows", nargs="+", default=["alone", "distill"], choices=["alone", "distill"]
    )
    train.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    train.add_argument("--epochs", type=int, default=6)
    train.add_argument("--image-size", type=int, default=128)
    train.add_argument("--threads", type=int, default=1)
    table = sub.add_parser("table", help="combine with detdistill's rows and write the JSON")
    table.add_argument("--workdir", default="runs/yolo_table")
    table.add_argument("--ours", nargs="+", required=True, metavar="JSON[@RECIPE]",
                       help="method_table.py JSON(s); @RECIPE labels rows of another recipe")  # fmt: skip
    table.add_argument("--out", default="benchmarks/results/digits_yolo_table.json")
    table.add_argument("--data", required=True, help="the YOLO data.yaml")
    table.add_argument("--teacher", required=True, help="the teacher as an Ultralytics .pt")
    table.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    if args.step == "ultralytics":
        train_ultralytics(args)
    else:
        make_table(args)


if __name__ == "__main__":
    sys.exit(main())
