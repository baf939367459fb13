"""Checkpoints: atomic writes, weights_only round trips, RNG state, strict loading."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import detdistill
from detdistill.engine import checkpoint as ckpt
from detdistill.engine.checkpoint import (
    capture_rng_state,
    file_sha256,
    load_checkpoint,
    make_weights_payload,
    restore_rng_state,
    save_checkpoint,
)
from detdistill.engine.config import Config, config_from_dict, config_to_dict
from detdistill.errors import CheckpointError, ConfigError
from detdistill.state_dicts import StateDictMismatchError, load_state_dict_strict


def small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def draw() -> tuple[float, float, torch.Tensor, float]:
    return random.random(), float(np.random.rand()), torch.rand(5), random.gauss(0.0, 1.0)


# --- atomic writes --------------------------------------------------------------------


def test_save_creates_parents_and_round_trips(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "a" / "b" / "model.pt", {"x": torch.arange(3), "n": 1})
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["x"], torch.arange(3)) and loaded["n"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left


def test_a_crash_mid_write_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"version": "old", "w": torch.ones(1000)})
    before = path.read_bytes()

    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save({"version": "new", "w": torch.zeros(1000)}, f, *args, **kwargs)
        f.truncate(100)  # part of the new file is on disk ...
        raise OSError("No space left on device")  # ... when the write fails

    monkeypatch.setattr(ckpt.torch, "save", crashing_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"version": "new"})
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert load_checkpoint(path)["version"] == "old"
    assert list(tmp_path.iterdir()) == [path]  # the partial temp file was removed


def test_keyboard_interrupt_mid_write_also_cleans_up(tmp_path: Path, monkeypatch) -> None:
    def interrupted(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "model.pt", {})
    assert list(tmp_path.iterdir()) == []


# --- loading errors -------------------------------------------------------------------


def test_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found") as info:
        load_checkpoint(tmp_path / "none.pt")
    assert str(tmp_path / "none.pt") in str(info.value)
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)


def test_not_a_checkpoint_and_truncated_files_are_clear_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load checkpoint") as info:
        load_checkpoint(text)
    assert str(text) in str(info.value)

    good = save_checkpoint(tmp_path / "good.pt", {"w": torch.randn(10_000)})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_checkpoint(truncated)
    assert str(truncated) in str(info.value)

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_checkpoint(empty)


class Pickled:
    """Not an allowed type under weights_only=True."""


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"obj": Pickled()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path)


def test_non_dict_payload_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(path)


# --- full payloads -------------------------------------------------------------------


def test_full_payload_survives_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.001, total_iters=3),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10),
        ],
        milestones=[3],
    )
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999)
    )
    for _ in range(4):
        loss = model(torch.randn(2, 3, 8, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update_parameters(model)

    cfg = config_from_dict({"distill": {"teacher_checkpoint": "t.pt"}})
    teacher = save_checkpoint(tmp_path / "teacher.pt", {"model": small_model().state_dict()})
    weights = make_weights_payload(
        model.state_dict(),
        config_to_dict(cfg),
        [str(i) for i in range(10)],
        epoch=1,
        step=4,
        metrics={"mAP": 0.5, "AP50": 0.75},
    )
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.state_dict(),
        "rng": capture_rng_state(),
        "epoch": 1,
        "step": 4,
        "teacher": {"path": str(teacher), "sha256": file_sha256(teacher)},
    }
    save_checkpoint(tmp_path / ckpt.WEIGHTS_FILE, weights)
    save_checkpoint(tmp_path / ckpt.STATE_FILE, state)

    loaded = load_checkpoint(tmp_path / ckpt.WEIGHTS_FILE)
    assert loaded["version"] == detdistill.__version__
    assert (loaded["epoch"], loaded["step"]) == (1, 4)
    assert loaded["class_names"] == [str(i) for i in range(10)]
    assert loaded["metrics"] == {"mAP": 0.5, "AP50": 0.75}
    assert config_from_dict(loaded["config"]) == cfg
    plain = small_model()
    load_state_dict_strict(plain, loaded["model"], "student")  # no conversion needed
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value)

    resumed = load_checkpoint(tmp_path / ckpt.STATE_FILE)
    optimizer2 = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    optimizer2.load_state_dict(resumed["optimizer"])
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
    momentum = optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(optimizer2.state_dict()["state"][0]["momentum_buffer"], momentum)
    scheduler2 = torch.optim.lr_scheduler.SequentialLR(
        optimizer2,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer2, start_factor=0.001, total_iters=3),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer2, T_max=10),
        ],
        milestones=[3],
    )
    scheduler2.load_state_dict(resumed["scheduler"])
    assert scheduler2.last_epoch == scheduler.last_epoch
    scaler2 = torch.amp.GradScaler("cpu", enabled=True)
    scaler2.load_state_dict(resumed["scaler"])
    assert scaler2.get_scale() == scaler.get_scale()
    ema2 = torch.optim.swa_utils.AveragedModel(small_model())
    ema2.load_state_dict(resumed["ema"])
    assert int(ema2.n_averaged) == 4
    assert resumed["teacher"]["sha256"] == file_sha256(teacher)

    restore_rng_state(resumed["rng"])
    first = draw()
    restore_rng_state(state["rng"])
    assert_same_draws(first, draw())


# --- RNG -------------------------------------------------------------------------------


def assert_same_draws(a, b) -> None:
    assert a[0] == b[0] and a[1] == b[1] and a[3] == b[3]
    assert torch.equal(a[2], b[2])


def test_rng_restore_reproduces_the_same_numbers(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0.0, 1.0)  # leaves a cached Gaussian in Python's state
    np.random.randn()  # and in NumPy's
    state = capture_rng_state()
    expected = draw()
    assert draw()[0] != expected[0]  # the generators moved on

    restore_rng_state(state)
    assert_same_draws(draw(), expected)

    path = save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    draw()
    restore_rng_state(load_checkpoint(path)["rng"])
    assert_same_draws(draw(), expected)


def test_partial_rng_state_leaves_other_generators_alone() -> None:
    state = capture_rng_state()
    expected_python = random.random()
    torch.manual_seed(123)
    expected_torch = torch.rand(1)
    torch.manual_seed(123)
    restore_rng_state({"python": state["python"]})
    assert random.random() == expected_python
    assert torch.equal(torch.rand(1), expected_torch)


# --- hashing --------------------------------------------------------------------------


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = np.random.default_rng(0).bytes(3 * 1024 + 17)
    path.write_bytes(data)
    assert file_sha256(path, chunk_size=1024) == hashlib.sha256(data).hexdigest()
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert file_sha256(empty) == hashlib.sha256(b"").hexdigest()


# --- strict loading -------------------------------------------------------------------


def test_strict_loader_lists_missing_unexpected_and_shapes() -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(12):  # 24 keys missing ...
        state[f"extra.{i}.weight"] = torch.zeros(1)  # ... 12 unexpected ...
        del state[f"{i}.weight"]
        del state[f"{i}.bias"]
    model2 = nn.Sequential(nn.Linear(4, 4))
    state2 = {"0.weight": torch.zeros(3, 4), "0.bias": torch.zeros(4)}  # ... one bad shape

    with pytest.raises(StateDictMismatchError) as info:
        load_state_dict_strict(model, state, "teacher (runs/t/model.pt)")
    message = str(info.value)
    assert message.startswith("teacher (runs/t/model.pt): the weights do not fit the model")
    assert "missing keys (in the model, not in the weights) (24)" in message
    assert "0.weight" in message and "... and 14 more" in message
    assert "unexpected keys (in the weights, not in the model) (12)" in message
    assert "extra.0.weight" in message and "... and 2 more" in message

    with pytest.raises(StateDictMismatchError, match=r"shape mismatches \(1\)") as info:
        load_state_dict_strict(model2, state2, "student")
    assert "0.weight: checkpoint (3, 4) vs model (4, 4)" in str(info.value)
    assert torch.count_nonzero(model2[0].bias) > 0  # nothing was loaded


def test_strict_loader_hints_at_a_ddp_prefix() -> None:
    model = small_model()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="DDP-wrapped"):
        load_state_dict_strict(small_model(), state, "teacher")


def test_strict_loader_loads_matching_weights() -> None:
    source, target = small_model(), small_model()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    load_state_dict_strict(target, source.state_dict(), "model")
    for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_config_in_payload_is_plain(tmp_path: Path) -> None:
    payload = make_weights_payload({}, config_to_dict(Config()), ["a"], 0, 0)
    path = save_checkpoint(tmp_path / "m.pt", payload)
    assert config_from_dict(load_checkpoint(path)["config"]) == Config()


def test_a_detector_loads_whatever_its_training_sections_say(
    tmp_path: Path, tiny_checkpoint
) -> None:
    """Only ``data`` and ``model`` rebuild a detector: a changed distill schema must not lock it out."""
    from detdistill.engine.builders import load_detector

    payload = load_checkpoint(tiny_checkpoint)
    payload["config"]["distill"] = {"teacher_checkpoint": "t.pt", "auto_ratio": 10.0}
    payload["config"]["train"]["no_longer_a_key"] = 1
    old = save_checkpoint(tmp_path / "old.pt", payload)
    with pytest.raises(ConfigError, match="no_longer_a_key"):
        config_from_dict(payload["config"])
    loaded, reference = load_detector(old), load_detector(tiny_checkpoint)
    assert loaded.image_size == reference.image_size == payload["config"]["data"]["image_size"]
    for (name, a), (_, b) in zip(
        loaded.model.state_dict().items(), reference.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name

    payload["config"]["model"]["num_classes"] = "six"
    with pytest.raises(ConfigError, match="model.num_classes"):
        load_detector(save_checkpoint(tmp_path / "bad.pt", payload))


def test_a_file_that_is_not_a_saved_detector_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    """A run's last_state.pt, or any other torch file, given where a model.pt belongs."""
    from detdistill.cli import main
    from detdistill.engine.builders import load_detector

    state = save_checkpoint(
        tmp_path / "last_state.pt", {"model": {}, "optimizer": {}, "config": {}, "step": 3}
    )
    with pytest.raises(CheckpointError, match=r"has no class_names: last_state.pt is a run's"):
        load_detector(state)
    other = save_checkpoint(tmp_path / "other.pt", {"weights": {}})
    with pytest.raises(CheckpointError, match=r"has no model, config, class_names: it is not"):
        load_detector(other)
    for path in (state, other):
        assert main(["eval", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err


def test_a_weights_file_that_is_not_torch_is_a_checkpoint_error(tmp_path: Path) -> None:
    from detdistill.state_dicts import load_weights_file

    text = tmp_path / "resnet18.pth"
    text.write_text("not weights\n")
    with pytest.raises(CheckpointError, match=r"resnet18.pth is not a PyTorch weights file"):
        load_weights_file(nn.Linear(2, 2), text, "the backbone")
    tensor = save_checkpoint(tmp_path / "tensor.pt", {"x": torch.zeros(1)})
    torch.save(torch.zeros(1), tensor)
    with pytest.raises(CheckpointError, match=r"does not hold a state dict \(found Tensor\)"):
        load_weights_file(nn.Linear(2, 2), tensor, "the backbone")
