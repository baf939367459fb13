"""``detdistill.analysis``: statistics against scipy on hand-made cases, and one end-to-end run."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import tiny_data_dir, train_tiny
from detdistill.analysis import (
    ChannelMapFitter,
    feature_maps,
    fit_channel_map,
    level_correlations,
    pearson_r,
    prediction_maps,
    rank_statistics,
    run_analysis,
    size_class,
    spearman_r,
    summarize,
)
from detdistill.analysis.plots import plot_rank_histograms
from detdistill.data import DataError
from detdistill.distill import IncompatibleModelsError
from detdistill.errors import ConfigError


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ------------------------------------------------------------------ ranks

# instance id -> (teacher scores, student scores); ids are neither contiguous nor sorted.
CASES = {
    7: ([1.0, 2.0, 2.0, 3.0], [0.1, 0.3, 0.2, 0.4]),  # teacher tie
    3: ([5.0, 4.0, 3.0], [1.0, 2.0, 3.0]),  # reversed
    9: ([0.2, 0.9, 0.5, 0.1], [0.2, 0.9, 0.5, 0.1]),  # identical
    11: ([4.0], [-1.0]),  # one candidate
    12: ([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]),  # constant student
    20: ([1.0, 3.0, 3.0], [0.0, 1.0, 2.0]),  # student's best is one of the teacher's tied best
    21: ([3.0, 1.0, 2.0, 0.0], [1.0, 2.0, 3.0, 4.0]),  # partial disagreement
}


def _interleaved(cases):
    """Flat candidate arrays with the instances' candidates interleaved."""
    rows = [(i, t, s) for i, (ts, ss) in cases.items() for t, s in zip(ts, ss, strict=True)]
    order = np.random.default_rng(0).permutation(len(rows))
    ids, t, s = zip(*(rows[k] for k in order), strict=True)
    return np.array(t), np.array(s), np.array(ids)


def test_rank_statistics_match_scipy_per_instance(no_warnings):
    t, s, ids = _interleaved(CASES)
    ranks = rank_statistics(t, s, ids)
    assert ranks.instance_ids.tolist() == sorted(CASES)
    for k, instance in enumerate(ranks.instance_ids.tolist()):
        ts, ss = CASES[instance]
        assert ranks.num_candidates[k] == len(ts)
        if instance in (11, 12):
            assert math.isnan(ranks.spearman[k]) and math.isnan(ranks.kendall[k])
            continue
        assert ranks.spearman[k] == pytest.approx(stats.spearmanr(ts, ss).statistic)
        assert ranks.kendall[k] == pytest.approx(stats.kendalltau(ts, ss).statistic)
    by_id = dict(zip(ranks.instance_ids.tolist(), range(len(ranks)), strict=True))
    assert ranks.spearman[by_id[3]] == pytest.approx(-1.0)
    assert ranks.kendall[by_id[3]] == pytest.approx(-1.0)
    assert ranks.spearman[by_id[9]] == pytest.approx(1.0)
    assert ranks.kendall[by_id[9]] == pytest.approx(1.0)


def test_top1_disagreement_with_ties_and_single_candidates():
    ranks = rank_statistics(*_interleaved(CASES))
    differs = dict(zip(ranks.instance_ids.tolist(), ranks.top1_differs.tolist(), strict=True))
    assert differs == {7: False, 3: True, 9: False, 11: False, 12: False, 20: False, 21: True}
    # Share over the six instances with >= 2 candidates: 2 of 6.
    assert ranks.comparable.sum() == 6
    assert ranks.top1_disagreement() == pytest.approx(2 / 6)


def test_summaries_exclude_undefined_instances(no_warnings):
    ranks = rank_statistics(*_interleaved(CASES))
    defined = [stats.spearmanr(*CASES[i]).statistic for i in sorted(CASES) if i not in (11, 12)]
    summary = summarize(ranks.spearman)
    assert summary["count"] == 5
    assert summary["mean"] == pytest.approx(np.mean(defined))
    assert summary["median"] == pytest.approx(np.median(defined))


def test_no_instances_is_empty_not_a_crash(no_warnings, tmp_path):
    ranks = rank_statistics(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert len(ranks) == 0
    assert math.isnan(ranks.top1_disagreement())
    summary = summarize(ranks.spearman)
    assert summary["count"] == 0 and math.isnan(summary["mean"]) and math.isnan(summary["median"])
    assert plot_rank_histograms(ranks, tmp_path / "hist.png").stat().st_size > 0


def test_rank_statistics_accepts_tensors_and_rejects_bad_shapes():
    t = torch.tensor([0.1, 0.2, 0.3, 0.7, 0.5])
    ranks = rank_statistics(t, -t, torch.tensor([0, 0, 0, 1, 1]))
    assert ranks.spearman.tolist() == pytest.approx([-1.0, -1.0])
    with pytest.raises(ValueError, match="one length"):
        rank_statistics(t, t[:3], torch.tensor([0, 0, 0, 1, 1]))
    with pytest.raises(ValueError, match="finite"):
        rank_statistics(torch.tensor([0.0, math.nan]), torch.zeros(2), torch.zeros(2))


def test_size_class_uses_coco_thresholds():
    assert [size_class(a) for a in (0.0, 32**2 - 1, 32**2, 96**2 - 1, 96**2, 1e9)] == [
        "small",
        "small",
        "medium",
        "medium",
        "large",
        "large",
    ]


# ------------------------------------------------------- correlations, adapter


def test_pearson_and_spearman_helpers_match_scipy(no_warnings):
    gen = np.random.default_rng(1)
    x = gen.normal(size=200)
    y = 0.5 * x + gen.normal(size=200)
    assert pearson_r(x, y) == pytest.approx(stats.pearsonr(x, y).statistic)
    assert spearman_r(torch.tensor(x), torch.tensor(y)) == pytest.approx(
        stats.spearmanr(x, y).statistic
    )
    assert pearson_r(x, 3 * x + 1) == pytest.approx(1.0)
    assert math.isnan(pearson_r(x, np.zeros_like(x)))  # constant: undefined, no warning
    assert math.isnan(pearson_r([1.0], [2.0]))


def test_least_squares_adapter_recovers_a_known_map():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(6, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 4, 5, 7, generator=gen, dtype=torch.float64)
    y = torch.einsum("oc,nchw->nohw", weight, x) + bias[None, :, None, None]
    fitted = fit_channel_map(x.float(), y.float())
    assert torch.allclose(fitted.weight, weight, atol=1e-4)
    assert torch.allclose(fitted.bias, bias, atol=1e-4)
    assert torch.allclose(fitted(x.float()), y.float(), atol=1e-4)
    # Streaming over chunks gives the same solution as one call.
    fitter = ChannelMapFitter(4, 6)
    for n in range(3):
        fitter.update(x[n : n + 1], y[n : n + 1])
    assert torch.allclose(fitter.solve().weight, weight, atol=1e-8)


def test_least_squares_adapter_handles_collinear_channels():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    x = torch.cat([x, x[:, :1]], dim=1)  # channel 3 duplicates channel 0: rank-deficient
    y = x[:, :3] @ torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]], dtype=torch.float64)
    fitted = fit_channel_map(x, y)
    assert torch.isfinite(fitted.weight).all()
    assert torch.allclose(fitted(x), y, atol=1e-8)
    # Minimum-norm: the duplicated channel's weight is split evenly.
    assert torch.allclose(fitted.weight[:, 0], fitted.weight[:, 3], atol=1e-8)
    with pytest.raises(ValueError, match="no locations"):
        ChannelMapFitter(2, 2).solve()


def test_maps_follow_spec_and_are_cropped_to_the_valid_region():
    gen = torch.Generator().manual_seed(2)
    strides, sizes = [8, 16], [(20, 30), (16, 8)]
    z_s = [torch.randn(2, 6, 4, 4, generator=gen), torch.randn(2, 6, 2, 2, generator=gen)]
    z_t = [torch.randn(2, 6, 4, 4, generator=gen), torch.randn(2, 6, 2, 2, generator=gen)]
    p = prediction_maps(z_s, z_t, sizes, strides)
    assert [tuple(m.shape) for m in p[0]] == [(3, 4), (2, 2)]
    assert [tuple(m.shape) for m in p[1]] == [(2, 1), (1, 1)]
    h, w = 1, 2
    expected = ((z_t[0][0, :, h, w].sigmoid() - z_s[0][0, :, h, w].sigmoid()) ** 2).mean()
    assert p[0][0][h, w] == pytest.approx(float(expected))
    f_s = [torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 2, 2, generator=gen)]
    doubled = feature_maps(f_s, [2 * f for f in f_s], [lambda x: x, lambda x: x], sizes, strides)
    assert torch.allclose(doubled[0][0], f_s[0][0, :, :3, :4].pow(2).mean(0))
    rows = level_correlations(doubled, p, strides)
    d0 = torch.cat([doubled[0][0].flatten(), doubled[1][0].flatten()])
    p0 = torch.cat([p[0][0].flatten(), p[1][0].flatten()])
    assert rows[0]["locations"] == 12 + 2
    assert rows[0]["pearson_r"] == pytest.approx(stats.pearsonr(d0, p0).statistic)


# ------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analysis_models")
    teacher = train_tiny(tmp, "teacher")
    student = train_tiny(tmp, "student", "model.backbone_kwargs={width: 2, depth: 1}")
    return teacher, student


def _instances_with_candidates(student_ckpt: Path, num_images: int) -> tuple[int, int]:
    """Independent count: objects of the first images, and those the student's assigner gives anchors."""
    from detdistill.engine.builders import build_datasets, load_detector
    from detdistill.engine.config import config_from_dict

    loaded = load_detector(student_ckpt)
    model = loaded.model.eval()
    cfg = config_from_dict(loaded.payload["config"])
    dataset = build_datasets(cfg.data, train=False).val
    total = with_candidates = 0
    with torch.no_grad():
        for k in range(num_images):
            image, target = dataset[k]
            image_list, targets = model.transform(
                [image], [{"boxes": target["boxes"], "labels": target["labels"]}]
            )
            out = model.forward_batch(image_list.tensors, image_list.image_sizes, targets)
            matched = out.matched_idxs[0]
            total += target["labels"].numel()
            with_candidates += matched[matched >= 0].unique().numel()
    return total, with_candidates


def test_run_analysis_end_to_end(tiny_models, tmp_path):
    teacher, student = tiny_models
    out = tmp_path / "analysis"
    report = run_analysis(teacher, student, out=out, max_images=6, num_visualize=1, batch_size=4)
    assert report == out / "report.md"
    result = json.loads((out / "analysis.json").read_text())
    assert result["images"] == 6

    total, with_candidates = _instances_with_candidates(student, 6)
    ranks = result["rank"]
    assert ranks["instances_total"] == total
    assert len(result["instances"]) == with_candidates == ranks["instances"]
    assert ranks["instances_without_candidates"] == total - with_candidates
    assert sum(ranks["by_size"][s]["instances"] for s in ("small", "medium", "large")) == (
        with_candidates
    )
    rhos = [row["spearman"] for row in result["instances"] if row["spearman"] is not None]
    assert ranks["spearman"]["count"] == len(rhos) > 0
    assert ranks["spearman"]["mean"] == pytest.approx(np.mean(rhos))
    assert ranks["spearman"]["median"] == pytest.approx(np.median(rhos))
    multi = [row for row in result["instances"] if row["num_candidates"] >= 2]
    assert ranks["top1_disagreement"] == pytest.approx(
        np.mean([row["top1_differs"] for row in multi])
    )
    for row in result["instances"]:
        assert row["size"] == size_class(row["area"])
        assert row["num_candidates"] >= 1

    feats = result["features"]
    assert feats["adapter"] == "least squares"  # 16 vs 8 channels
    assert [lv["stride"] for lv in feats["levels"]] == [8, 16, 32]
    assert [lv["locations"] for lv in feats["levels"]] == [6 * 8 * 8, 6 * 4 * 4, 6 * 2 * 2]
    assert all(lv["pearson_r"] is None or -1 <= lv["pearson_r"] <= 1 for lv in feats["levels"])

    text = report.read_text()
    figures = result["figures"]
    assert len(figures["candidates"]) == len(figures["feature_vs_prediction"]) == 1
    for name in [
        figures["rank_histogram"],
        *figures["candidates"],
        *figures["feature_vs_prediction"],
    ]:
        assert (out / name).stat().st_size > 10_000
        assert f"]({name})" in text
    assert f"{ranks['spearman']['mean']:.3f}" in text


def test_identical_models_agree_perfectly(tiny_models, tmp_path):
    """Teacher against itself: same order everywhere, P = D = 0, so no D/P correlation exists."""
    teacher, _ = tiny_models
    out = tmp_path / "self"
    run_analysis(teacher, teacher, out=out, max_images=4, num_visualize=0)
    result = json.loads((out / "analysis.json").read_text())
    defined = [row for row in result["instances"] if row["spearman"] is not None]
    assert defined and all(row["spearman"] == pytest.approx(1.0) for row in defined)
    assert all(row["kendall"] == pytest.approx(1.0) for row in defined)
    assert result["rank"]["top1_disagreement"] in (0.0, None)
    for level in result["features"]["levels"]:
        assert level["mean_D"] == 0.0 and level["mean_P"] == 0.0
        assert level["pearson_r"] is None
    assert result["features"]["adapter"] == "identity"
    assert result["figures"]["candidates"] == []
    assert not list(out.glob("candidates_*.png"))


def test_bad_inputs_raise_one_line_errors(tiny_models, tmp_path):
    teacher, student = tiny_models
    with pytest.raises(ConfigError, match="max_images"):
        run_analysis(teacher, student, out=tmp_path, max_images=0)
    with pytest.raises(FileNotFoundError, match="student checkpoint"):
        run_analysis(teacher, tmp_path / "missing.pt", out=tmp_path)
    with pytest.raises(FileNotFoundError, match="annotation file"):
        run_analysis(teacher, student, data=tmp_path / "nothing.json", out=tmp_path)
    shapes = tiny_data_dir(teacher.parent.parent)
    coco = json.loads((shapes / "val.json").read_text())
    coco["categories"][0]["name"] = "blob"
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps(coco))
    with pytest.raises(DataError, match="blob"):
        run_analysis(teacher, student, data=renamed, images=shapes / "val", out=tmp_path)


def test_incompatible_models_are_refused(tiny_models, tmp_path):
    """A student with other FPN levels (an untrained model.pt is enough to be refused)."""
    from detdistill.engine.builders import build_model
    from detdistill.engine.config import config_from_dict, config_to_dict

    teacher, student = tiny_models
    payload = torch.load(student, weights_only=True)
    cfg = config_from_dict(payload["config"])
    cfg.model.levels = [3, 4]
    model = build_model(cfg.model, cfg.data.image_size)
    other = tmp_path / "two_levels.pt"
    torch.save({**payload, "config": config_to_dict(cfg), "model": model.state_dict()}, other)
    with pytest.raises(IncompatibleModelsError, match="FPN"):
        run_analysis(teacher, other, out=tmp_path)
