"""GFL: its losses against loops, the integral box decoding, and every command on a GFL model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import detdistill
from conftest import train_tiny
from detdistill.analysis import run_analysis
from detdistill.engine.evaluate_checkpoint import evaluate_checkpoint
from detdistill.export import export_detector, export_module
from detdistill.losses.localization import localization_distillation_loss
from detdistill.models.gfl import (
    aligned_iou,
    distribution_focal_loss,
    integral_distances,
    quality_focal_loss,
)
from test_distill import tiny


def test_quality_focal_loss_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(3, 4, generator=g), torch.rand(3, 4, generator=g)
    targets[0] = 0.0  # negatives: the plain focal loss with gamma = beta
    got = quality_focal_loss(logits, targets, beta=2.0)
    for z, y, value in zip(logits.flatten(), targets.flatten(), got.flatten(), strict=True):
        p = 1 / (1 + math.exp(-float(z)))
        y = float(y)
        expected = -(abs(y - p) ** 2) * ((1 - y) * math.log(1 - p) + y * math.log(p))
        assert float(value) == pytest.approx(expected, rel=1e-5)


def test_distribution_focal_loss_matches_a_loop_and_is_least_at_the_split_mass():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 9, generator=g)
    targets = torch.tensor([0.0, 2.5, 3.25, 7.99, 4.0])
    got = distribution_focal_loss(logits, targets)
    for row, y, value in zip(logits, targets.tolist(), got, strict=True):
        log_p = torch.log_softmax(row.double(), 0).tolist()
        left = math.floor(y)
        expected = -((left + 1 - y) * log_p[left] + (y - left) * log_p[left + 1])
        assert float(value) == pytest.approx(expected, rel=1e-5)
    # Mass (1 - f, f) on the two bins around y is the optimum and integrates to y.
    y = torch.tensor([3.25])
    best = torch.full((1, 9), -30.0)
    best[0, 3], best[0, 4] = math.log(0.75), math.log(0.25)
    assert integral_distances(best.repeat(1, 4), 8)[0].tolist() == pytest.approx(
        [3.25] * 4, abs=1e-6
    )
    assert float(distribution_focal_loss(best, y)) < float(distribution_focal_loss(logits[:1], y))


def test_gfl_losses_gradcheck():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    soft = torch.rand(2, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: quality_focal_loss(z, soft).sum(), (logits,))
    bins = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0.5, 1.2, 3.9], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: distribution_focal_loss(p, targets).sum(), (bins,))


def test_aligned_iou_is_the_diagonal_of_box_iou():
    from torchvision.ops import box_iou

    g = torch.Generator().manual_seed(3)
    xy = torch.rand(6, 2, generator=g) * 10
    a = torch.cat([xy, xy + torch.rand(6, 2, generator=g) * 5 + 0.1], 1)
    b = a + torch.randn(6, 4, generator=g)
    b[:, 2:] = torch.maximum(b[:, 2:], b[:, :2] + 0.1)
    assert torch.allclose(aligned_iou(a, b), box_iou(a, b).diagonal(), atol=1e-6)


def test_decoding_integrates_each_side_in_strides_from_the_anchor_centre():
    model = tiny("gfl")
    stride = model.strides[1]
    size = model.anchor_sizes[1][0]
    anchor = torch.tensor([[100.0 - size / 2, 60.0 - size / 2, 100.0 + size / 2, 60.0 + size / 2]])
    bins = model.reg_max + 1
    codes = torch.full((1, 4, bins), -50.0)
    for side, distance in enumerate([1, 2, 3, 4]):  # one-hot distributions: exact bins
        codes[0, side, distance] = 50.0
    box = model.decode_boxes(codes.reshape(1, -1), anchor)[0]
    expected = [100 - 1 * stride, 60 - 2 * stride, 100 + 3 * stride, 60 + 4 * stride]
    assert box.tolist() == pytest.approx(expected, abs=1e-3)


def test_gfl_export_matches_pytorch(tmp_path):
    detector = tiny("gfl", 4).eval()
    path = export_detector(detector, tmp_path / "gfl.onnx", image_size=64)
    import onnxruntime as ort

    images = torch.rand(2, 3, 70, 90)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, scores, _ = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        ref_boxes, ref_scores, _ = export_module(detector)(images)
    np.testing.assert_allclose(boxes, ref_boxes.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-3, atol=1e-6)


@pytest.fixture(scope="module")
def gfl_checkpoint(tmp_path_factory):
    return train_tiny(
        tmp_path_factory.mktemp("gfl"), "run", "model.name=gfl", "model.kwargs={num_convs: 2}"
    )


def test_a_trained_gfl_evaluates_predicts_and_analyses(gfl_checkpoint, tmp_path):
    summary = json.loads((gfl_checkpoint.parent / "summary.json").read_text())
    assert summary["status"] == "completed"
    metrics = evaluate_checkpoint(gfl_checkpoint, out=tmp_path / "m.json")["metrics"]
    assert metrics["mAP"] == pytest.approx(summary["metrics"]["mAP"])
    predictor = detdistill.load(gfl_checkpoint)
    (result,) = predictor.predict([torch.rand(3, 64, 80)])
    assert result["boxes"].shape[-1] == 4 and len(result["scores"]) == len(result["labels"])
    run_analysis(gfl_checkpoint, gfl_checkpoint, out=tmp_path / "a", max_images=4, num_visualize=0)
    analysis = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert all(level["mean_D"] == 0.0 for level in analysis["features"]["levels"])


# ------------------------------------------------------------------ LD


def test_localization_distillation_matches_a_loop():
    g = torch.Generator().manual_seed(4)
    bins, temperature = 5, 3.0
    student, teacher = torch.randn(3, 4 * bins, generator=g), torch.randn(3, 4 * bins, generator=g)
    weights = torch.tensor([0.2, 0.0, 0.7])
    expected = 0.0
    for r in range(3):
        per_edge = []
        for e in range(4):
            s = torch.softmax(student[r, e * bins : (e + 1) * bins].double() / temperature, 0)
            t = torch.softmax(teacher[r, e * bins : (e + 1) * bins].double() / temperature, 0)
            per_edge.append(float((t * (t.log() - s.log())).sum()) * temperature**2)
        expected += float(weights[r]) * sum(per_edge) / 4
    expected /= float(weights.sum())
    got = localization_distillation_loss(student, teacher, weights, bins, temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert localization_distillation_loss(teacher, teacher, weights, bins).item() == pytest.approx(
        0.0, abs=1e-6
    )
    empty = localization_distillation_loss(student, teacher, torch.zeros(3), bins)
    assert empty.item() == 0.0 and empty.requires_grad is student.requires_grad


def test_localization_distillation_gradcheck():
    g = torch.Generator().manual_seed(5)
    student = torch.randn(2, 12, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 12, generator=g, dtype=torch.float64)
    weights = torch.tensor([0.5, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda s: localization_distillation_loss(s, teacher, weights, 3, 2.0), (student,)
    )


def test_ld_region_adds_the_valuable_localisation_region_to_the_positives():
    from detdistill.distill import Distiller
    from detdistill.losses import build_method
    from test_distill import batch

    student, teacher = tiny("gfl", 8), tiny("gfl", 16)
    pair = Distiller(student, teacher, {}).train().run_pair(*batch())
    vlr, positives = (
        build_method("ld")._region(pair),
        build_method("ld", region="positives")._region(pair),
    )
    assert positives.sum() > 0 and bool((vlr | positives).eq(vlr).all())
    assert vlr.sum() > positives.sum()
    # anchor by anchor: a positive, or IoU >= alpha_vl x the box's ATSS threshold for some box
    from detdistill.models.assigners import atss_candidates

    sizes = pair.student.num_anchors_per_level()
    for image, (anchors, boxes) in enumerate(zip(pair.student.anchors, pair.gt_boxes, strict=True)):
        thresholds = atss_candidates(anchors, sizes, boxes, teacher.topk)[2].tolist()
        for r, anchor in enumerate(anchors.tolist()):
            near = any(
                plain_iou(anchor, box) >= 0.25 * t
                for box, t in zip(boxes.tolist(), thresholds, strict=True)
            )
            assert bool(vlr[image, r]) == (bool(positives[image, r]) or near), (image, r)
    ld = build_method("ld")(pair)
    ld.backward()
    assert ld.item() > 0 and all(p.grad is None for p in teacher.parameters())


def plain_iou(a: list[float], b: list[float]) -> float:
    """IoU of two xyxy boxes, by hand."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
