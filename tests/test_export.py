"""ONNX export: dynamic batch and size, outputs equal to PyTorch, detections after NMS."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from detdistill.cli import main as cli_main  # noqa: E402
from detdistill.engine.builders import load_detector  # noqa: E402
from detdistill.export import (  # noqa: E402
    OnnxOutputMismatchError,
    export_detector,
    export_module,
    export_onnx,
    postprocess_onnx_outputs,
    read_metadata,
    verify_onnx,
)
from detdistill.models import build_detector  # noqa: E402

TRAIN_SIZE = 64
CLASS_NAMES_KEY = "class_names"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models gain nothing from threads (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint) -> dict[str, Path]:
    """A briefly trained RetinaNet with its classifier re-drawn, exported once.

    One epoch on 16 images leaves every score at the focal-loss prior (0.01, the
    same to 1e-5 everywhere), and NMS on near-ties compares nothing. He-normal
    classifier weights, the last layer scaled so that the logits have standard
    deviation 2 (scores spread over (0, 1), none saturated at 1.0), make the
    detection comparison meaningful; backbone, neck and box branch stay as trained.
    """
    tmp = tmp_path_factory.mktemp("export")
    payload = torch.load(tiny_checkpoint, weights_only=True)
    detector = load_detector(tiny_checkpoint).model.eval()
    head = detector.head.classification_head
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for conv in [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]:
            std = math.sqrt(2.0 / conv.weight[0].numel())
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * std)
        head.cls_logits.bias.zero_()
        sample = torch.rand(1, 3, 96, 160, generator=gen)
        logits = export_module(detector)(sample)[1].logit()
        head.cls_logits.weight.mul_(2.0 / float(logits.std()))
    payload["model"] = detector.state_dict()
    checkpoint = tmp / "spread.pt"
    torch.save(payload, checkpoint)
    out = export_onnx(checkpoint, tmp / "onnx" / "student.onnx")
    return {"checkpoint": checkpoint, "onnx": out}


def _ort(path: Path, images: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    names = ["boxes", "scores", "level_sizes"]
    assert [o.name for o in session.get_outputs()] == names
    return session.run(names, {"images": images.numpy()})


def test_graph_is_valid_and_carries_its_metadata(exported):
    onnx.checker.check_model(str(exported["onnx"]))
    model = onnx.load(str(exported["onnx"]))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    meta = read_metadata(exported["onnx"])
    payload = torch.load(exported["checkpoint"], weights_only=True)
    assert meta[CLASS_NAMES_KEY] == payload["class_names"]
    assert meta["category_ids"] == list(range(1, 7))
    assert meta["image_size"] == str(TRAIN_SIZE)
    assert "NMS not included" in meta["outputs"]


def test_onnxruntime_matches_pytorch_at_another_batch_and_size(exported):
    detector = load_detector(exported["checkpoint"]).model.eval()
    # Export example: 1 x 3 x 64 x 64. Here: 2 images of 96 x 160.
    images = torch.rand(2, 3, 96, 160, generator=torch.Generator().manual_seed(3))
    boxes, scores, level_sizes = _ort(exported["onnx"], images)
    expected_sizes = [9 * (96 // s) * (160 // s) for s in detector.strides]
    assert level_sizes.tolist() == expected_sizes
    num_anchors = sum(expected_sizes)
    assert boxes.shape == (2, num_anchors, 4) and scores.shape == (2, num_anchors, 6)

    with torch.no_grad():
        ref_boxes, ref_scores, _ = export_module(detector)(images)
    np.testing.assert_allclose(boxes, ref_boxes.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-3, atol=1e-6)
    assert float(scores.std()) > 0.05, "scores must be spread for the NMS check to mean something"

    # Detections: the detector's own path (forward_batch + postprocess) against
    # ONNX Runtime + postprocess_onnx_outputs.
    mean = torch.tensor(detector.transform.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(detector.transform.image_std).view(1, 3, 1, 1)
    threshold, iou, max_det = 0.5, detector.nms_thresh, 50
    detector.score_thresh, detector.detections_per_img = threshold, max_det
    with torch.no_grad():
        output = detector.forward_batch((images - mean) / std, [(96, 160)] * 2)
        expected = detector.postprocess(output)
    got = postprocess_onnx_outputs(boxes, scores, threshold, iou, max_det, level_sizes)
    # More than topk_candidates scores pass on the first level: the per-level cap matters.
    assert int((scores[0, : expected_sizes[0]] > threshold).sum()) > detector.topk_candidates
    assert len(got) == 2
    for exp, det in zip(expected, got, strict=True):
        assert len(exp["scores"]) > 5
        assert len(det["scores"]) == len(exp["scores"])
        ious = box_iou(torch.from_numpy(det["boxes"]), exp["boxes"])
        same_label = torch.from_numpy(det["labels"])[:, None] == exp["labels"][None, :]
        ious = torch.where(same_label, ious, torch.zeros_like(ious))
        best_iou, match = ious.max(dim=0)  # for each PyTorch detection, the ONNX one
        assert bool((best_iou > 0.99).all())
        assert len(set(match.tolist())) == len(match), "one-to-one"
        np.testing.assert_allclose(
            det["scores"][match.numpy()], exp["scores"].numpy(), rtol=0, atol=1e-3
        )


def test_a_wrong_graph_is_caught(exported):
    detector = load_detector(exported["checkpoint"]).model.eval()
    other = copy.deepcopy(detector)
    with torch.no_grad():
        other.head.regression_head.bbox_reg.bias.add_(0.5)
    images = torch.rand(1, 3, 64, 96)
    verify_onnx(exported["onnx"], export_module(detector), images)  # the right one passes
    with pytest.raises(OnnxOutputMismatchError, match="'boxes' differs"):
        verify_onnx(exported["onnx"], export_module(other), images)


@pytest.mark.parametrize("name", ["fcos", "atss"])
def test_quality_heads_export(name, tmp_path):
    detector = build_detector(
        name,
        num_classes=3,
        backbone="tiny",
        backbone_kwargs={"width": 4, "depth": 1},
        levels=(3, 4, 5),
        min_size=TRAIN_SIZE,
        max_size=TRAIN_SIZE,
    )
    path = export_detector(detector, tmp_path / f"{name}.onnx", image_size=TRAIN_SIZE)
    images = torch.rand(3, 3, 70, 90)  # not a multiple of the stride either
    boxes, scores, level_sizes = _ort(path, images)
    with torch.no_grad():
        ref_boxes, ref_scores, ref_sizes = export_module(detector)(images)
    assert level_sizes.tolist() == ref_sizes.tolist() == [9 * 12, 5 * 6, 3 * 3]
    np.testing.assert_allclose(boxes, ref_boxes.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-3, atol=1e-6)


def test_postprocess_helper_on_a_hand_made_case():
    boxes = np.array(
        [[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=np.float32
    )
    scores = np.array([[0.9, 0.0], [0.8, 0.0], [0.7, 0.0], [0.0, 0.6]], dtype=np.float32)
    (det,) = postprocess_onnx_outputs(boxes, scores, 0.5, 0.5, 10)
    # Box 1 overlaps box 0 (IoU 0.81) in the same class; box 3 is the other class.
    np.testing.assert_allclose(det["scores"], [0.9, 0.7, 0.6])
    np.testing.assert_array_equal(det["labels"], [0, 0, 1])
    (det,) = postprocess_onnx_outputs(boxes, scores, 0.5, 0.5, max_detections=2)
    assert len(det["scores"]) == 2
    # Per-level top-1: level 0 (anchors 0-1) keeps 0.9 only, level 1 (2-3) keeps 0.7.
    (det,) = postprocess_onnx_outputs(boxes, scores, 0.5, 0.5, 10, [2, 2], topk_candidates=1)
    np.testing.assert_allclose(det["scores"], [0.9, 0.7])
    with pytest.raises(ValueError, match=r"\(N, R, 4\)"):
        postprocess_onnx_outputs(boxes[:, :3], scores)
    with pytest.raises(ValueError, match="add up"):
        postprocess_onnx_outputs(boxes, scores, level_sizes=[2, 1])


def test_cli_export(exported, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    assert cli_main(["export", str(exported["checkpoint"]), "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    onnx.checker.check_model(str(out))
    missing = tmp_path / "missing.pt"
    assert cli_main(["export", str(missing), "--out", str(tmp_path / "x.onnx")]) == 2
