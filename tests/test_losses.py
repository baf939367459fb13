"""Each loss against a slow, obvious reference, its edge cases and its gradients."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from detdistill.losses import (
    box_center_masks,
    decoupled_feature_loss,
    feature_imitation_loss,
    fgfi_masks,
    pfi_loss,
    rank_mimicking_loss,
    score_weighted_imitation,
    soft_label_kd_loss,
)

GOLDEN = Path(__file__).parent / "golden" / "losses.json"


# ---------------------------------------------------------------- references


def rm_reference(student, teacher, ids, temperature):
    """One instance at a time, plain softmax and KL."""
    total, count = 0.0, 0
    for instance in sorted(set(ids.tolist())):
        sel = ids == instance
        q_t = torch.softmax(teacher[sel].double() / temperature, 0)
        q_s = torch.softmax(student[sel].double() / temperature, 0)
        total = total + (q_t * (q_t.log() - q_s.log())).sum()
        count += 1
    return total / count


def pfi_reference(fs, ft, zs, zt):
    levels = []
    for f_s, f_t, z_s, z_t in zip(fs, ft, zs, zt, strict=True):
        n, _, h, w = f_s.shape
        acc = 0.0
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    p = (
                        (torch.sigmoid(z_t[i, :, y, x]) - torch.sigmoid(z_s[i, :, y, x])) ** 2
                    ).mean()
                    d = ((f_s[i, :, y, x] - f_t[i, :, y, x]) ** 2).mean()
                    acc = acc + p.detach() * d
        levels.append(acc / (n * h * w))
    return sum(levels) / len(levels)


def random_levels(num_levels, n=2, c=4, ak=6, generator=None, dtype=torch.float32):
    sizes = [(8 >> i or 1, 6 >> i or 1) for i in range(num_levels)]
    make = lambda ch: [torch.randn(n, ch, h, w, generator=generator, dtype=dtype) for h, w in sizes]  # noqa: E731
    return make(c), make(c), make(ak), make(ak)


# ---------------------------------------------------------------- rank mimicking


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_rank_mimicking_matches_loop_reference_values_and_gradients(temperature):
    g = torch.Generator().manual_seed(int(temperature * 10))
    num_candidates = 300
    ids = torch.randint(0, 40, (num_candidates,), generator=g) * 7 + 1000  # sparse, unsorted
    student = torch.randn(num_candidates, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(num_candidates, generator=g, dtype=torch.float64) * 3
    s1 = student.clone().requires_grad_()
    s2 = student.clone().requires_grad_()
    ours = rank_mimicking_loss(s1, teacher, ids, temperature)
    ref = rm_reference(s2, teacher, ids, temperature)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad, atol=1e-5, rtol=1e-4)


def test_rank_mimicking_edge_cases():
    empty = torch.zeros(0, requires_grad=True)
    loss = rank_mimicking_loss(empty, torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert empty.grad is not None

    # a one-candidate instance contributes exactly 0 but is counted in M
    student = torch.tensor([0.3, -2.0, 5.0, 1.0])
    teacher = torch.tensor([1.0, 0.0, 9.0, -3.0])
    ids = torch.tensor([4, 4, 9, 2])
    both = rank_mimicking_loss(student, teacher, ids)
    pair_only = rank_mimicking_loss(student[:2], teacher[:2], ids[:2])
    assert both.item() == pytest.approx(pair_only.item() / 3, rel=1e-6)
    single = rank_mimicking_loss(student[2:3], teacher[2:3], ids[2:3])
    assert single.item() == 0.0

    # hand-worked value: two candidates, teacher (0, ln 3) -> q_t = (1/4, 3/4); student equal -> (1/2, 1/2)
    value = rank_mimicking_loss(
        torch.tensor([0.0, 0.0]), torch.tensor([0.0, math.log(3)]), torch.tensor([7, 7])
    )
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_rank_mimicking_is_zero_for_equal_scores_and_shift_invariant():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(50, generator=g)
    ids = torch.randint(0, 10, (50,), generator=g)
    assert rank_mimicking_loss(scores, scores.clone(), ids).item() == 0.0
    shift = torch.randn(10, generator=g)[ids]  # a constant per instance changes no ranking
    assert rank_mimicking_loss(scores + shift, scores, ids).item() == pytest.approx(0.0, abs=1e-6)


def test_rank_mimicking_extreme_logits_stay_finite_and_teacher_gets_no_gradient():
    student = torch.tensor([100.0, -100.0, 100.0, -100.0], requires_grad=True)
    teacher = torch.tensor([-100.0, 100.0, 100.0, 100.0], requires_grad=True)
    ids = torch.tensor([0, 0, 1, 1])
    loss = rank_mimicking_loss(student, teacher, ids)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 100
    assert torch.isfinite(student.grad).all()
    assert teacher.grad is None


def test_rank_mimicking_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(12, generator=g, dtype=torch.float64)
    ids = torch.tensor([5, 5, 5, 1, 1, 8, 8, 8, 8, 2, 3, 3])
    assert torch.autograd.gradcheck(
        lambda s: rank_mimicking_loss(s, teacher, ids, 0.7).double(), (student,)
    )


def test_rank_mimicking_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        rank_mimicking_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="same shape|share one shape"):
        rank_mimicking_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------- PFI


@pytest.mark.parametrize("num_levels", [1, 2, 3, 4])
def test_pfi_matches_loop_reference(num_levels):
    g = torch.Generator().manual_seed(num_levels)
    fs, ft, zs, zt = random_levels(num_levels, generator=g)
    fs = [f.requires_grad_() for f in fs]
    zs = [z.requires_grad_() for z in zs]
    loss = pfi_loss(fs, ft, zs, zt)
    ref = pfi_reference([f.detach().requires_grad_() for f in fs], ft, zs, zt)
    assert loss.item() == pytest.approx(float(ref.detach()), rel=1e-5)
    loss.backward()
    assert all(z.grad is None for z in zs), "the prediction-difference weight must be detached"
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fs)


def test_pfi_zero_when_equal_and_gradcheck():
    g = torch.Generator().manual_seed(1)
    fs, ft, zs, zt = random_levels(2, generator=g, dtype=torch.float64)
    assert pfi_loss(ft, ft, zs, zt).item() == 0.0
    assert pfi_loss(fs, ft, zt, zt).item() == 0.0
    fs = [f.requires_grad_() for f in fs]
    assert torch.autograd.gradcheck(lambda *f: pfi_loss(list(f), ft, zs, zt).double(), tuple(fs))
    assert torch.autograd.gradcheck(
        lambda *f: pfi_loss(list(f), ft, zs, zt, norm="l2").double(), tuple(fs)
    )


def test_pfi_attached_weight_over_its_mean_has_the_true_gradient():
    """With detach_weight=False the mean P divides by is part of the function too."""
    g = torch.Generator().manual_seed(3)
    fs, ft, zs, zt = random_levels(2, generator=g, dtype=torch.float64)
    zs = [z.requires_grad_() for z in zs]

    def loss(*z):
        return pfi_loss(fs, ft, list(z), zt, detach_weight=False, weight_norm="mean")

    assert torch.autograd.gradcheck(loss, tuple(zs))


def test_pfi_options_l2_and_attached_weight():
    g = torch.Generator().manual_seed(2)
    fs, ft, zs, zt = random_levels(1, generator=g)
    weighted = (torch.sigmoid(zt[0]) - torch.sigmoid(zs[0])).pow(2).mean(1) * (fs[0] - ft[0]).pow(
        2
    ).mean(1)
    l2 = pfi_loss(fs, ft, zs, zt, norm="l2")
    assert l2.item() == pytest.approx((weighted.norm() / weighted.numel()).item(), rel=1e-5)
    z = zs[0].clone().requires_grad_()
    pfi_loss(fs, ft, [z], zt, detach_weight=False).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_pfi_shape_errors_name_the_problem():
    fs, ft, zs, zt = random_levels(2)
    with pytest.raises(ValueError, match="2 levels but teacher_feats has 1"):
        pfi_loss(fs, ft[:1], zs, zt)
    with pytest.raises(ValueError, match="level 1"):
        pfi_loss(fs, [ft[0], ft[1][:, :2]], zs, zt)
    with pytest.raises(ValueError, match="student_logits"):
        pfi_loss(fs, ft, [zs[0], zs[0]], [zt[0], zt[0]])


def test_pfi_large_ak_and_uneven_levels():
    g = torch.Generator().manual_seed(5)
    shapes = [(10, 13), (5, 7), (3, 4)]
    fs = [torch.randn(1, 8, h, w, generator=g) for h, w in shapes]
    ft = [torch.randn(1, 8, h, w, generator=g) for h, w in shapes]
    zs = [torch.randn(1, 200, h, w, generator=g) for h, w in shapes]
    zt = [torch.randn(1, 200, h, w, generator=g) for h, w in shapes]
    expected = (
        sum(
            ((torch.sigmoid(b) - torch.sigmoid(a)).pow(2).mean(1) * (c - d).pow(2).mean(1)).mean()
            for a, b, c, d in zip(zs, zt, fs, ft, strict=True)
        )
        / 3
    )
    assert pfi_loss(fs, ft, zs, zt).item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- baselines


def test_soft_label_kd_matches_loop_and_is_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(2, 30, 5, generator=g, dtype=torch.float64)
    zt = torch.randn(2, 30, 5, generator=g, dtype=torch.float64)
    for temperature in (1.0, 2.0):
        ref = 0.0
        for n in range(2):
            for r in range(30):
                for k in range(5):
                    pt = torch.sigmoid(zt[n, r, k] / temperature)
                    ps = torch.sigmoid(zs[n, r, k] / temperature)
                    ref += pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))
        ref = ref * temperature**2 / 60
        assert soft_label_kd_loss(zs, zt, temperature).item() == pytest.approx(ref.item(), rel=1e-5)
    assert soft_label_kd_loss(zt, zt).item() == pytest.approx(0.0, abs=1e-7)
    zs.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: soft_label_kd_loss(s, zt, 2.0).double(), (zs,))


def test_feature_imitation_fitnet_and_masked_match_loops():
    g = torch.Generator().manual_seed(4)
    fs, ft, _, _ = random_levels(2, generator=g)
    fitnet_ref = sum(((a - b) ** 2).mean() for a, b in zip(fs, ft, strict=True)) / 2
    assert feature_imitation_loss(fs, ft).item() == pytest.approx(fitnet_ref.item(), rel=1e-6)
    masks = [torch.rand(f.shape[0], *f.shape[2:], generator=g) > 0.6 for f in fs]
    total, count = 0.0, 0
    for f_s, f_t, m in zip(fs, ft, masks, strict=True):
        for n, y, x in m.nonzero().tolist():
            total += ((f_s[n, :, y, x] - f_t[n, :, y, x]) ** 2).mean().item()
            count += 1
    assert feature_imitation_loss(fs, ft, masks).item() == pytest.approx(total / count, rel=1e-5)
    empty = [torch.zeros_like(m) for m in masks]
    fs_grad = [f.clone().requires_grad_() for f in fs]
    zero = feature_imitation_loss(fs_grad, ft, empty)
    assert zero.item() == 0.0 and zero.requires_grad
    assert feature_imitation_loss(ft, ft).item() == 0.0
    with pytest.raises(ValueError, match="mask has shape"):
        feature_imitation_loss(fs, ft, [masks[0], masks[0]])


def test_decoupled_feature_loss_is_weighted_fg_plus_bg():
    g = torch.Generator().manual_seed(6)
    fs, ft, _, _ = random_levels(2, generator=g)
    masks = [torch.rand(f.shape[0], *f.shape[2:], generator=g) > 0.5 for f in fs]
    fg = feature_imitation_loss(fs, ft, masks)
    bg = feature_imitation_loss(fs, ft, [~m for m in masks])
    value = decoupled_feature_loss(fs, ft, masks, foreground_weight=2.0, background_weight=0.25)
    assert value.item() == pytest.approx(2.0 * fg.item() + 0.25 * bg.item(), rel=1e-6)


def test_score_weighted_imitation_matches_loop():
    g = torch.Generator().manual_seed(7)
    fs, ft, _, zt = random_levels(2, generator=g)
    levels = []
    for f_s, f_t, z_t in zip(fs, ft, zt, strict=True):
        n, _, h, w = f_s.shape
        acc = 0.0
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    weight = torch.sigmoid(z_t[i, :, y, x]).max()
                    acc += (weight * ((f_s[i, :, y, x] - f_t[i, :, y, x]) ** 2).mean()).item()
        levels.append(acc / (n * h * w))
    assert score_weighted_imitation(fs, ft, zt).item() == pytest.approx(sum(levels) / 2, rel=1e-5)
    assert score_weighted_imitation(ft, ft, zt).item() == 0.0


def test_fgfi_and_box_center_masks_match_loops():
    # one level 4x4, stride 8, two anchors per location (8x8 and 16x16), centred at (8x, 8y)
    h = w = 4
    anchors = []
    for y in range(h):
        for x in range(w):
            for size in (8, 16):
                cx, cy = 8 * x, 8 * y
                anchors.append([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])
    anchors = torch.tensor(anchors)
    gt = torch.tensor([[4.0, 4.0, 20.0, 20.0]])
    mask = fgfi_masks([anchors], [gt], [(h, w)], 2, psi=0.5)[0][0]
    ious = torch.tensor(
        [
            [max(_iou(anchors[(y * w + x) * 2 + a], gt[0]) for a in range(2)) for x in range(w)]
            for y in range(h)
        ]
    )
    assert torch.equal(mask, ious > 0.5 * ious.max())
    centers = box_center_masks([anchors], [gt], [(h, w)], 2)[0][0]
    expected = torch.zeros(h, w, dtype=torch.bool)
    expected[1:3, 1:3] = True  # centres 8 and 16 lie in [4, 20]
    assert torch.equal(centers, expected)
    none = fgfi_masks([anchors], [torch.zeros(0, 4)], [(h, w)], 2)[0]
    assert not none.any()
    with pytest.raises(ValueError, match="do not match levels"):
        fgfi_masks([anchors], [gt], [(h, w)], 3)


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = float(ix * iy)
    area = lambda t: float((t[2] - t[0]) * (t[3] - t[1]))  # noqa: E731
    return inter / (area(a) + area(b) - inter)


# ---------------------------------------------------------------- golden values


def golden_values() -> dict[str, float]:
    g = torch.Generator().manual_seed(2022)
    fs, ft, zs, zt = random_levels(3, generator=g)
    ids = torch.randint(0, 9, (64,), generator=g)
    s = torch.randn(64, generator=g) * 2
    t = torch.randn(64, generator=g) * 2
    masks = [torch.rand(f.shape[0], *f.shape[2:], generator=g) > 0.5 for f in fs]
    return {
        "rm_T1": rank_mimicking_loss(s, t, ids).item(),
        "rm_T2": rank_mimicking_loss(s, t, ids, 2.0).item(),
        "pfi": pfi_loss(fs, ft, zs, zt).item(),
        "pfi_l2": pfi_loss(fs, ft, zs, zt, norm="l2").item(),
        "kd": soft_label_kd_loss(zs[0], zt[0]).item(),
        "fitnet": feature_imitation_loss(fs, ft).item(),
        "masked": feature_imitation_loss(fs, ft, masks).item(),
        "defeat": decoupled_feature_loss(fs, ft, masks, 1.0, 0.5).item(),
        "scorel2": score_weighted_imitation(fs, ft, zt).item(),
    }


def test_golden_values_guard_against_silent_changes():
    values = golden_values()
    if os.environ.get("DETDISTILL_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())
    assert set(values) == set(expected)
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, rel=1e-5), name


# ---------------------------------------------------------------- scale-free forms


def standardize_reference(f):
    """Channel by channel, with Python's statistics over every (n, h, w) value."""
    out = torch.empty_like(f)
    for c in range(f.shape[1]):
        values = f[:, c].flatten().tolist()
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        out[:, c] = (f[:, c] - mean) / math.sqrt(var + 1e-6)
    return out


def scale_free_pfi_reference(fs, ft, zs, zt):
    """P over its level mean times the standardised feature difference, location by location."""
    levels = []
    for f_s, f_t, z_s, z_t in zip(fs, ft, zs, zt, strict=True):
        f_s, f_t = standardize_reference(f_s), standardize_reference(f_t)
        n, _, h, w = f_s.shape
        p = torch.zeros(n, h, w, dtype=f_s.dtype)
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    p[i, y, x] = (
                        (z_t[i, :, y, x].sigmoid() - z_s[i, :, y, x].sigmoid()) ** 2
                    ).mean()
        p = p / p.mean()
        acc = 0.0
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    acc = (
                        acc
                        + p[i, y, x].detach() * ((f_s[i, :, y, x] - f_t[i, :, y, x]) ** 2).mean()
                    )
        levels.append(acc / (n * h * w))
    return sum(levels) / len(levels)


@pytest.mark.parametrize("num_levels", [1, 3])
def test_scale_free_pfi_matches_loop_reference(num_levels):
    g = torch.Generator().manual_seed(10 + num_levels)
    fs, ft, zs, zt = random_levels(num_levels, generator=g, dtype=torch.float64)
    loss = pfi_loss(fs, ft, zs, zt, weight_norm="mean", feature_norm="channel")
    ref = scale_free_pfi_reference(fs, ft, zs, zt)
    assert loss.item() == pytest.approx(float(ref), rel=1e-9)


def test_scale_free_pfi_does_not_depend_on_the_scale_of_features_or_predictions():
    g = torch.Generator().manual_seed(12)
    fs, ft, zs, zt = random_levels(2, generator=g, dtype=torch.float64)
    base = pfi_loss(fs, ft, zs, zt, weight_norm="mean", feature_norm="channel")
    # Teacher activations 1000x larger and shifted, the student's 10x smaller: the paper's
    # form changes by orders of magnitude, the scale-free one only through eps.
    student, teacher = [0.1 * f for f in fs], [1000 * f + 3 for f in ft]
    scaled = pfi_loss(student, teacher, zs, zt, weight_norm="mean", feature_norm="channel")
    assert scaled.item() == pytest.approx(base.item(), rel=1e-3)
    assert pfi_loss(student, teacher, zs, zt).item() > 1e4 * pfi_loss(fs, ft, zs, zt).item()
    # On one level, the relative weight is exactly P over its mean.
    mean_p = ((zt[0].sigmoid() - zs[0].sigmoid()) ** 2).mean()
    relative = pfi_loss(fs[:1], ft[:1], zs[:1], zt[:1], weight_norm="mean")
    assert relative.item() == pytest.approx(
        (pfi_loss(fs[:1], ft[:1], zs[:1], zt[:1]) / mean_p).item(), rel=1e-9
    )


def test_scale_free_pfi_gradcheck_and_zero_cases():
    g = torch.Generator().manual_seed(13)
    fs, ft, zs, zt = random_levels(2, generator=g, dtype=torch.float64)
    assert pfi_loss(ft, ft, zs, zt, weight_norm="mean", feature_norm="channel").item() == 0.0
    assert pfi_loss(fs, ft, zt, zt, weight_norm="mean", feature_norm="channel").item() == 0.0
    fs = [f.requires_grad_() for f in fs]
    assert torch.autograd.gradcheck(
        lambda *f: pfi_loss(list(f), ft, zs, zt, weight_norm="mean", feature_norm="channel"),
        tuple(fs),
    )
    with pytest.raises(ValueError, match="weight_norm must be"):
        pfi_loss(fs, ft, zs, zt, weight_norm="max")
    with pytest.raises(ValueError, match="feature_norm must be"):
        pfi_loss(fs, ft, zs, zt, feature_norm="layer")


def test_standardised_feature_losses_match_loops_and_gradcheck():
    g = torch.Generator().manual_seed(14)
    fs, ft, _, zt = random_levels(2, generator=g, dtype=torch.float64)
    ss, st = [standardize_reference(f) for f in fs], [standardize_reference(f) for f in ft]
    fitnet_ref = sum(((a - b) ** 2).mean() for a, b in zip(ss, st, strict=True)) / 2
    fitnet = feature_imitation_loss(fs, ft, feature_norm="channel")
    assert fitnet.item() == pytest.approx(fitnet_ref.item(), rel=1e-9)
    # averaged over a level, mean_c (x_hat - y_hat)^2 is 2 (1 - Pearson correlation) per channel
    a, b = fs[0], ft[0]
    pearson = torch.stack(
        [
            torch.corrcoef(torch.stack([a[:, c].flatten(), b[:, c].flatten()]))[0, 1]
            for c in range(a.shape[1])
        ]
    )
    level0 = feature_imitation_loss([a], [b], feature_norm="channel")
    assert level0.item() == pytest.approx(float(2 * (1 - pearson).mean()), rel=1e-4)
    masks = [torch.rand(f.shape[0], *f.shape[2:], generator=g) > 0.5 for f in fs]
    assert decoupled_feature_loss(fs, ft, masks, feature_norm="channel").item() == pytest.approx(
        (
            feature_imitation_loss(ss, st, masks)
            + feature_imitation_loss(ss, st, [~m for m in masks])
        ).item(),
        rel=1e-9,
    )
    assert score_weighted_imitation(fs, ft, zt, feature_norm="channel").item() == pytest.approx(
        score_weighted_imitation(ss, st, zt).item(), rel=1e-9
    )
    fs = [f.requires_grad_() for f in fs]
    assert torch.autograd.gradcheck(
        lambda *f: feature_imitation_loss(list(f), ft, feature_norm="channel"), tuple(fs)
    )
