"""Every JSON detdistill writes is strict: undefined values are null, never NaN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_data_dir
from detdistill import jsonio
from detdistill.cli import main


def strict_load(text: str):
    def refuse(constant: str):
        raise ValueError(f"non-strict JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_undefined_values_are_null_and_numpy_is_plain():
    value = {"a": math.nan, "b": np.float32(1.5), "c": [np.inf, -math.inf], 3: np.arange(2)}
    text = jsonio.dumps(value)
    assert strict_load(text) == {"a": None, "b": 1.5, "c": [None, None], "3": [0, 1]}


def test_empty_size_range_is_undefined_not_minus_one():
    from detdistill.evaluation import coco_metrics

    gt = {
        "images": [{"id": 1, "width": 64, "height": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10],
                         "area": 100.0, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }  # fmt: skip
    detections = [{"image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10], "score": 0.9}]
    metrics = coco_metrics(gt, detections)
    assert metrics["APs"] == pytest.approx(1.0)
    assert math.isnan(metrics["APm"]) and math.isnan(metrics["APl"])
    assert strict_load(jsonio.dumps(metrics))["APl"] is None


def test_every_json_a_run_and_eval_write_is_strict(tiny_checkpoint, tmp_path, capsys):
    """A class without ground truth in the evaluated images has AP null, not NaN."""
    data = tiny_data_dir(Path(tiny_checkpoint).parent.parent)
    coco = json.loads((data / "val.json").read_text())
    absent = coco["categories"][0]["id"]
    coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] != absent]
    annotations = tmp_path / "val_without_one_class.json"
    annotations.write_text(json.dumps(coco))
    out = tmp_path / "metrics.json"
    args = ["eval", str(tiny_checkpoint), "--data", str(annotations), "--images",
            str(data / "val"), "--per-class", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    written = strict_load(out.read_text())
    assert written["per_class"][coco["categories"][0]["name"]] is None
    run_dir = Path(tiny_checkpoint).parent
    for path in [*run_dir.glob("*.json"), out]:
        strict_load(path.read_text())
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        strict_load(line)


def test_write_is_atomic_and_a_cut_summary_is_not_a_finished_run(tmp_path):
    from detdistill.sweep.execute import completed

    jsonio.write(tmp_path / "summary.json", {"status": "completed", "mAP": float("nan")})
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "status": "completed",
        "mAP": None,
    }
    assert completed(tmp_path) and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    (tmp_path / "summary.json").write_text('{"status": "compl')  # an older writer, killed
    assert not completed(tmp_path) and not completed(tmp_path / "absent")
