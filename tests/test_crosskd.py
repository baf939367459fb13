"""CrossKD: its three losses against loops, gradchecks, and the cross-head wiring on real detectors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import FPN_DETECTORS
from detdistill.distill import Distiller, IncompatibleModelsError
from detdistill.losses import flatten_levels
from detdistill.losses.crosskd import (
    cross_head_box_loss,
    cross_head_class_loss,
    cross_head_quality_loss,
)
from test_distill import batch, tiny


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce(logit: float, target: float) -> float:
    p = sigmoid(logit)
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def giou(a: list[float], b: list[float]) -> float:
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = area(a) + area(b) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def random_boxes(g: torch.Generator, n: int, dtype=torch.float32) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * 20
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * 10 + 1
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_class_loss_matches_a_loop(beta):
    g = torch.Generator().manual_seed(0)
    cross, teacher = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    expected = 0.0
    for x, t in zip(cross.flatten().tolist(), teacher.flatten().tolist(), strict=True):
        expected += abs(sigmoid(x) - sigmoid(t)) ** beta * bce(x, sigmoid(t))
    got = cross_head_class_loss(cross, teacher, num_positives=4, beta=beta)
    assert got.item() == pytest.approx(expected / 4, rel=1e-5)
    assert cross_head_class_loss(teacher, teacher, 4).item() == 0.0
    # No positives: normalised by 1, not by 0.
    assert cross_head_class_loss(cross, teacher, 0, beta).item() == pytest.approx(
        expected, rel=1e-5
    )


def test_box_and_quality_losses_match_loops():
    g = torch.Generator().manual_seed(1)
    cross, teacher = random_boxes(g, 6), random_boxes(g, 6)
    weights = torch.rand(6, generator=g)
    expected = sum(
        w * (1 - giou(a, b))
        for w, a, b in zip(weights.tolist(), cross.tolist(), teacher.tolist(), strict=True)
    ) / float(weights.sum())
    assert cross_head_box_loss(cross, teacher, weights).item() == pytest.approx(expected, rel=1e-5)
    assert cross_head_box_loss(teacher, teacher, weights).item() == pytest.approx(0.0, abs=1e-6)

    q_cross, q_teacher = torch.randn(6, generator=g), torch.randn(6, generator=g)
    expected = sum(
        w * bce(x, sigmoid(t))
        for w, x, t in zip(weights.tolist(), q_cross.tolist(), q_teacher.tolist(), strict=True)
    ) / float(weights.sum())
    got = cross_head_quality_loss(q_cross, q_teacher, weights)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_crosskd_losses_gradcheck_and_reach_only_the_cross_side():
    g = torch.Generator().manual_seed(2)
    d = torch.float64
    logits = torch.randn(3, 4, generator=g, dtype=d, requires_grad=True)
    target = torch.randn(3, 4, generator=g, dtype=d, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: cross_head_class_loss(x, target, 2), (logits,))
    boxes = random_boxes(g, 4, d).requires_grad_()
    teacher_boxes = random_boxes(g, 4, d).requires_grad_()
    weights = torch.rand(4, generator=g, dtype=d)
    assert torch.autograd.gradcheck(
        lambda b: cross_head_box_loss(b, teacher_boxes, weights), (boxes,)
    )
    quality = torch.randn(4, generator=g, dtype=d, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q: cross_head_quality_loss(q, target[0], weights), (quality,)
    )
    total = cross_head_class_loss(logits, target, 2) + cross_head_box_loss(
        boxes, teacher_boxes, weights
    )
    total.backward()
    assert target.grad is None and teacher_boxes.grad is None


def test_crosskd_runs_the_student_tower_through_the_teachers_last_convs():
    student, teacher = tiny(width=8), tiny(width=16, num_convs=2)
    distiller = Distiller(student, teacher, {"crosskd": 1.0})
    distiller.train()
    images, targets = batch()
    _, distill = distiller.loss_terms(images, targets)

    # The same value computed by hand from the detectors' parts.
    image_list, moved = student.transform(images, targets)
    tensors, sizes = image_list.tensors, image_list.image_sizes
    s_out = student.forward_batch(tensors, sizes, moved)
    with torch.no_grad():
        t_out = teacher.forward_batch(tensors, sizes)
    cls_tower, reg_tower = student.head_towers()
    # a tower shared over levels gets one adapter per branch, shared over levels too
    (cls_adapter,), (reg_adapter,) = distiller.adapters["tower1"]
    t_cls_tower, t_reg_tower = teacher.head_towers()
    assert student.tower_depth == 4 and teacher.tower_depth == 2
    cross_cls, cross_reg = [], []
    for f in s_out.features:
        c = t_cls_tower[1:](cls_adapter(cls_tower[:3](f)))
        r = t_reg_tower[1:](reg_adapter(reg_tower[:3](f)))
        cross_cls.append(teacher.head.classification_head.cls_logits(c))
        cross_reg.append(teacher.head.regression_head.bbox_reg(r))
    t_logits = t_out.flat_cls_logits()
    positives = sum(int((m >= 0).sum()) for m in s_out.matched_idxs)
    anchors = torch.cat(s_out.anchors)
    weights = t_logits.sigmoid().amax(-1).reshape(-1)
    teacher_boxes = teacher.decode_boxes(t_out.flat_bbox_regression().reshape(-1, 4), anchors)
    proper = (teacher_boxes[:, 2:] - teacher_boxes[:, :2] >= 1).all(dim=1)
    expected = cross_head_class_loss(
        flatten_levels(cross_cls, 3), t_logits, positives
    ) + cross_head_box_loss(
        teacher.decode_boxes(flatten_levels(cross_reg, 4).reshape(-1, 4), anchors),
        teacher_boxes,
        weights * proper,
    )
    assert distill["crosskd"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("detector", FPN_DETECTORS)
def test_crosskd_of_a_student_equal_to_its_teacher_has_no_gradient(detector):
    teacher = tiny(detector, 8)
    # NCHW teacher: the identity needs bit-equal outputs (GIoU has a kink at equal boxes)
    distiller = Distiller(
        copy.deepcopy(teacher), teacher, {"crosskd": 1.0}, teacher_channels_last=False
    )
    distiller.eval()  # BatchNorm of both from running statistics: the same function
    _, distill = distiller.loss_terms(*batch())
    distill["crosskd"].backward()
    grads = [p.grad for p in distiller.student.parameters() if p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) < 1e-6
    assert all(p.grad is None for p in distiller.teacher.parameters())


def test_crosskd_names_the_tower_it_cannot_reuse():
    with pytest.raises(
        IncompatibleModelsError, match=r"crosskd reads the head towers before their last 3"
    ):
        Distiller(
            tiny(width=8), tiny(width=16, num_convs=2), {"crosskd": 1.0},
            method_options={"crosskd": {"teacher_convs": 3}},
        )  # fmt: skip
    with pytest.raises(ValueError, match="teacher_convs must be >= 0"):
        Distiller(
            tiny(width=8), tiny(width=16), {"crosskd": 1.0},
            method_options={"crosskd": {"teacher_convs": -1}},
        )  # fmt: skip


def test_the_under_a_pixel_mask_weights_the_box_term_only(monkeypatch):
    """FCOS: w_r (the teacher's top class probability) weights L_quality as it is; L_box
    takes b_r = w_r, 0 where the teacher's box is under a pixel wide or high."""
    import detdistill.losses.crosskd as crosskd

    seen = {}
    for name in ("cross_head_box_loss", "cross_head_quality_loss"):
        real = getattr(crosskd, name)

        def spy(*args, _name=name, _real=real):
            seen[_name] = (args[1].detach(), args[2].detach())  # the teacher side, the weights
            return _real(*args)

        monkeypatch.setattr(crosskd, name, spy)
    student, teacher = tiny("fcos", 8), tiny("fcos", 16)
    distiller = Distiller(student, teacher, {"crosskd": 1.0}).train()
    distiller(*batch())
    teacher_boxes, box_weights = seen["cross_head_box_loss"]
    _, quality_weights = seen["cross_head_quality_loss"]
    sizes = teacher_boxes[:, 2:] - teacher_boxes[:, :2]
    proper = (sizes >= 1.0).all(dim=1)
    assert not proper.all(), "the test needs teacher boxes under a pixel (FCOS far from objects)"
    assert torch.equal(box_weights, quality_weights * proper)
    assert bool((quality_weights[~proper] > 0).all())  # masked for L_box only
