"""Is data loading ever the bottleneck? Loader images/s against training-step images/s.

    python benchmarks/loader_speed.py --out benchmarks/results/loader_speed.json

Writes ``--images`` JPEG photographs-like scenes of 640 x 480 px in COCO
format, then measures in one process: the training loader of the VOC preset
(decode, resize to 640, flip, collate; ``--workers`` as the preset) in
images/s, and one training step of the preset's student (ResNet-18 RetinaNet
at 640 px, batch 2) in images/s. ``ratio = loader / step``: above 1 the loader
keeps up. Decoding alone (PIL, as the loaders use) is timed too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader

from _common import best_time, emit, environment
from detdistill.data import CocoDetection, build_transforms, collate_fn
from detdistill.data.image_io import read_image
from detdistill.engine.sampling import ResumableBatchSampler, SeededAugmentation
from detdistill.models import build_detector


def write_images(root: Path, count: int) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records, annotations = [], []
    for i in range(count):
        noise = (rng.random((120, 160, 3)) * 255).astype(np.uint8)
        photo = Image.fromarray(noise).resize((640, 480)).filter(ImageFilter.GaussianBlur(2))
        name = f"{i:05d}.jpg"
        photo.save(images / name, quality=90)
        records.append({"id": i + 1, "file_name": name, "width": 640, "height": 480})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1,
                            "bbox": [100, 100, 120, 90], "area": 10800, "iscrowd": 0})  # fmt: skip
    path = root / "ann.json"
    path.write_text(json.dumps({"images": records, "annotations": annotations,
                                "categories": [{"id": 1, "name": "thing"}]}))  # fmt: skip
    return images, path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="runs/loader_speed")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, default=8, help="the VOC preset's num_workers")
    parser.add_argument("--batch", type=int, default=16, help="the VOC preset's batch size")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    images_dir, annotations = write_images(Path(args.workdir), args.images)

    files = sorted(images_dir.glob("*.jpg"))[:50]
    decode_s = best_time(lambda: [read_image(f) for f in files], repeats=3) / len(files)

    dataset = CocoDetection(images_dir, annotations, build_transforms(True, 640, hflip=0.5))
    sampler = ResumableBatchSampler(len(dataset), args.batch, shuffle=True, seed=0)
    loader = DataLoader(SeededAugmentation(dataset, 0), batch_sampler=sampler,
                        collate_fn=collate_fn, num_workers=args.workers)  # fmt: skip
    start = time.perf_counter()
    seen = sum(len(images) for images, _ in loader)
    loader_ips = seen / (time.perf_counter() - start)

    model = build_detector("retinanet", num_classes=1, backbone="resnet18",
                           min_size=640, max_size=640).train()  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
    step_images, step_targets = next(iter(DataLoader(dataset, batch_size=2, collate_fn=collate_fn)))

    def step() -> None:
        losses = model(step_images, step_targets).losses
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    step_ips = 2 / best_time(step, repeats=3)
    emit({"benchmark": "loader_speed", **environment(), "images": seen, "workers": args.workers,
          "decode_ms_per_image": 1000 * decode_s, "loader_images_per_s": loader_ips,
          "train_step_images_per_s": step_ips, "ratio": loader_ips / step_ips}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
