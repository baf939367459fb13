"""Distiller.run_pair: the one path of a batch through teacher and student, and what methods receive."""

from __future__ import annotations

import pytest
import torch

from detdistill.distill import Distiller, IncompatibleModelsError
from detdistill.losses import NECK, DistillMethod, tower
from detdistill.losses.methods import METHODS
from test_distill import batch, tiny


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"labels": torch.tensor([0, 3])}, r"labels must lie in \[0, 3\)"),
        ({"boxes": torch.tensor([[8.0, 8.0, 8.0, 36.0], [1.0, 1.0, 5.0, 5.0]])}, "positive width"),
    ],
)
def test_bad_targets_fail_as_in_plain_training(bad, message):
    student, teacher = tiny(width=8).train(), tiny(width=16).eval()
    images, targets = batch()
    targets[0] = {**targets[0], **bad}
    with pytest.raises(ValueError, match=message):
        student(images, targets)
    calls = []
    teacher.register_forward_pre_hook(lambda *_: calls.append(1))
    distiller = Distiller(student, teacher, {"fitnet": 1.0}, teacher_channels_last=False)
    with pytest.raises(ValueError, match=message):
        distiller.run_pair(images, targets)
    assert calls == []  # checked before either network ran
    with pytest.raises(ValueError, match=message):
        distiller(images, targets)


def test_both_networks_see_one_tensor_and_the_teacher_output_is_detached():
    student, teacher = tiny(width=8), tiny(width=16)
    images, targets = batch()
    pair = Distiller(student, teacher, {}).train().run_pair(images, targets)
    image_list, moved = student.transform(images, targets)
    assert torch.equal(pair.images, image_list.tensors)
    for boxes, labels, want in zip(pair.gt_boxes, pair.gt_labels, moved, strict=True):
        assert torch.equal(boxes, want["boxes"]) and torch.equal(labels, want["labels"])
    with torch.no_grad():
        alone = teacher.forward_batch(image_list.tensors, image_list.image_sizes)
    for got, want in zip(pair.teacher.cls_logits, alone.cls_logits, strict=True):
        assert torch.equal(got, want) and not got.requires_grad
    assert pair.student.cls_logits[0].requires_grad
    assert set(pair.student.losses) == {"classification", "bbox_regression"}
    assert len(pair.student.matched_idxs) == 2
    assert pair.teacher_model is teacher


class TeacherHeadOnStudentFeatures(DistillMethod):
    """A method that needs the pair: the frozen teacher head run on adapted student features."""

    imitates = "outputs"
    taps = (NECK,)

    def forward(self, batch):
        cross, _, _ = batch.teacher_model.head_forward(batch.tapped(NECK))
        return sum(
            (c - t).pow(2).mean() for c, t in zip(cross, batch.teacher.cls_logits, strict=True)
        )


def test_a_method_can_run_the_teacher_head_and_the_teacher_stays_untouched(monkeypatch):
    monkeypatch.setitem(METHODS._items, "cross", TeacherHeadOnStudentFeatures)
    distiller = Distiller(tiny(width=8), tiny(width=16), {"cross": 1.0}).train()
    before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    losses = distiller(*batch())
    assert losses["cross"].item() > 0
    optimizer.zero_grad()
    losses["cross"].backward()
    optimizer.step()
    assert all(p.grad is None for p in distiller.teacher.parameters())
    for key, value in distiller.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    student_grads = [p.grad for p in distiller.student.backbone.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in student_grads)
    adapter_grads = [p.grad for p in distiller.adapters.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in adapter_grads)


def test_adapters_are_built_for_the_declared_taps_only():
    student, teacher = tiny(width=8), tiny(width=16)
    assert list(Distiller(student, teacher, {"rm": 1.0}).adapters) == []
    assert list(Distiller(student, teacher, {"rm": 1.0, "pfi": 1.0}).adapters) == ["neck"]
    both = Distiller(student, teacher, {"pfi": 1.0, "crosskd": 1.0})
    assert list(both.adapters) == ["neck", "tower1"]
    batch_ = both.train().run_pair(*batch())
    assert set(batch_.taps) == {NECK, tower(1)}
    assert [f.shape[1] for f in batch_.tapped(NECK)] == list(teacher.feature_channels)
    with pytest.raises(KeyError, match="no 'tower2' tap in this batch"):
        batch_.tapped(tower(2))


def test_methods_that_disagree_on_the_tower_depth_are_refused(monkeypatch):
    class DeepTower(DistillMethod):
        taps = (tower(2),)

        def forward(self, batch):
            return batch.tapped(tower(2))[0][0].sum()

    monkeypatch.setitem(METHODS._items, "deep", DeepTower)
    with pytest.raises(
        IncompatibleModelsError, match="crosskd before the last 1; deep before the last 2"
    ):
        Distiller(tiny(width=8), tiny(width=16), {"crosskd": 1.0, "deep": 1.0})
