"""Batches padded to 32 (torchvision's rule), with P6/P7 grids that round up."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import FPN_DETECTORS
from detdistill.distill import Distiller
from detdistill.models import build_detector

LEVELS = (3, 4, 5, 6, 7)


def five_level(name: str, width: int, size: int = 320):
    torch.manual_seed(width)
    return build_detector(
        name, num_classes=3, backbone="tiny", backbone_kwargs={"width": width, "depth": 1},
        levels=LEVELS, min_size=size, max_size=512,
    )  # fmt: skip


def targets_for(height: int, width: int) -> list[dict]:
    return [{"boxes": torch.tensor([[0.1 * width, 0.2 * height, 0.6 * width, 0.9 * height]]),
             "labels": torch.tensor([1])}]  # fmt: skip


@pytest.mark.parametrize("name", FPN_DETECTORS)
@pytest.mark.parametrize(("height", "width"), [(320, 320), (333, 500)])
def test_levels_round_up_and_anchors_stay_on_the_stride_grid(name, height, width):
    model = five_level(name, 4, size=min(height, width)).train()
    image = torch.rand(3, height, width)
    out = model([image], targets_for(height, width))
    padded_h, padded_w = (math.ceil(s / 32) * 32 for s in (height, width))
    assert model.transform.size_divisible == 32
    for level, stride in zip(out.cls_logits, model.strides, strict=True):
        assert level.shape[-2:] == (math.ceil(padded_h / stride), math.ceil(padded_w / stride))
    anchors = out.anchors[0]
    start = 0
    for size, stride in zip(out.num_anchors_per_level(), model.strides, strict=True):
        centres = (anchors[start : start + size, :2] + anchors[start : start + size, 2:]) / 2
        assert torch.equal(centres % stride, torch.zeros_like(centres))  # exact, not image // grid
        start += size
    assert any((m >= 0).any() for m in out.matched_idxs)
    assert all(torch.isfinite(v) for v in out.losses.values())
    model.eval()
    with torch.no_grad():
        (detections,) = model([image])
    assert detections["boxes"].shape[-1] == 4


def test_distillation_aligns_teacher_and_student_at_odd_sizes():
    student, teacher = five_level("retinanet", 4, 333), five_level("retinanet", 8, 333)
    image, targets = torch.rand(3, 333, 500), targets_for(333, 500)
    distiller = Distiller(student, teacher, {"rm": 1.0, "pfi": 1.0, "crosskd": 1.0}).train()
    pair = distiller.run_pair([image], targets)
    for s, t in zip(pair.student.features, pair.teacher.features, strict=True):
        assert s.shape[-2:] == t.shape[-2:]
    losses = distiller([image], targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_padding_multiple_is_checked():
    with pytest.raises(ValueError, match="size_divisible must be >= 1"):
        build_detector("retinanet", num_classes=3, backbone="tiny", size_divisible=0)


def test_onnx_export_matches_pytorch_at_sizes_off_the_largest_stride(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from detdistill.export import export_detector, export_module

    detector = five_level("retinanet", 4, 320).eval()
    path = export_detector(detector, tmp_path / "p7.onnx", image_size=320)
    images = torch.rand(1, 3, 333, 500)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, scores, sizes = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        ref_boxes, ref_scores, ref_sizes = export_module(detector)(images)
    assert sizes.tolist() == ref_sizes.tolist()
    torch.testing.assert_close(torch.from_numpy(boxes), ref_boxes, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(torch.from_numpy(scores), ref_scores, rtol=1e-3, atol=1e-5)


def test_a_model_padded_to_128_before_differs_only_through_the_padding():
    """Checkpoints from before kept padding to the largest stride; on an image that is a
    multiple of 128 both paddings agree exactly, elsewhere only the padding differs."""
    new = five_level("retinanet", 4, 256).eval()
    old = five_level("retinanet", 4, 256)
    old.transform.size_divisible = 128
    old.load_state_dict(new.state_dict())
    old.eval()
    image = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = new([image]), old([image])
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(a[0][key], b[0][key])
