"""COCO metrics against pycocotools itself, hand-made cases, and the model evaluator."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import Subset

from detdistill import jsonio
from detdistill.data import CocoDetection, build_transforms
from detdistill.engine.builders import build_eval_loader
from detdistill.evaluation import (
    METRIC_KEYS,
    coco_metrics,
    evaluate,
    evaluate_detections,
    per_class_ap,
    to_coco_results,
)

# ------------------------------------------------------------------ metrics


def random_case(seed: int = 0, n_images: int = 25, n_cats: int = 3) -> tuple[dict, list[dict]]:
    """Ground truth with small, medium, large and crowd objects; noisy, partly wrong detections."""
    rng = np.random.default_rng(seed)
    images = [
        {"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480}
        for i in range(1, n_images + 1)
    ]
    anns, dets = [], []
    for im in images:
        for _ in range(rng.integers(0, 6)):
            side = float(np.exp(rng.uniform(np.log(8), np.log(300))))
            w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            cat = int(rng.integers(1, n_cats + 1))
            crowd = int(rng.random() < 0.05)
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h * 0.8, "iscrowd": crowd})  # fmt: skip
            if rng.random() < 0.8:
                jitter = rng.normal(0, 0.08 * side, 4)
                dets.append({"image_id": im["id"], "category_id": cat if rng.random() < 0.9 else int(rng.integers(1, n_cats + 1)),
                             "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])],
                             "score": float(rng.random())})  # fmt: skip
        for _ in range(rng.integers(0, 3)):  # false positives
            dets.append({"image_id": im["id"], "category_id": int(rng.integers(1, n_cats + 1)),
                         "bbox": [*rng.uniform(0, 300, 2).tolist(), *rng.uniform(5, 100, 2).tolist()],
                         "score": float(rng.random() * 0.5)})  # fmt: skip
    cats = [{"id": c, "name": f"class{c}"} for c in range(1, n_cats + 1)]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def pycocotools_eval(gt: dict, dets: list[dict], cat_ids: list[int] | None = None) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        e = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "bbox")
        if cat_ids is not None:
            e.params.catIds = cat_ids
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pycocotools(seed):
    gt, dets = random_case(seed)
    ours = coco_metrics(gt, dets)
    reference = pycocotools_eval(gt, dets)
    assert list(ours) == list(METRIC_KEYS)
    for i, key in enumerate(METRIC_KEYS):
        assert ours[key] == pytest.approx(reference[i], abs=1e-3), key
    assert 0.0 < ours["mAP"] < 1.0


def test_per_class_matches_single_class_evaluation():
    gt, dets = random_case(3)
    per_class = per_class_ap(gt, dets)
    assert list(per_class) == ["class1", "class2", "class3"]
    for cat in (1, 2, 3):
        assert per_class[f"class{cat}"] == pytest.approx(
            pycocotools_eval(gt, dets, [cat])[0], abs=1e-6
        )


def perfect_case() -> tuple[dict, list[dict]]:
    images = [{"id": 1, "width": 640, "height": 480, "file_name": "1.jpg"},
              {"id": 2, "width": 640, "height": 480, "file_name": "2.jpg"}]  # fmt: skip
    boxes = [
        (1, 1, [10, 10, 20, 20]),
        (1, 2, [100, 100, 60, 50]),
        (2, 1, [50, 60, 200, 150]),
    ]  # S, M, L
    anns = [
        {"id": i + 1, "image_id": im, "category_id": c, "bbox": b}
        for i, (im, c, b) in enumerate(boxes)
    ]
    dets = [{"image_id": im, "category_id": c, "bbox": b, "score": 0.9} for im, c, b in boxes]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "never"}]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def test_perfect_detections_score_one_and_inputs_are_not_mutated():
    gt, dets = perfect_case()
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    result = evaluate_detections(gt, dets)
    assert all(result[k] == pytest.approx(1.0) for k in METRIC_KEYS)
    assert result["per_class"]["a"] == pytest.approx(1.0) and np.isnan(result["per_class"]["never"])
    assert gt == gt_before and dets == dets_before


def test_no_detections_gives_zeros():
    gt, _ = perfect_case()
    assert coco_metrics(gt, []) == dict.fromkeys(METRIC_KEYS, 0.0)
    assert per_class_ap(gt, [])["a"] == 0.0


def test_image_ids_restrict_the_evaluation(tmp_path):
    gt, dets = perfect_case()
    only_first = [d for d in dets if d["image_id"] == 1]
    assert coco_metrics(gt, only_first)["mAP"] < 1.0
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    assert coco_metrics(path, only_first, image_ids=[1])["mAP"] == pytest.approx(1.0)


def test_bad_detections_are_clear_errors():
    gt, dets = perfect_case()
    with pytest.raises(ValueError, match="category ids not in the ground truth"):
        coco_metrics(gt, [{**dets[0], "category_id": 42}])
    with pytest.raises(ValueError, match="image ids not in the ground truth"):
        coco_metrics(gt, [{**dets[0], "image_id": 42}])
    with pytest.raises(ValueError, match="lacks"):
        coco_metrics(gt, [{"image_id": 1, "bbox": [0, 0, 1, 1]}])


def test_verbose_prints_pycocotools_table(capsys):
    gt, dets = perfect_case()
    coco_metrics(gt, dets)
    assert capsys.readouterr().out == ""
    coco_metrics(gt, dets, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


# ------------------------------------------------------------------ evaluator


def test_to_coco_results_scales_back_and_maps_categories():
    outputs = [{"boxes": torch.tensor([[10.0, 20, 30, 40], [0, 0, 60, 60]]),
                "scores": torch.tensor([0.9, 0.5]), "labels": torch.tensor([1, 0])}]  # fmt: skip
    targets = [{"image_id": 7, "orig_size": (100, 200), "size": (50, 50)}]  # x * 4, y * 2
    [(image_id, results)] = to_coco_results(outputs, targets, category_ids=[11, 22])
    assert image_id == 7
    assert results[0] == {"image_id": 7, "category_id": 22, "bbox": [40.0, 40.0, 80.0, 40.0],
                          "score": pytest.approx(0.9)}  # fmt: skip
    assert results[1]["bbox"] == [0.0, 0.0, 200.0, 100.0]  # clipped to the original image
    with pytest.raises(ValueError, match="labels outside"):
        to_coco_results([{**outputs[0], "labels": torch.tensor([2, 0])}], targets, [11, 22])


SHAPES = [(100, 200), (150, 90), (120, 120), (80, 160), (200, 100)]  # (H, W) of images 1..5


def write_dataset(root: Path) -> tuple[Path, Path]:
    """Five flat images whose grey level encodes their id; two boxes each."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, (h, w) in enumerate(SHAPES, start=1):
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(root / "img" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
        for k, (fx, fy, fw, fh) in enumerate([(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.45, 0.3)]):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 5 + 5 * k,
                         "bbox": [fx * w, fy * h, fw * w, fh * h]})  # fmt: skip
    (root / "ann.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 5, "name": "p"}, {"id": 10, "name": "q"}]}
    ))  # fmt: skip
    return root / "img", root / "ann.json"


class GroundTruthModel(torch.nn.Module):
    """Reads the image id from the grey level and returns its ground truth in the input's pixels."""

    def __init__(self, gt: dict) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # so that .train()/.eval() matter
        self.images = {im["id"]: im for im in gt["images"]}
        self.anns = gt["annotations"]
        self.cat_to_label = {
            c["id"]: i for i, c in enumerate(sorted(gt["categories"], key=lambda c: c["id"]))
        }
        self.seen_training: list[bool] = []

    def forward(self, images):
        self.seen_training.append(self.training)
        out = []
        for img in images:
            image_id = round(float(img[0, 0, 0]) * 255 / 40)
            im = self.images[image_id]
            sx, sy = img.shape[-1] / im["width"], img.shape[-2] / im["height"]
            anns = [a for a in self.anns if a["image_id"] == image_id]
            boxes = torch.tensor([[a["bbox"][0] * sx, a["bbox"][1] * sy, (a["bbox"][0] + a["bbox"][2]) * sx,
                                   (a["bbox"][1] + a["bbox"][3]) * sy] for a in anns])  # fmt: skip
            labels = torch.tensor([self.cat_to_label[a["category_id"]] for a in anns])
            out.append(
                {"boxes": boxes, "scores": torch.linspace(0.9, 0.5, len(anns)), "labels": labels}
            )
        return out


@pytest.fixture
def dataset(tmp_path) -> CocoDetection:
    img_dir, ann = write_dataset(tmp_path)
    return CocoDetection(img_dir, ann, transforms=build_transforms(False, 75))


def test_evaluator_converts_back_to_original_coordinates(dataset):
    assert {dataset[i][1]["size"] for i in range(5)} == {
        (37, 75),
        (75, 45),
        (75, 75),
        (37, 75),
        (75, 37),
    }
    model = GroundTruthModel(json.loads(dataset.coco_annotation_file.read_text()))
    model.train()
    result = evaluate(model, build_eval_loader(dataset, 2, num_workers=0), dataset, progress=False)
    assert all(result[k] == pytest.approx(1.0) for k in ("mAP", "AP50", "AP75"))
    assert result["per_class"] == {"p": pytest.approx(1.0), "q": pytest.approx(1.0)}
    assert result["num_images"] == 5 and result["num_detections"] == 10
    assert model.seen_training == [False] * 3 and model.training  # eval inside, mode restored


def test_evaluator_on_subset_and_with_an_unreadable_image(dataset):
    model = GroundTruthModel(json.loads(dataset.coco_annotation_file.read_text()))
    subset = Subset(dataset, [0, 2])
    result = evaluate(model, build_eval_loader(subset, 2, num_workers=0), subset, progress=False)
    assert result["num_images"] == 2 and result["mAP"] == pytest.approx(1.0)
    (dataset.images_dir / "3.png").write_bytes(b"broken")
    result = evaluate(model, build_eval_loader(dataset, 2, num_workers=0), dataset, progress=False)
    assert result["num_images"] == 4 and result["mAP"] == pytest.approx(
        1.0
    )  # image 4 served twice, once counted
    assert dataset.problems.counts == {"unreadable_image": 1}


def _distributed_worker(rank: int, world: int, port: int, root: str, queue) -> None:
    import os

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        ds = CocoDetection(
            Path(root) / "img", Path(root) / "ann.json", transforms=build_transforms(False, 75)
        )
        model = GroundTruthModel(json.loads(ds.coco_annotation_file.read_text()))
        loader = build_eval_loader(ds, 1, num_workers=0)
        queue.put((rank, len(loader), evaluate(model, loader, ds, progress=False)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_distributed_evaluation_gathers_and_broadcasts(tmp_path):
    write_dataset(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(
        _distributed_worker, args=(2, port, str(tmp_path), queue), nprocs=2, start_method="spawn"
    )
    results = sorted(queue.get(timeout=60) for _ in range(2))
    assert [r[1] for r in results] == [3, 2]  # 5 images over 2 ranks, no padded repeat
    # every rank gets rank 0's dict (json_safe: undefined sizes are NaN, and NaN != NaN)
    assert jsonio.json_safe(results[0][2]) == jsonio.json_safe(results[1][2])
    assert results[0][2]["num_images"] == 5 and results[0][2]["mAP"] == pytest.approx(1.0)
