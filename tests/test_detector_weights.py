"""Whole-detector weights from torchvision (``model.weights``): mapping, strictness, config.

torchvision's detectors are built at random init (no download) with their
normalisation layers given distinct values, saved, and loaded into ours; the
outputs of both on one batched tensor must agree, level by level.
"""

from __future__ import annotations

import logging
import math
import re
import urllib.error

import pytest
import torch
from torch import nn
from torchvision.models import WeightsEnum
from torchvision.models import detection as tvd
from torchvision.ops.misc import FrozenBatchNorm2d

from detdistill.engine.builders import build_model
from detdistill.engine.config import config_from_dict
from detdistill.engine.config_schema import ModelConfig
from detdistill.errors import ConfigError, DetDistillError
from detdistill.models import build_detector
from detdistill.models.detector_weights import (
    PRIOR_PROBABILITY,
    DetectorWeightsError,
    load_detector_weights,
)
from detdistill.models.output import flatten_level

pytestmark = pytest.mark.usefixtures("one_thread")

TORCHVISION = {"retinanet": tvd.retinanet_resnet50_fpn, "fcos": tvd.fcos_resnet50_fpn}
CLS = ["head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"]
LEVELS = [3, 4, 5, 6, 7]


def _distinct_norms(model: nn.Module) -> None:
    """Non-trivial norm statistics and affines, so that a misplaced norm changes the outputs."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.copy_(1 + 0.1 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn_like(m.running_mean))
                m.running_var.uniform_(0.5, 1.5)


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    """``family -> (torchvision model, file of its state_dict)``, built once per family."""
    cache: dict[str, tuple[nn.Module, object]] = {}

    def get(family: str):
        if family not in cache:
            torch.manual_seed(0)
            builder = TORCHVISION.get(family, tvd.retinanet_resnet50_fpn_v2)
            model = builder(weights=None, weights_backbone=None).eval()
            _distinct_norms(model)
            path = tmp_path_factory.mktemp(family) / f"{family}.pth"
            torch.save(model.state_dict(), path)
            cache[family] = (model, path)
        return cache[family]

    return get


def ours(family: str, num_classes: int = 91, **kwargs) -> nn.Module:
    torch.manual_seed(1)  # other values than the torchvision model's
    return build_detector(
        family, backbone="resnet50", num_classes=num_classes, min_size=128, max_size=128, **kwargs
    ).eval()


def tiny(family: str, **kwargs) -> nn.Module:
    return build_detector(family, backbone="tiny", num_classes=5, levels=(3, 4, 5), **kwargs)


def assert_loaded(model: nn.Module, source: dict, skip: tuple[str, ...] = ()) -> None:
    for key, value in model.state_dict().items():
        if key not in skip:
            assert torch.equal(value, source[key].to(value.dtype)), key


def legacy(state: dict) -> dict:
    """The pre-0.13 torchvision key layout (as in torchvision's COCO files)."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.", r"\1.", key)
        m = re.match(r"^(head\.(?:classification|regression)_head\.conv)\.(\d+)\.0\.(\w+)$", key)
        if m:
            key = f"{m[1]}.{2 * int(m[2])}.{m[3]}"
        out[key] = value
    return out


@pytest.mark.parametrize("family", ["retinanet", "fcos"])
def test_every_tensor_loads_and_outputs_match_torchvision(family, torchvision_file):
    tv, path = torchvision_file(family)
    model = ours(family)
    report = load_detector_weights(model, path)
    state = tv.state_dict()
    assert report.family == family
    assert report.loaded == len(model.state_dict()) == len(state)
    assert report.reinitialised == report.ignored == report.kept == []
    assert_loaded(model, state)

    torch.manual_seed(2)
    images = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        expected = tv.head(list(tv.backbone(images).values()))
        got = model.forward_batch(images, [(128, 96)] * 2)
    sizes = [x.shape[-2] * x.shape[-1] * model.num_anchors_per_location for x in got.cls_logits]
    pairs = [("cls_logits", got.cls_logits, 91), ("bbox_regression", got.bbox_regression, 4)]
    if family == "fcos":
        pairs.append(("bbox_ctrness", got.quality, 1))
    for name, levels, channels in pairs:
        assert len(levels) == len(LEVELS)
        for level, (mine, theirs) in enumerate(
            zip(levels, expected[name].split(sizes, dim=1), strict=True)
        ):
            torch.testing.assert_close(
                flatten_level(mine, channels), theirs, rtol=1e-5, atol=1e-5, msg=f"{name} P{level}"
            )
    assert expected["cls_logits"].std() > 0.1  # outputs that a wrong mapping would change


@pytest.mark.parametrize("family", ["retinanet", "fcos"])
def test_other_class_count_reinitialises_the_class_predictor_only(family, torchvision_file, caplog):
    tv, path = torchvision_file(family)
    model = ours(family, num_classes=5)
    with caplog.at_level(logging.INFO, logger="detdistill.models"):
        report = load_detector_weights(model, path)
    assert report.reinitialised == CLS
    assert report.loaded == len(model.state_dict()) - 2
    anchors = model.num_anchors_per_location
    weight, bias = (model.state_dict()[k] for k in CLS)
    assert weight.shape == (5 * anchors, 256, 3, 3)
    torch.testing.assert_close(
        bias, torch.full((5 * anchors,), -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
    )
    assert abs(weight.std().item() - 0.01) < 0.001 and abs(weight.mean().item()) < 0.001
    assert_loaded(model, tv.state_dict(), skip=tuple(CLS))
    lines = [r for r in caplog.records if r.name == "detdistill.models"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "91 classes in the weights, 5 in the model" in lines[0].getMessage()
    assert "re-initialised" in lines[0].getMessage()


@pytest.mark.parametrize("family", ["retinanet", "fcos"])
def test_pre_013_key_layout_of_torchvision_coco_files_loads(family, torchvision_file, tmp_path):
    tv, _ = torchvision_file(family)
    old = legacy(tv.state_dict())
    assert "backbone.fpn.inner_blocks.0.weight" in old
    if family == "retinanet":
        assert "head.classification_head.conv.6.weight" in old
    path = tmp_path / "legacy.pth"
    torch.save({"model": old}, path)  # also: wrapped under "model"
    model = ours(family)
    report = load_detector_weights(model, path)
    assert report.loaded == len(model.state_dict())
    assert_loaded(model, tv.state_dict())


def test_frozen_bn_and_counters(torchvision_file, tmp_path):
    tv, path = torchvision_file("retinanet")
    counters = [k for k in tv.state_dict() if k.endswith("num_batches_tracked")]
    assert counters
    frozen = ours("retinanet", norm_layer="frozen_bn")
    report = load_detector_weights(frozen, path)
    assert report.ignored == counters and report.kept == []
    # a frozen-BN file (torchvision's COCO files) into trainable BN: the counters stay
    no_counters = {k: v for k, v in tv.state_dict().items() if k not in counters}
    torch.save(no_counters, tmp_path / "frozen.pth")
    model = ours("retinanet")
    report = load_detector_weights(model, tmp_path / "frozen.pth")
    assert report.kept == counters and report.ignored == []
    assert_loaded(model, no_counters, skip=tuple(counters))


def test_corrupted_file_names_the_keys_and_leaves_the_model_alone(torchvision_file, tmp_path):
    tv, _ = torchvision_file("retinanet")
    state = tv.state_dict()
    removed = "backbone.body.layer2.0.conv1.weight"
    del state[removed]
    state["head.regression_head.bbox_reg.bias_renamed"] = state.pop(
        "head.regression_head.bbox_reg.bias"
    )
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    model = ours("retinanet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DetectorWeightsError) as info:
        load_detector_weights(model, path)
    message = str(info.value)
    assert isinstance(info.value, DetDistillError) and "\n" not in message
    assert f"missing key {removed} (model shape (128, 256, 1, 1))" in message
    assert "unexpected key head.regression_head.bbox_reg.bias_renamed (weights shape (36,))" in (
        message
    )
    assert "2 missing, 1 unexpected" in message
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_wrong_backbone_names_the_first_shape_mismatch(torchvision_file):
    _, path = torchvision_file("fcos")
    with pytest.raises(DetectorWeightsError, match=r"shape mismatch at backbone\.body\.") as info:
        load_detector_weights(build_detector("fcos", backbone="resnet18", num_classes=91), path)
    assert "fcos with backbone: resnet50" in str(info.value)


def test_refusals_name_the_reason(torchvision_file, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", no_download)
    _, v2 = torchvision_file("retinanet_v2")
    for source in (v2, "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1"):
        with pytest.raises(DetectorWeightsError, match=r"RetinaNet v2 .* P6 is computed from C5"):
            load_detector_weights(tiny("retinanet", head_norm="gn"), source)
    _, fcos = torchvision_file("fcos")
    with pytest.raises(
        DetectorWeightsError, match=r"holds a torchvision FCOS .* not into retinanet"
    ):
        load_detector_weights(tiny("retinanet"), fcos)
    with pytest.raises(DetectorWeightsError, match=r"holds a torchvision RetinaNet"):
        load_detector_weights(tiny("fcos"), "RetinaNet_ResNet50_FPN_Weights.COCO_V1")
    with pytest.raises(DetectorWeightsError, match=r"torchvision has no ATSS"):
        load_detector_weights(tiny("atss"), fcos)
    _, v1 = torchvision_file("retinanet")
    with pytest.raises(DetectorWeightsError, match=r"no GroupNorm .* build head_norm: null"):
        load_detector_weights(tiny("retinanet", head_norm="gn"), v1)
    with pytest.raises(DetectorWeightsError, match=r"neither an existing file nor"):
        load_detector_weights(tiny("fcos"), "no/such/file.pth")
    with pytest.raises(DetectorWeightsError, match=r"not a torchvision detector detdistill maps"):
        load_detector_weights(tiny("fcos"), "ResNet50_Weights.IMAGENET1K_V1")


def test_offline_download_gives_one_line_naming_model_weights(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(DetectorWeightsError) as info:
        load_detector_weights(tiny("fcos"), "FCOS_ResNet50_FPN_Weights.COCO_V1")
    message = str(info.value)
    assert "\n" not in message
    assert "could not download torchvision weights FCOS_ResNet50_FPN_Weights.COCO_V1" in message
    assert "pass a local file" in message and "model.weights" in message


def test_build_model_loads_model_weights(torchvision_file, tmp_path):
    tv, path = torchvision_file("fcos")
    section = {"name": "fcos", "backbone": "resnet50", "num_classes": 91, "levels": LEVELS}
    cfg = config_from_dict({"model": {**section, "weights": str(path)}}).model
    assert cfg.weights == str(path)
    model = build_model(cfg, 128)
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)  # as with weights_backbone
    counters = [k for k in tv.state_dict() if k.endswith("num_batches_tracked")]
    assert_loaded(model, tv.state_dict(), skip=tuple(counters))
    # a checkpoint's weights follow: same architecture, nothing loaded
    fresh = build_model(cfg, 128, pretrained=False)
    assert fresh.state_dict().keys() == model.state_dict().keys()
    assert not torch.equal(
        fresh.state_dict()[CLS[0]], model.state_dict()[CLS[0]].to(fresh.state_dict()[CLS[0]])
    )

    bad = ModelConfig(name="fcos", backbone="tiny", levels=[3, 4, 5], weights=str(path))
    with pytest.raises(ConfigError) as info:
        build_model(bad, 64)
    assert info.value.key == "model.weights"
    assert str(info.value).startswith("model.weights: ") and "\n" not in str(info.value)
