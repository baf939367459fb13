"""``auto`` weights: the rule on a hand-made case, on real detectors, in configs and runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from detdistill.distill import Distiller
from detdistill.distill.auto_weights import (
    DEFAULT_RATIOS,
    WeightError,
    choose_weights,
    measure_gradients,
    parse_weight,
)
from detdistill.engine.config import load_config
from detdistill.engine.metrics_log import read_metrics
from detdistill.engine.presets import load_preset_or_file, preset_path
from detdistill.engine.trainer import Trainer, run
from detdistill.errors import ConfigError
from detdistill.losses import list_methods
from test_distill import batch, detector_for, tiny
from test_trainer import TINY


def test_rule_on_a_hand_made_case():
    """Two parameters a, b; every gradient below is worked out by hand.

    Batch 1 at (a, b) = (1, 2), batch 2 at (2, 1) (we move the values between batches):
      L_det = 3a + 4b        grad (3, 4) on {a, b}, (3) on {a} alone
      L_x   = a^2            reaches only a: grad 2a = 2, then 4  -> mean 3
      L_y   = 6a + 8b        grad (6, 8), norm 10 on {a, b}
    auto, ratio 1: w_x = 3 / 3 = 1 (on {a}), w_y = 5 / 10 = 0.5; ratio 2 doubles y's.
    A fixed weight keeps its value and reports the ratio it amounts to.
    """
    a = torch.nn.Parameter(torch.tensor(1.0))
    b = torch.nn.Parameter(torch.tensor(2.0))

    def batches():
        for va, vb in ((1.0, 2.0), (2.0, 1.0)):
            with torch.no_grad():
                a.fill_(va)
                b.fill_(vb)
            yield 3 * a + 4 * b, {"x": a**2, "y": 6 * a + 8 * b}

    measured = measure_gradients([a, b], batches(), ["x", "y"])
    assert measured["x"] == pytest.approx((3.0, 3.0, 1))
    assert measured["y"] == pytest.approx((10.0, 5.0, 2))
    chosen = choose_weights({"x": None, "y": None}, measured, {"x": 1.0, "y": 1.0})
    assert chosen["x"].weight == pytest.approx(1.0) and chosen["x"].auto
    assert chosen["y"].weight == pytest.approx(0.5)
    assert chosen["x"].ratio == pytest.approx(1.0) and chosen["y"].ratio == pytest.approx(1.0)
    doubled = choose_weights({"x": None, "y": None}, measured, {"x": 1.0, "y": 2.0})
    assert doubled["y"].weight == pytest.approx(1.0) and doubled["x"].weight == pytest.approx(1.0)
    fixed = choose_weights({"x": 4.0, "y": None}, measured, {"x": 1.0, "y": 1.0})
    assert fixed["x"].weight == 4.0 and not fixed["x"].auto
    assert fixed["x"].ratio == pytest.approx(4.0 * 3.0 / 3.0)
    assert a.grad is None and b.grad is None  # measured with autograd.grad, nothing accumulated


def test_a_term_without_gradient_cannot_be_auto():
    a = torch.nn.Parameter(torch.tensor(1.0))
    zero = a * 0.0
    measured = measure_gradients([a], iter([(2 * a, {"rm": zero})]), ["rm"])
    with pytest.raises(
        WeightError, match="cannot choose an auto weight for 'rm'.*give it a number"
    ):
        choose_weights({"rm": None}, measured, {"rm": 1.0})


@pytest.mark.parametrize("method", list_methods())
def test_distiller_balance_makes_each_gradient_ratio_the_target(method, one_thread):
    # float64: some terms' gradients at initialisation are ~1e-6, below float32's precision
    detector = detector_for(method)
    distiller = Distiller(tiny(detector, 8), tiny(detector, 16), {method: "auto"}).double()
    distiller.train()
    images, targets = batch()
    images = [image.double() for image in images]
    targets = [{"boxes": t["boxes"].double(), "labels": t["labels"]} for t in targets]
    buffers = {k: v.clone() for k, v in distiller.student.named_buffers()}
    rng = torch.get_rng_state()
    kind = distiller.methods[method].imitates
    target = {"features": 2.0, "outputs": 0.5}[kind]
    chosen = distiller.balance([(images, targets)], {"features": 2.0, "outputs": 0.5})
    weight = chosen[method].weight
    assert distiller.weights[method] == weight and weight > 0 and math.isfinite(weight)
    assert not distiller.needs_balance
    assert all(p.grad is None for p in distiller.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in distiller.student.named_buffers():
        assert torch.equal(v, buffers[k]), k

    # Independent check: the weighted term's gradient over the detection gradient, on the
    # student parameters the term reaches, computed here with plain backward passes.
    params = [p for p in distiller.student.parameters() if p.requires_grad]
    detection, terms = distiller.loss_terms(images, targets)
    sum(detection.values()).backward(retain_graph=True)
    det_grads = [p.grad.clone() if p.grad is not None else None for p in params]
    distiller.zero_grad(set_to_none=True)
    (weight * terms[method]).backward()
    reached = [i for i, p in enumerate(params) if p.grad is not None]
    term_norm = torch.linalg.vector_norm(torch.cat([params[i].grad.flatten() for i in reached]))
    det_norm = torch.linalg.vector_norm(
        torch.cat([det_grads[i].flatten() for i in reached if det_grads[i] is not None])
    )
    assert float(term_norm / det_norm) == pytest.approx(target, rel=1e-6)


def test_forward_before_balance_says_what_to_do():
    distiller = Distiller(tiny(width=8), tiny(width=16), {"rm": "auto", "pfi": 2.0})
    assert distiller.auto_methods == ["rm"]
    with pytest.raises(RuntimeError, match=r"'auto' weight\(s\) of rm are not chosen.*balance"):
        distiller(*batch())


@pytest.mark.parametrize("bad", ["atuo", -1.0, float("nan"), True, None])
def test_bad_weights_are_one_line_errors_naming_the_method(bad):
    with pytest.raises(WeightError, match="weight of method 'pfi' must be a number >= 0 or 'auto'"):
        Distiller(tiny(width=8), tiny(width=16), {"pfi": bad})
    assert parse_weight("rm", "AUTO") is None and parse_weight("rm", 2) == 2.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("distill.methods={rm: atuo}", "distill.methods.rm: expected float or one of 'auto', got str 'atuo' (did you mean 'auto'?)"),
        ("distill.methods.pfi=-2", "distill.methods: weights must be >= 0 or 'auto'"),
        ("distill.auto_ratio={outputs: 0}", "distill.auto_ratio: ratios must be > 0"),
        ("distill.auto_ratio={feature: 3}", "(did you mean 'features'?)"),
    ],
)  # fmt: skip
def test_bad_weights_in_configs_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_preset_or_file("digits_distill", [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_ratio_kinds_are_checked_and_default():
    from detdistill.distill.auto_weights import check_ratios

    assert check_ratios({"outputs": 1}) == {**DEFAULT_RATIOS, "outputs": 1.0}
    with pytest.raises(
        WeightError, match="auto_ratio has no kind.*logits.*kinds are: features, outputs"
    ):
        check_ratios({"logits": 1.0})
    with pytest.raises(WeightError, match="auto_ratio.features must be a finite number > 0"):
        check_ratios({"features": float("inf")})
    assert {m: type(Distiller(tiny(width=8), tiny(width=16), {m: 1.0}).methods[m]).imitates
            for m in ("rm", "kd", "pfi", "fitnet", "crosskd")} == {
        "rm": "outputs", "kd": "outputs", "pfi": "features", "fitnet": "features",
        "crosskd": "features"}  # fmt: skip


def test_config_accepts_auto_next_to_numbers():
    cfg = load_preset_or_file("digits_distill", ["distill.methods={rm: auto, pfi: 3}"])
    assert cfg.distill.methods == {"rm": "auto", "pfi": 3.0}


def tiny_distill_config(tmp_path, methods: str, *extra: str):
    """A tiny teacher trained for one epoch, and a distillation config for a tinier student."""
    common = [*TINY, f"data.root={tmp_path / 'data'}", "train.epochs=1", *extra]
    run(load_config(preset_path("digits_teacher"), [*common, f"output_dir={tmp_path / 't'}"]),
        show_progress=False)  # fmt: skip
    return load_config(
        preset_path("digits_distill"),
        [*common, f"output_dir={tmp_path / 's'}", "model.backbone_kwargs={width: 2, depth: 1}",
         f"distill.teacher_checkpoint={tmp_path / 't' / 'model.pt'}",
         f"distill.methods={methods}", "distill.auto_batches=2"],
    )  # fmt: skip


@pytest.mark.slow
def test_run_records_reuses_and_reports_auto_weights(tmp_path, monkeypatch):
    """Chosen once, written to summary.json, metrics.jsonl and the state; a resume reuses them."""
    cfg = tiny_distill_config(tmp_path, "{rm: auto, pfi: auto}")
    first = Trainer(cfg, show_progress=False)
    original = Trainer.train_step

    def stop_at_step_3(self, images, targets):
        if self.progress.step == 3:
            raise KeyboardInterrupt
        return original(self, images, targets)

    monkeypatch.setattr(Trainer, "train_step", stop_at_step_3)
    assert first.fit().status == "interrupted"
    chosen = dict(first.setup.distiller.weights)
    assert set(chosen) == {"rm", "pfi"} and all(w > 0 for w in chosen.values())
    monkeypatch.setattr(Trainer, "train_step", original)

    resumed = Trainer(cfg, show_progress=False)
    calls = []
    monkeypatch.setattr(resumed.setup.distiller, "balance", lambda *a, **k: calls.append(a))
    resumed.resume()
    assert resumed.setup.distiller.weights == chosen and not resumed.setup.distiller.needs_balance
    assert resumed.fit().status == "completed" and not calls  # not measured again

    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    # The guard may have lowered a weight since: every change is recorded, none rises.
    final = dict(chosen)
    for change in summary["weight_changes"]:
        assert change["to"] < change["from"] == pytest.approx(final[change["method"]])
        final[change["method"]] = change["to"]
    assert summary["distill_weights"] == pytest.approx(final)
    assert summary["balance"]["pfi"]["ratio"] == pytest.approx(DEFAULT_RATIOS["features"], rel=1e-4)
    assert summary["balance"]["rm"]["ratio"] == pytest.approx(DEFAULT_RATIOS["outputs"], rel=1e-4)
    assert summary["balance"]["rm"]["auto"] is True
    records = [r for r in read_metrics(tmp_path / "s") if "distill_weight/rm" in r]
    assert records[0]["distill_weight/rm"] == pytest.approx(chosen["rm"])  # the choice, step 0
    assert all(r["distill_weight/rm"] <= chosen["rm"] * (1 + 1e-9) for r in records)
    assert list((tmp_path / "s" / "tb").iterdir())  # the TensorBoard mirror of the same record


@pytest.mark.slow
def test_doctor_shows_the_weights_training_chooses(tmp_path):
    from detdistill.engine.doctor import run_doctor

    cfg = tiny_distill_config(tmp_path, "{rm: 2.0, pfi: auto}", "train.max_steps=1")
    run(cfg, show_progress=False)
    chosen = json.loads((tmp_path / "s" / "summary.json").read_text())["distill_weights"]
    report = run_doctor(cfg).render()
    assert f"pfi: weight {chosen['pfi']:.4g} (auto)" in report
    assert "rm: weight 2 (fixed); its gradient on the" in report
