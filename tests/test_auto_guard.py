"""The guard on ``auto`` weights: a term that outgrows its target ratio is lowered back to it."""

from __future__ import annotations

import copy

import pytest
import torch

from detdistill.distill import Distiller
from detdistill.distill.auto_weights import (
    GUARD_EVERY,
    GUARD_TOLERANCE,
    guard_due,
    guard_weights,
    measure_gradients,
)
from test_distill import batch, tiny


def test_guard_schedule():
    due = [s for s in range(1, 1600) if guard_due(s)]
    assert due[:10] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert due[10:] == [2 * GUARD_EVERY, 3 * GUARD_EVERY]  # 500 lies in the powers-of-two range
    assert not guard_due(0)


def test_guard_rule_by_hand():
    # w G_m = 10 * 2 = 20 > 2 * 0.3 * 1: lowered to 0.3 * 1 / 2
    assert guard_weights({"a": 10.0}, {"a": (2.0, 1.0, 5)}, {"a": 0.3}) == {"a": 0.15}
    # w G_m = 0.5 <= 0.6: kept (a weight never rises either)
    assert guard_weights({"a": 10.0}, {"a": (0.05, 1.0, 5)}, {"a": 0.3}) == {}
    assert GUARD_TOLERANCE == 2.0


def pair(method: str):
    teacher = tiny(width=16)
    student = copy.deepcopy(tiny(width=8))
    distiller = Distiller(student, teacher, {method: "auto"}).train()
    distiller.set_weights({method: 1.0})
    return distiller


# Far past any target: PFI's gradient between two random tiny networks is about 1e-13.
@pytest.mark.parametrize(("method", "huge"), [("pfi", 1e15), ("rm", 1e9)])
def test_an_outgrown_weight_is_lowered_to_its_target(method, huge):
    distiller = pair(method)
    distiller.set_weights({method: huge})
    distiller(*batch(), step=1)
    (change,) = distiller.weight_changes
    assert change["method"] == method and change["from"] == huge and change["step"] == 1
    assert distiller.weights[method] == change["to"] < huge
    # measured again on the same batch: exactly the target ratio now
    detection, terms = distiller.loss_terms(*batch())
    params = [p for p in distiller.student.parameters() if p.requires_grad]
    grad, det, _ = measure_gradients(params, [(sum(detection.values()), terms)], [method])[method]
    target = distiller.auto_ratios[method]
    assert distiller.weights[method] * grad / det == pytest.approx(target, rel=1e-4)


def test_a_run_the_guard_leaves_alone_is_unchanged():
    """Checks touch no .grad, buffer or random state: same losses and gradients."""
    grads = []
    for step in (1, None):
        distiller = pair("pfi")
        distiller.set_weights({"pfi": 1e-6})  # far below its target: never lowered
        losses = distiller(*batch(), step=step)
        sum(losses.values()).backward()
        grads.append(
            [p.grad.clone() for p in distiller.trainable_parameters() if p.grad is not None]
        )
        assert distiller.weight_changes == []
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_a_fast_runaway_is_caught_between_scheduled_checks():
    distiller = pair("pfi")
    distiller(*batch(), step=3)  # not a scheduled step: sets the watch's reference
    assert distiller.weight_changes == [] and "pfi" in distiller.guard_reference
    distiller.set_weights({"pfi": 1e15})  # the weighted loss grew far past GUARD_GROWTH
    distiller(*batch(), step=5)  # not a scheduled step either
    assert [c["step"] for c in distiller.weight_changes] == [5]
