"""run_pair: the one path of a batch through teacher and student, and what methods receive."""

from __future__ import annotations

import pytest
import torch

from detdistill.distill import Distiller
from detdistill.losses import DistillMethod
from detdistill.pair import run_pair
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
    with pytest.raises(ValueError, match=message):
        run_pair(student, teacher, images, targets)
    assert calls == []  # checked before either network ran
    with pytest.raises(ValueError, match=message):
        Distiller(student, teacher, {"fitnet": 1.0})(images, targets)


def test_both_networks_see_one_tensor_and_the_teacher_output_is_detached():
    student, teacher = tiny(width=8).train(), tiny(width=16).eval()
    images, targets = batch()
    pair = run_pair(student, teacher, images, targets)
    image_list, moved = student.transform(images, targets)
    assert torch.equal(pair.images, image_list.tensors)
    for got, want in zip(pair.targets, moved, strict=True):
        assert torch.equal(got["boxes"], want["boxes"])
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

    def forward(self, batch):
        cross, _, _ = batch.teacher_model.head_forward(batch.student_feats)
        return sum(
            (c - t).pow(2).mean() for c, t in zip(cross, batch.teacher.cls_logits, strict=True)
        )


def test_a_method_can_run_the_teacher_head_and_the_teacher_stays_untouched():
    distiller = Distiller(tiny(width=8), tiny(width=16), {"fitnet": 1.0})
    distiller.methods["cross"] = TeacherHeadOnStudentFeatures()
    distiller.weights["cross"] = 1.0
    distiller.train()
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


def test_a_distiller_needs_a_method():
    with pytest.raises(ValueError, match="at least one method"):
        Distiller(tiny(width=8), tiny(width=16), {})
