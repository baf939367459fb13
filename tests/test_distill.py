"""The Distiller on tiny teacher/student pairs of every detector type and method."""

from __future__ import annotations

import pytest
import torch

from conftest import FPN_DETECTORS
from detdistill.distill import Distiller, IncompatibleModelsError, PointwiseAdapter
from detdistill.losses import NECK, list_methods
from detdistill.models import build_detector

SIZE = 64


def tiny(name: str = "retinanet", width: int = 8, num_classes: int = 3, **kwargs):
    torch.manual_seed(width)
    kwargs = {"levels": (3, 4, 5), "min_size": SIZE, "max_size": SIZE, **kwargs}
    return build_detector(
        name, backbone="tiny", backbone_kwargs={"width": width}, num_classes=num_classes, **kwargs
    )


def batch(num_images: int = 2):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(num_images)]
    targets = [
        {
            "boxes": torch.tensor([[8.0, 8.0, 30.0, 36.0], [34.0, 20.0, 60.0, 50.0]]),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.tensor([[4.0, 30.0, 24.0, 60.0]]), "labels": torch.tensor([1])},
    ][:num_images]
    return images, targets


# Methods that read what only some heads have, and the detector to test them on.
HEAD_SPECIFIC = {"ld": "gfl"}


def detector_for(method: str) -> str:
    return HEAD_SPECIFIC.get(method, "retinanet")


def methods_for(detector: str) -> list[str]:
    return [m for m in list_methods() if HEAD_SPECIFIC.get(m, detector) == detector]


def teacher_snapshot(distiller: Distiller) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in distiller.teacher.state_dict().items()}


@pytest.mark.parametrize("detector", FPN_DETECTORS)
def test_distillation_step_every_method(detector):
    methods = methods_for(detector)
    distiller = Distiller(tiny(detector, 8), tiny(detector, 16), {m: 1.0 for m in methods})
    distiller.train()
    before = teacher_snapshot(distiller)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01)
    images, targets = batch()
    for _ in range(2):
        losses = distiller(images, targets)
        assert set(methods) <= set(losses)
        assert {"classification", "bbox_regression"} <= set(losses)
        for name, value in losses.items():
            assert value.dim() == 0 and torch.isfinite(value), name
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert all(not p.requires_grad for p in distiller.teacher.parameters())
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert trainable == {id(p) for p in distiller.branch.parameters() if p.requires_grad}
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for p in distiller.adapters["neck"].parameters()
    )
    after = distiller.teacher.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"teacher {key} changed"
    assert not distiller.teacher.training


def test_each_method_term_reaches_the_student():
    images, targets = batch()
    for method in list_methods():
        detector = detector_for(method)
        distiller = Distiller(tiny(detector, 8), tiny(detector, 16), {method: 1.0})
        distiller.train()
        loss = distiller(images, targets)[method]
        assert torch.isfinite(loss) and loss.item() > -1e-6, method
        loss.backward()
        grads = [p.grad for p in distiller.student.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), method


@pytest.mark.parametrize("detector", ["retinanet", "gfl"])
def test_terms_compute_in_float32_under_autocast(detector):
    """Under bfloat16 autocast the detectors' outputs are bfloat16; every method
    still reads float32 tensors with autocast off, and every term is float32."""
    methods = methods_for(detector)
    distiller = Distiller(tiny(detector, 8), tiny(detector, 16), {m: 1.0 for m in methods}).train()
    images, targets = batch()
    seen = {}
    pfi = distiller.methods["pfi"]
    pfi_forward = pfi.forward

    def probe(distill_batch):
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        outputs = (distill_batch.student, distill_batch.teacher)
        levels = [t for o in outputs for t in (*o.features, *o.cls_logits, *o.bbox_regression)]
        seen["dtypes"] = {t.dtype for t in (*levels, *distill_batch.tapped(NECK))}
        return pfi_forward(distill_batch)

    pfi.forward = probe
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image_list, _ = distiller.student.transform(images)
        raw = distiller.student.forward_batch(image_list.tensors, image_list.image_sizes)
        assert raw.cls_logits[0].dtype == torch.bfloat16  # what the Distiller upcasts
        losses = distiller(images, targets)
    assert seen == {"autocast": False, "dtypes": {torch.float32}}
    for name in methods:
        assert losses[name].dtype == torch.float32 and torch.isfinite(losses[name]), name
    sum(losses.values()).backward()
    grads = [p.grad for p in distiller.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_teacher_stays_in_eval_mode_and_is_not_in_student_state():
    distiller = Distiller(tiny(width=8), tiny(width=16), {"rm": 4.0, "pfi": 1.5})
    distiller.train()
    assert distiller.student.training and not distiller.teacher.training
    assert all(not m.training for m in distiller.teacher.modules())
    student_keys = set(distiller.student.state_dict())
    assert student_keys == set(tiny(width=8).state_dict())


def test_weights_scale_the_terms():
    images, targets = batch()
    torch.manual_seed(0)
    a = Distiller(tiny(width=8), tiny(width=16), {"pfi": 1.0})
    b = Distiller(tiny(width=8), tiny(width=16), {"pfi": 3.0})
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    # eval mode: BatchNorm uses running stats, so both see identical features
    a.branch.student.train(False)
    with torch.no_grad():
        la = a(images, targets)["pfi"]
        lb = b(images, targets)["pfi"]
    assert lb.item() == pytest.approx(3 * la.item(), rel=1e-5)


def test_same_channels_use_identity_adapters():
    distiller = Distiller(tiny(width=8), tiny(width=8), {"fitnet": 1.0})
    assert all(isinstance(a, torch.nn.Identity) for a in distiller.adapters["neck"])


@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_adapter_is_a_1x1_conv(channels_last):
    """Same init, state_dict, outputs and gradients as nn.Conv2d(c_in, c_out, 1), any layout."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, kernel_size=1).double()
    torch.manual_seed(0)
    adapter = PointwiseAdapter(5, 7).double()
    assert all(torch.equal(conv.state_dict()[k], v) for k, v in adapter.state_dict().items())
    x = torch.randn(3, 5, 6, 9, dtype=torch.double)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_conv, x_adapter = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_conv, out_adapter = conv(x_conv), adapter(x_adapter)
    torch.testing.assert_close(out_adapter, out_conv)
    upstream = torch.randn_like(out_conv)
    grads_conv = torch.autograd.grad(out_conv, [x_conv, *conv.parameters()], upstream)
    grads_adapter = torch.autograd.grad(out_adapter, [x_adapter, *adapter.parameters()], upstream)
    for expected, got in zip(grads_conv, grads_adapter, strict=True):
        torch.testing.assert_close(got, expected)


def test_different_channels_use_pointwise_adapters():
    distiller = Distiller(tiny(width=4), tiny(width=8), {"fitnet": 1.0})
    assert [type(a) for a in distiller.adapters["neck"]] == [PointwiseAdapter] * 3
    expected = (distiller.teacher.out_channels, distiller.student.out_channels)
    assert tuple(distiller.adapters["neck"][0].weight.shape[:2]) == expected


@pytest.mark.parametrize(
    ("teacher_kwargs", "message"),
    [
        ({"levels": (3, 4)}, "number of FPN levels"),
        ({"num_classes": 4}, "number of classes"),
        ({"aspect_ratios": (1.0,)}, "anchors per location"),
        ({"min_size": 96, "max_size": 96}, "input min_size"),
    ],
)
def test_incompatible_pairs_fail_at_build_time(teacher_kwargs, message):
    num_classes = teacher_kwargs.pop("num_classes", 3)
    teacher = tiny(width=16, num_classes=num_classes, **teacher_kwargs)
    with pytest.raises(IncompatibleModelsError, match=message):
        Distiller(tiny(width=8), teacher, {"rm": 1.0})


def test_ld_on_a_head_without_edge_distributions_names_what_it_needs():
    with pytest.raises(
        IncompatibleModelsError,
        match=r"ld .*needs detectors that regress them \(gfl; yolo v8 and 11",
    ):
        Distiller(tiny("retinanet", 8), tiny("retinanet", 16), {"ld": 1.0})


def test_rm_quality_score_is_refused_when_the_pair_is_built():
    options = {"rm": {"score": "quality"}}
    with pytest.raises(IncompatibleModelsError, match="rm score='quality' reads a quality branch"):
        Distiller(tiny("retinanet", 8), tiny("retinanet", 16), {"rm": 1.0}, options)
    Distiller(tiny("fcos", 8), tiny("fcos", 16), {"rm": 1.0}, options)  # FCOS has one


@pytest.mark.parametrize("detector", FPN_DETECTORS)
def test_has_quality_says_what_the_head_outputs(detector):
    model = tiny(detector, 8).eval()
    image_list, _ = model.transform([torch.rand(3, SIZE, SIZE)])
    output = model.forward_batch(image_list.tensors, image_list.image_sizes)
    assert (output.quality is not None) == model.has_quality


def test_different_head_types_fail():
    with pytest.raises(IncompatibleModelsError, match="head type"):
        Distiller(tiny("retinanet"), tiny("fcos", 16), {"rm": 1.0})


def test_method_options_must_belong_to_selected_methods():
    with pytest.raises(ValueError, match="not selected: kd"):
        Distiller(tiny(width=8), tiny(width=16), {"rm": 1.0}, {"kd": {"temperature": 2.0}})
    with pytest.raises(ValueError, match="no option"):
        Distiller(tiny(width=8), tiny(width=16), {"rm": 1.0}, {"rm": {"tau": 2.0}})


def _teacher_outputs(distiller: Distiller):
    images, targets = batch()
    image_list, _ = distiller.student.transform(images, [dict(t) for t in targets])
    return distiller.teacher_outputs(image_list.tensors, image_list.image_sizes)


def _flat(output) -> list[torch.Tensor]:
    return [*output.features, *output.cls_logits, *output.bbox_regression]


def test_teacher_runs_in_inference_mode_and_nhwc_with_unchanged_outputs():
    nhwc = Distiller(tiny(width=8), tiny(width=16), {"pfi": 1.0})
    nchw = Distiller(tiny(width=8), tiny(width=16), {"pfi": 1.0}, teacher_channels_last=False)
    convs = [p for p in nhwc.teacher.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not any(
        p.is_contiguous(memory_format=torch.channels_last)
        for p in nchw.teacher.parameters()
        if p.dim() == 4 and p.shape[-1] > 1
    )
    fast, plain = _teacher_outputs(nhwc), _teacher_outputs(nchw)
    assert all(t.is_inference() and not t.requires_grad for t in _flat(fast))
    for a, b in zip(_flat(fast), _flat(plain), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_teacher_gives_the_eager_outputs():
    one_level = {"levels": (4,)}  # the fewest kernels to compile
    compiled = Distiller(
        tiny(width=8, **one_level), tiny(width=16, **one_level), {"pfi": 1.0}, teacher_compile=True
    )
    eager = Distiller(tiny(width=8, **one_level), tiny(width=16, **one_level), {"pfi": 1.0})
    for a, b in zip(_flat(_teacher_outputs(compiled)), _flat(_teacher_outputs(eager)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_state_dict_holds_each_weight_once():
    distiller = Distiller(tiny(width=8), tiny(width=16), {"pfi": 1.0})
    keys = list(distiller.state_dict())
    assert not [k for k in keys if k.startswith("_runner")]
    expected = len(distiller.branch.state_dict()) + len(distiller.teacher.state_dict())
    assert len(keys) == expected + len(distiller.methods.state_dict())
