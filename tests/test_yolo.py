"""The ``yolo`` family: Ultralytics models behind the detector interface, distilled by every method."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from conftest import train_tiny
from detdistill.distill import Distiller
from detdistill.engine.checkpoint import save_checkpoint
from detdistill.errors import ConfigError
from detdistill.losses import IncompatibleModelsError, list_methods
from detdistill.models import build_detector
from detdistill.models.yolo import LetterboxTransform, MissingExtraError, import_ultralytics

TINY = {"depth": 0.25, "width": 0.0625}  # the ~0.3 M student scale
YAMLS = ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"]


def yolo(cfg: str = "yolo11n.yaml", num_classes: int = 4, **kwargs):
    return build_detector("yolo", num_classes=num_classes, cfg=cfg, image_size=64, **kwargs)


def batch():
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 8.0, 50.0, 40.0], [2.0, 2.0, 12.0, 14.0]]),
         "labels": torch.tensor([0, 3])},
    ]  # fmt: skip
    return images, targets


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ultralytics", None)
    with pytest.raises(MissingExtraError, match=r"detdistill\[yolo\]"):
        import_ultralytics()


@pytest.mark.parametrize("cfg", YAMLS)
def test_loss_is_ultralytics_criterion_on_the_same_batch(cfg):
    torch.manual_seed(0)
    model = yolo(cfg, **TINY).train()
    images, targets = batch()
    output = model(images, targets)
    tensors, moved = model.transform(images, targets)
    reference, _ = model.criterion(
        model.model(tensors.tensors), model.ultralytics_batch(tensors.tensors, moved)
    )
    torch.testing.assert_close(sum(output.losses.values()), reference.sum())
    # three objects, each assigned to at least one location by the task-aligned assigner
    matched = torch.cat(output.matched_idxs)
    assert set(matched[matched >= 0].tolist()) <= {0, 1}
    assert (output.matched_idxs[1] == 1).any() and (output.matched_idxs[0] == 0).any()
    assert [c.shape[1] for c in output.cls_logits] == [4, 4, 4]
    assert output.box_code_size == (4 if cfg.startswith("yolo26") else 64)
    assert output.quality is None and not model.has_quality  # no quality branch to rank with


@pytest.mark.parametrize("cfg", YAMLS)
def test_eval_detections_match_ultralytics_pipeline(cfg):
    from ultralytics.utils.nms import non_max_suppression

    torch.manual_seed(0)
    model = yolo(cfg, **TINY).eval()
    image = torch.rand(3, 64, 64)
    ours = model([image])[0]
    raw = model.model(image[None])
    raw = raw[0] if isinstance(raw, tuple) else raw
    if cfg.startswith("yolo26"):  # Ultralytics' default validation (nms unset) uses one-to-many
        head = model.detect
        preds = model.model.model[-1].forward_head(
            model.neck_features(image[None]), **head.one2many
        )
        raw = head._inference(preds)
    ref = non_max_suppression(raw, 0.001, 0.7, multi_label=True, max_det=300)[0]
    assert ours["boxes"].shape[0] == ref.shape[0] > 0
    torch.testing.assert_close(ours["boxes"], ref[:, :4].clamp(0, 64), atol=1e-3, rtol=0)
    torch.testing.assert_close(ours["scores"], ref[:, 4])


def test_letterbox_maps_boxes_and_back():
    transform = LetterboxTransform(64)
    image = torch.rand(3, 20, 40)  # long side 40 -> 64: gain 1.6, 32 x 64, padded 16 above
    box = torch.tensor([[4.0, 2.0, 20.0, 10.0]])
    images, targets = transform([image], [{"boxes": box, "labels": torch.tensor([0])}])
    assert images.tensors.shape == (1, 3, 64, 64)
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[6.4, 19.2, 32.0, 32.0]]))
    assert torch.all(images.tensors[0, :, :16] == 114 / 255)
    back = transform.postprocess([{"boxes": targets[0]["boxes"]}], images.image_sizes, [(20, 40)])
    torch.testing.assert_close(back[0]["boxes"], box)
    with pytest.raises(ValueError, match="multiple of 32"):
        LetterboxTransform(100)


@pytest.mark.parametrize("cfg", YAMLS)
def test_distillation_step_reaches_student_only(cfg):
    torch.manual_seed(0)
    teacher, student = yolo(cfg), yolo(cfg, **TINY)
    assert teacher.feature_channels != student.feature_channels  # 64/128/256 vs 16/32/64
    distiller = Distiller(student, teacher, {"rm": 1.0, "pfi": 1.0}).train()
    assert [a.in_channels for a in distiller.adapters["neck"]] == list(student.feature_channels)
    assert [a.out_channels for a in distiller.adapters["neck"]] == list(teacher.feature_channels)
    losses = distiller(*batch())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


@pytest.mark.parametrize("cfg", ["yolo11n.yaml", "yolo26n.yaml"])
@pytest.mark.parametrize("method", list_methods())
def test_every_method_on_a_yolo_pair(cfg, method):
    torch.manual_seed(0)
    teacher, student = yolo(cfg), yolo(cfg, **TINY)
    if method == "ld" and cfg.startswith("yolo26"):  # no distributions to distil
        with pytest.raises(IncompatibleModelsError, match="^ld distils box-edge distributions"):
            Distiller(student, teacher, {method: 1.0})
        return
    distiller = Distiller(student, teacher, {method: 1.0}).train()
    losses = distiller(*batch())
    assert torch.isfinite(losses[method])
    losses[method].backward()
    grads = [p.grad for p in distiller.trainable_parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in teacher.parameters())


def test_crosskd_uses_per_level_tower_adapters():
    teacher, student = yolo(), yolo(**TINY)
    distiller = Distiller(student, teacher, {"crosskd": 1.0})
    cls_adapters, reg_adapters = distiller.adapters["tower1"]
    # after the first tower conv of each level: cls widths (16 -> 64 ...), reg widths
    assert [a.in_channels for a in cls_adapters] == list(student.tower_channels(1)[0])
    assert [a.out_channels for a in cls_adapters] == list(teacher.tower_channels(1)[0])
    assert len(reg_adapters) == 3


def test_yolo26_loss_mix_follows_the_epoch():
    model = yolo("yolo26n.yaml", **TINY)
    model.set_epoch(0, 5)
    assert model.criterion.o2m == pytest.approx(0.8)
    model.set_epoch(4, 5)  # the last epoch: Ultralytics' final 0.1
    assert model.criterion.o2m == pytest.approx(0.1)
    assert model.criterion.o2o == pytest.approx(0.9)


def test_ultralytics_weights_load_strictly(tmp_path, caplog):
    torch.manual_seed(0)
    source = yolo(**TINY)
    path = save_checkpoint(tmp_path / "best.pt", source.ultralytics_checkpoint(list("abcd")))
    same = yolo(**TINY)
    assert same.load_ultralytics_weights(path) == []
    for key, value in source.model.state_dict().items():
        torch.testing.assert_close(same.model.state_dict()[key], value)
    other = yolo(num_classes=2, **TINY)
    with caplog.at_level(logging.INFO, logger="detdistill.models"):
        reinit = other.load_ultralytics_weights(path)
    assert reinit == [f"model.23.cv3.{i}.2.{p}" for i in range(3) for p in ("weight", "bias")]
    assert "re-initialised" in caplog.text
    with pytest.raises(Exception, match="shape"):
        yolo().load_ultralytics_weights(path)  # another scale


@pytest.mark.slow
def test_saved_student_runs_in_ultralytics_without_detdistill(tmp_path):
    torch.manual_seed(0)
    model = yolo(**TINY)
    path = save_checkpoint(tmp_path / "ultralytics.pt", model.ultralytics_checkpoint(list("abcd")))
    script = f"""
import os, sys
import numpy as np
os.environ["YOLO_OFFLINE"] = "1"
from ultralytics import YOLO
model = YOLO({str(path)!r})
results = model.predict(np.zeros((64, 64, 3), dtype=np.uint8), imgsz=64, verbose=False)
assert model.names == {{0: "a", 1: "b", 2: "c", 3: "d"}}, model.names
exported = model.export(format="torchscript", imgsz=64)
assert os.path.exists(exported), exported
assert not any(m.startswith("detdistill") for m in sys.modules)
print("OK", len(results))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OK 1" in done.stdout


def test_an_ultralytics_checkpoint_loads_as_a_teacher(tmp_path):
    from detdistill.engine.builders import load_detector

    torch.manual_seed(0)
    source = yolo(**TINY)
    path = save_checkpoint(tmp_path / "best.pt", source.ultralytics_checkpoint(list("wxyz")))
    loaded = load_detector(path)
    assert loaded.class_names == ["w", "x", "y", "z"]
    assert loaded.image_size == 64
    image = torch.rand(3, 64, 64)
    source.eval(), loaded.model.eval()
    torch.testing.assert_close(loaded.model([image])[0]["scores"], source([image])[0]["scores"])


def test_yolo_model_config_builds_and_names_bad_kwargs():
    from detdistill.engine.builders import build_model
    from detdistill.engine.config import config_from_dict

    cfg = config_from_dict(
        {"model": {"name": "yolo", "num_classes": 4, "kwargs": {"cfg": "yolo26n.yaml", **TINY}}}
    )
    model = build_model(cfg.model, 64)
    assert model.end2end and model.transform.size == 64
    bad = config_from_dict(
        {"model": {"name": "yolo", "kwargs": {"cfg": "yolo11n.yaml", "scale": "q"}}}
    )
    with pytest.raises(ConfigError, match="model.kwargs: yolo scale 'q'"):
        build_model(bad.model, 64)


def test_model_weights_initialise_a_yolo_student_from_best_pt(tmp_path):
    from detdistill.engine.builders import build_model
    from detdistill.engine.config import config_from_dict

    torch.manual_seed(0)
    source = yolo(**TINY)
    path = save_checkpoint(tmp_path / "best.pt", source.ultralytics_checkpoint(list("abcd")))
    model_cfg = {"name": "yolo", "num_classes": 4, "weights": str(path),
                 "kwargs": {"cfg": "yolo11n.yaml", **TINY}}  # fmt: skip
    model = build_model(config_from_dict({"model": model_cfg}).model, 64)
    for key, value in source.model.state_dict().items():
        assert torch.equal(model.model.state_dict()[key], value), key
    model_cfg["weights"] = str(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="model.weights: Ultralytics checkpoint not found"):
        build_model(config_from_dict({"model": model_cfg}).model, 64)


@pytest.mark.slow
def test_distilling_a_yolo_pair_writes_an_ultralytics_checkpoint(tmp_path):
    """Teacher and student trained by the trainer; the student comes out in both formats."""
    from ultralytics import YOLO

    model = "model.kwargs={cfg: yolo11n.yaml, depth: 0.25, width: 0.0625}"
    teacher = train_tiny(tmp_path, "teacher", "model.name=yolo", model, "train.optimizer=sgd")
    assert teacher.is_file()
    assert (tmp_path / "teacher" / "ultralytics.pt").is_file()
    student = train_tiny(
        tmp_path, "student", "model.name=yolo", model, "train.optimizer=sgd",
        f"distill={{teacher_checkpoint: {tmp_path / 'teacher' / 'ultralytics.pt'}, "
        "methods: {rm: auto, pfi: auto}, auto_batches: 1}",
    )  # fmt: skip
    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert set(summary["distill_weights"]) == {"rm", "pfi"}
    assert student.is_file()
    names = YOLO(str(tmp_path / "student" / "ultralytics.pt")).names
    assert len(names) == 6  # the tiny `shapes` classes
    # detdistill's ONNX export points to Ultralytics' own, one line
    from detdistill.cli import main

    assert main(["export", str(student), "--out", str(tmp_path / "s.onnx")]) == 2
    # analyze reads the YOLO pair too: per-level widths 16/32/64 -> 16/32/64 here, letterbox input
    from detdistill.analysis import run_analysis

    run_analysis(teacher, student, out=tmp_path / "analysis", max_images=4, num_visualize=1)
    result = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert result["images"] == 4 and result["rank"]["instances"] > 0
    # a sweep given the Ultralytics file scores it as the trainer scored the same weights
    from conftest import TINY_OVERRIDES
    from detdistill.engine.checkpoint import load_checkpoint
    from detdistill.sweep import plan_sweep
    from detdistill.sweep.plan import parse_row
    from detdistill.sweep.table import TEACHER_METRICS_FILE, given_teacher_metrics

    overrides = [*TINY_OVERRIDES, f"data.root={tmp_path}", "model.name=yolo", model,
                 f"distill.teacher_checkpoint={tmp_path / 'teacher' / 'ultralytics.pt'}"]  # fmt: skip
    plan = plan_sweep("digits_yolo_distill", overrides, [parse_row("rm")], [0], tmp_path / "sw")
    measured = given_teacher_metrics(plan)
    assert measured["mAP"] == pytest.approx(load_checkpoint(teacher)["metrics"]["mAP"], abs=1e-6)
    assert (tmp_path / "sw" / TEACHER_METRICS_FILE).is_file()
    assert given_teacher_metrics(plan) == measured  # read back, not evaluated again


def test_unreadable_images_stay_counted_after_ultralytics_patches_pil(tmp_path):
    from detdistill.data.errors import ImageReadError
    from detdistill.data.image_io import read_image

    import_ultralytics()
    import ultralytics.utils.patches  # noqa: F401  (replaces PIL.Image.open)

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageReadError):
        read_image(bad)
