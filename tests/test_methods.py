"""The method registry: every registered method on one synthetic batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from detdistill.losses import (
    NECK,
    DistillBatch,
    build_method,
    flatten_levels,
    list_methods,
    rank_mimicking_loss,
)
from detdistill.losses.rank_mimicking import top_iou_candidates
from detdistill.models.output import DetectorOutput

NUM_CLASSES = 3
NUM_ANCHORS = 2
SHAPES = [(4, 4), (2, 2)]
STRIDES = [8, 16]


def make_batch(equal: bool = False, seed: int = 0, teacher_grad: bool = False) -> DistillBatch:
    g = torch.Generator().manual_seed(seed)
    n, c = 2, 5
    ak = NUM_ANCHORS * NUM_CLASSES

    def maps(ch):
        return [torch.randn(n, ch, h, w, generator=g) for h, w in SHAPES]

    teacher_feats, teacher_logits, teacher_quality = maps(c), maps(ak), maps(NUM_ANCHORS)
    if teacher_grad:  # as if the teacher's outputs had a graph: the terms must not use it
        for t in (*teacher_feats, *teacher_logits, *teacher_quality):
            t.requires_grad_()
    if equal:
        student_feats = [t.clone().requires_grad_() for t in teacher_feats]
        student_logits = [t.clone().requires_grad_() for t in teacher_logits]
        student_quality = [t.clone().requires_grad_() for t in teacher_quality]
    else:
        student_feats = [t.requires_grad_() for t in maps(c)]
        student_logits = [t.requires_grad_() for t in maps(ak)]
        student_quality = [t.requires_grad_() for t in maps(NUM_ANCHORS)]
    anchors = []
    for (h, w), stride in zip(SHAPES, STRIDES, strict=True):
        for y in range(h):
            for x in range(w):
                for size in (stride, 2 * stride):
                    cx, cy = stride * x + stride / 2, stride * y + stride / 2
                    anchors.append([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])
    anchors = torch.tensor(anchors)
    r = anchors.shape[0]
    gt_boxes = [torch.tensor([[2.0, 2.0, 20.0, 20.0], [10.0, 4.0, 30.0, 28.0]]), torch.zeros(0, 4)]
    gt_labels = [torch.tensor([2, 0]), torch.zeros(0, dtype=torch.long)]
    matched = torch.full((r,), -1, dtype=torch.long)
    matched[[0, 1, 3, 9]] = 0
    matched[[5, 6, 39]] = 1
    matched[[2]] = -2
    sizes = [(32, 32)] * n
    regression = [torch.zeros(n, 4 * NUM_ANCHORS, h, w) for h, w in SHAPES]
    student = DetectorOutput(
        features=student_feats,
        cls_logits=student_logits,
        bbox_regression=regression,
        quality=student_quality,
        anchors=[anchors, anchors],
        image_sizes=sizes,
        matched_idxs=[matched, torch.full((r,), -1, dtype=torch.long)],
    )
    teacher = DetectorOutput(
        features=teacher_feats,
        cls_logits=teacher_logits,
        bbox_regression=regression,
        quality=teacher_quality,
        anchors=[anchors, anchors],
        image_sizes=sizes,
    )
    return DistillBatch(
        student, teacher, gt_boxes, gt_labels, torch.zeros(n, 3, 32, 32), taps={NECK: student_feats}
    )


def test_registry_lists_the_spec_methods():
    assert set(list_methods()) >= {
        "rm", "pfi", "kd", "fitnet", "fgfi", "defeat", "scorel2", "pkd", "crosskd", "ld",
    }  # fmt: skip


# Methods that run the teacher's head (tests/test_crosskd.py) or read edge distributions
# (tests/test_gfl.py) need real detectors.
TENSOR_METHODS = [
    m for m in list_methods() if all(t.where == "neck" for t in build_method(m).taps) and m != "ld"
]


@pytest.mark.parametrize("name", TENSOR_METHODS)
def test_every_method_is_finite_has_gradients_and_is_zero_when_equal(name):
    method = build_method(name)
    batch = make_batch(teacher_grad=True)
    loss = method(batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [t.grad for t in batch.tapped(NECK) + batch.student.cls_logits if t.grad is not None]
    assert grads and any(gr.abs().sum() > 0 for gr in grads)
    teacher = batch.teacher.features + batch.teacher.cls_logits + batch.teacher.quality
    assert all(t.requires_grad and t.grad is None for t in teacher)  # targets, never trained
    assert method(make_batch(equal=True)).item() == pytest.approx(0.0, abs=1e-7)


def test_flatten_levels_order_is_level_h_w_anchor():
    x = torch.arange(1 * 2 * 3 * 2 * 2).view(1, 6, 2, 2).float()  # A=2, K=3, H=W=2
    flat = flatten_levels([x], 3)
    assert flat.shape == (1, 8, 3)
    # anchor index (h=1, w=0, a=1) -> position (1*2 + 0)*2 + 1 = 5; class k is channel a*K + k
    assert flat[0, 5].tolist() == [x[0, 3, 1, 0].item(), x[0, 4, 1, 0].item(), x[0, 5, 1, 0].item()]


def test_rm_method_gathers_each_instance_class_logit():
    batch = make_batch()
    flat_s = batch.student.flat_cls_logits().detach()
    flat_t = batch.teacher.flat_cls_logits()
    rows = [(0, a, 2, 0) for a in (0, 1, 3, 9)] + [(0, a, 0, 1) for a in (5, 6, 39)]
    s = torch.stack([flat_s[n, a, k] for n, a, k, _ in rows])
    t = torch.stack([flat_t[n, a, k] for n, a, k, _ in rows])
    ids = torch.tensor([row[3] for row in rows])
    expected = rank_mimicking_loss(s, t, ids, 2.0)
    assert build_method("rm", temperature=2.0, candidates="positives")(
        batch
    ).item() == pytest.approx(expected.item(), rel=1e-6)
    prob = rank_mimicking_loss(s.sigmoid(), t.sigmoid(), ids)
    positives_prob = build_method("rm", score="prob", candidates="positives")(batch)
    assert positives_prob.item() == pytest.approx(prob.item(), rel=1e-6)
    quality = batch.student.flat_quality().detach()
    t_quality = batch.teacher.flat_quality()
    s_q = torch.stack(
        [F.logsigmoid(flat_s[n, a, k]) + F.logsigmoid(quality[n, a]) for n, a, k, _ in rows]
    )
    t_q = torch.stack(
        [F.logsigmoid(flat_t[n, a, k]) + F.logsigmoid(t_quality[n, a]) for n, a, k, _ in rows]
    )
    with_quality = build_method("rm", score="quality", candidates="positives")(batch)
    assert with_quality.item() == pytest.approx(rank_mimicking_loss(s_q, t_q, ids).item(), rel=1e-6)


def test_rm_quality_needs_a_quality_branch():
    batch = make_batch()
    batch.student.quality = batch.teacher.quality = None
    with pytest.raises(ValueError, match="quality branch"):
        build_method("rm", score="quality")(batch)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("pfi", {"feature_norm": "chanel"}, "pfi feature_norm must be 'none' or 'channel'"),
        ("pfi", {"weight_norm": "max"}, "pfi weight_norm must be 'none' or 'mean'"),
        ("pfi", {"norm": "l1"}, "pfi norm must be 'mean' or 'l2'"),
        ("fitnet", {"feature_norm": "x"}, "fitnet feature_norm must be"),
        ("scorel2", {"feature_norm": "x"}, "scorel2 feature_norm must be"),
        ("fgfi", {"psi": 0.0}, r"fgfi psi must be in \(0, 1\), got 0.0"),
        ("fgfi", {"psi": 1.5}, r"fgfi psi must be in \(0, 1\), got 1.5"),
        ("defeat", {"foreground_weight": -1.0}, "defeat weights must be >= 0"),
        ("kd", {"temperature": 0.0}, "kd temperature must be > 0"),
        ("rm", {"score": "logits"}, "rm score must be 'logit', 'prob' or 'quality'"),
        ("rm", {"candidates": "positives", "topk": 8}, "with 'positives' it is unused"),
        ("ld", {"region": "all"}, "ld region must be 'vlr' or 'positives'"),
    ],
)
def test_options_are_checked_when_the_method_is_built(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_method(name, **options)


def test_fgfi_psi_chooses_the_imitated_locations():
    batch = make_batch()
    losses = [build_method("fgfi", psi=psi)(batch).item() for psi in (0.2, 0.5, 0.9)]
    assert all(loss > 0 for loss in losses) and len(set(losses)) == 3


def test_build_method_errors_name_the_choices():
    with pytest.raises(ValueError, match="unknown distillation method 'rmm'.*fitnet"):
        build_method("rmm")
    with pytest.raises(ValueError, match="no option.*temprature.*temperature"):
        build_method("rm", temprature=2.0)


def iou(a, b):
    """Plain-Python IoU of two xyxy boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


@pytest.mark.parametrize("k", [2, 5, 1000])
@pytest.mark.parametrize("assigner_ious", [False, True])
def test_rm_topk_candidates_are_each_objects_best_overlapping_anchors(k, assigner_ious):
    batch = make_batch()
    if assigner_ious:  # as RetinaNet's and ATSS's assigners hand them on; else computed here
        batch.student.gt_ious = [
            box_iou(b, a) for b, a in zip(batch.gt_boxes, batch.student.anchors, strict=True)
        ]
    candidates = top_iou_candidates(batch, k)
    anchors = batch.student.anchors[0].tolist()
    expected = set()
    for j, (box, label) in enumerate(
        zip(batch.gt_boxes[0].tolist(), batch.gt_labels[0].tolist(), strict=True)
    ):
        overlaps = sorted(((iou(box, a), r) for r, a in enumerate(anchors)), reverse=True)
        kth = overlaps[min(k, len(overlaps)) - 1][0]
        best = {r for v, r in overlaps if v > 0 and v >= kth}
        chosen = {
            int(r) for r, i in zip(candidates.anchors, candidates.instances, strict=True) if i == j
        }
        assert chosen <= best and len(chosen) == min(k, sum(v > 0 for v, _ in overlaps))
        expected |= {(0, r, label, j) for r in chosen}
    got = set(zip(*(x.tolist() for x in candidates), strict=True))
    assert got == expected  # the second image has no objects and adds nothing
    loss = build_method("rm", candidates="topk", topk=k)(batch)
    s = batch.student.flat_cls_logits()[candidates.images, candidates.anchors, candidates.classes]
    t = batch.teacher.flat_cls_logits()[candidates.images, candidates.anchors, candidates.classes]
    assert loss.item() == pytest.approx(
        rank_mimicking_loss(s, t, candidates.instances).item(), rel=1e-6
    )


def test_rm_topk_candidates_take_the_assigners_ious_when_given():
    batch = make_batch()
    r = batch.student.anchors[0].shape[0]
    ious = torch.zeros(2, r)
    ious[0, [7, 8]] = torch.tensor([0.9, 0.8])
    ious[1, 11] = 0.5
    batch.student.gt_ious = [ious, torch.zeros(0, r)]
    candidates = top_iou_candidates(batch, 4)
    assert candidates.anchors.tolist() == [7, 8, 11]
    assert candidates.instances.tolist() == [0, 0, 1]
    assert candidates.images.tolist() == [0, 0, 0]
    assert candidates.classes.tolist() == [2, 2, 0]


def test_rm_options_are_checked():
    with pytest.raises(ValueError, match="rm candidates must be 'positives' or 'topk'"):
        build_method("rm", candidates="all")
    with pytest.raises(ValueError, match="rm topk must be >= 2"):
        build_method("rm", candidates="topk", topk=1)
    with pytest.raises(ValueError, match="rm temperature must be > 0"):
        build_method("rm", temperature=0.0)


@pytest.mark.parametrize("name", ["fitnet", "fgfi", "defeat", "scorel2", "pfi"])
def test_feature_methods_take_the_scale_free_form(name):
    batch = make_batch()
    plain, scaled = build_method(name), build_method(name, feature_norm="channel")
    assert torch.isfinite(scaled(batch)) and scaled(batch).item() != plain(batch).item()
    grown = make_batch()
    grown.teacher.features = [100 * f + 5 for f in grown.teacher.features]
    assert scaled(grown).item() == pytest.approx(scaled(batch).item(), rel=1e-4)


def pearson_reference(student_feats, teacher_feats) -> float:
    """sum over levels of mean over channels of 1 - corrcoef, one channel at a time."""
    total = 0.0
    for f_s, f_t in zip(student_feats, teacher_feats, strict=True):
        per_channel = []
        for c in range(f_s.shape[1]):
            s = f_s[:, c].detach().double().flatten()
            t = f_t[:, c].detach().double().flatten()
            rho = torch.corrcoef(torch.stack([s, t]))[0, 1]
            per_channel.append(1.0 - float(rho))
        total += sum(per_channel) / len(per_channel)
    return total


def test_pkd_is_one_minus_pearson_correlation_per_channel():
    batch = make_batch()
    loss = build_method("pkd")(batch)
    assert loss.item() == pytest.approx(
        pearson_reference(batch.tapped(NECK), batch.teacher.features), rel=1e-5
    )
    # Correlation ignores each channel's scale and offset: 0 for an affine copy.
    batch.teacher.features = [3 * f.detach() + 7 for f in batch.tapped(NECK)]
    assert build_method("pkd")(batch).item() == pytest.approx(0.0, abs=1e-5)


def test_pkd_gradcheck():
    g = torch.Generator().manual_seed(3)
    student = [torch.randn(2, 3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)]
    teacher = [torch.randn(2, 3, 3, 2, generator=g, dtype=torch.float64)]
    batch = make_batch()
    method = build_method("pkd")

    def loss(f):
        batch.taps[NECK], batch.teacher.features = [f], teacher
        return method(batch).double()

    assert torch.autograd.gradcheck(loss, (student[0],))
