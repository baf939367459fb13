"""Large images: whole-image against sliced evaluation, and the speed of both, as JSON.

    python benchmarks/large_images.py runs/digits_large_teacher/model.pt \
        runs/digits_large_student/model.pt runs/digits_large_rm_pfi/model.pt \
        --out benchmarks/results/digits_large.json

For every checkpoint (trained on tiles, e.g. the ``digits_large_*`` presets), on
its own validation set:

* ``whole``: COCO metrics with every image resized whole to the model's
  training size, what a detector without slicing does;
* ``sliced``: the same images at native resolution, cut into windows of the
  training tile size (``--overlap``), detections merged back
  (:mod:`detdistill.slicing`);
* images/s of ``detdistill.load(...).predict`` both ways on ``--speed-images``
  validation images (best of ``--repeats``).

With a baseline and a distilled student among the checkpoints, ``gain`` gives
the distilled minus the baseline mAP, both ways.
"""

from __future__ import annotations

import argparse

import torch

from _common import best_time, emit, environment
from detdistill.engine.builders import build_datasets, load_detector
from detdistill.engine.evaluate_checkpoint import evaluate_checkpoint
from detdistill.predict import load
from detdistill.slicing import SliceSettings


def measure(checkpoint: str, overlap: float, speed_images: int, repeats: int) -> dict:
    loaded = load_detector(checkpoint)
    if loaded.data.tiles is None:
        raise SystemExit(f"{checkpoint} was not trained on tiles (data.tiles is unset)")
    slices = SliceSettings(loaded.data.tiles.size, overlap)
    metrics = {  # also written beside the checkpoint, as `detdistill eval` does
        way: evaluate_checkpoint(checkpoint, slices=s)["metrics"]
        for way, s in (("whole", None), ("sliced", slices))
    }
    val = build_datasets(loaded.data, train=False).val
    images = [val[i][0] for i in range(min(speed_images, len(val)))]
    predictor = load(checkpoint)
    with torch.inference_mode():
        seconds = {
            way: best_time(lambda s=s: predictor.predict(images, slices=s), repeats, warmup=0)
            for way, s in (("whole", None), ("sliced", slices))
        }
    return {
        "checkpoint": checkpoint,
        "tile_size": slices.size,
        "overlap": overlap,
        "whole_image_size": loaded.image_size,
        "mAP": {way: m["mAP"] for way, m in metrics.items()},
        "metrics": metrics,
        "images_per_s": {way: len(images) / s for way, s in seconds.items()},
        "speed_images": len(images),
        "speed_image_pixels": [list(img.shape[-2:]) for img in images],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--overlap", type=float, default=0.2)
    parser.add_argument("--speed-images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline", default=None, help="checkpoint of the baseline student")
    parser.add_argument("--distilled", default=None, help="checkpoint of the distilled student")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = [measure(c, args.overlap, args.speed_images, args.repeats) for c in args.checkpoints]
    report = {"benchmark": "large_images", **environment(), "results": results}
    if args.baseline and args.distilled:
        by_path = {r["checkpoint"]: r["mAP"] for r in results}
        report["gain"] = {
            way: by_path[args.distilled][way] - by_path[args.baseline][way]
            for way in ("whole", "sliced")
        }
    emit(report, args.out)


if __name__ == "__main__":
    main()
