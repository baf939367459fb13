"""Data formats, embedded sets, optimizers and schedules are registries, listed by the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY_OVERRIDES
from detdistill.cli import build_parser, main
from detdistill.data import EMBEDDED_DATASETS, CocoDetection, make_embedded, register_embedded
from detdistill.data.embedded import shapes
from detdistill.engine.builders import (
    DATA_FORMATS,
    LoadedModel,
    build_datasets,
    register_data_format,
)
from detdistill.engine.config import Config, TrainConfig, apply_overrides
from detdistill.engine.evaluate_checkpoint import evaluation_data
from detdistill.engine.optim import OPTIMIZERS, build_optimizer, build_schedule, register_optimizer
from detdistill.engine.schedule import SCHEDULES, lr_factor, register_schedule
from detdistill.errors import ConfigError
from detdistill.registry import Registry


@pytest.fixture
def scratch(monkeypatch):
    """Registrations made by a test are undone after it (the registries are process-wide)."""
    for registry in (DATA_FORMATS, EMBEDDED_DATASETS, OPTIMIZERS, SCHEDULES):
        monkeypatch.setattr(registry, "_items", dict(registry._items))


def test_the_built_in_names():
    assert DATA_FORMATS.names() == ["coco", "embedded", "voc", "yolo"]
    assert EMBEDDED_DATASETS.names() == ["digits", "digits_large", "shapes"]
    assert OPTIMIZERS.names() == ["adamw", "sgd"]
    assert SCHEDULES.names() == ["cosine", "step"]
    for registry in (DATA_FORMATS, EMBEDDED_DATASETS, OPTIMIZERS, SCHEDULES):
        assert isinstance(registry, Registry)


def test_data_make_offers_what_is_registered(scratch, capsys):
    register_embedded("shapes_again", shapes)
    args = build_parser().parse_args(["data", "make", "shapes_again", "--out", "x"])
    assert args.name == "shapes_again"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["data", "make", "mnist", "--out", "x"])
    assert "shapes_again" in capsys.readouterr().err


def test_a_registered_data_format_is_used_by_build_datasets(scratch, tmp_path):
    paths = make_embedded("shapes", tmp_path / "shapes", 4, 2, image_size=64)
    seen = []

    @register_data_format("my_coco")
    def read(data_cfg, train_tf, val_tf, train, class_names):
        seen.append((train, class_names))
        val = CocoDetection(paths["val_images"], paths["val_annotations"], val_tf)
        return CocoDetection(paths["train_images"], paths["train_annotations"], train_tf), val

    cfg = apply_overrides(Config(), ["data.format=my_coco", "data.image_size=64"])
    splits = build_datasets(cfg.data)
    assert seen == [(True, None)] and len(splits.train) == 4 and len(splits.val) == 2
    assert splits.class_names == list(shapes.CLASS_NAMES)


def test_eval_reads_one_path_through_the_formats_own_reader(scratch, tmp_path):
    """`eval --data PATH --format NAME` points the model's data section at PATH with the
    format's ``from_path`` and reads it with the format's reader, a user's format too."""
    paths = make_embedded("shapes", tmp_path / "shapes", 4, 2, image_size=64)
    reads = []

    def from_path(path, images, split):
        return {"val_annotations": str(path), "val_images": str(images), "val_split": split}

    @register_data_format("my_coco", from_path=from_path)
    def read(data_cfg, train_tf, val_tf, train, class_names):
        reads.append((data_cfg.val_annotations, data_cfg.val_split, train, class_names))
        val = CocoDetection(
            data_cfg.val_images, data_cfg.val_annotations, val_tf, class_names=class_names
        )
        return val, val

    @register_data_format("my_generated")
    def generated(data_cfg, train_tf, val_tf, train, class_names):
        raise AssertionError("not read: it has no one-path form")

    names = list(reversed(shapes.CLASS_NAMES))  # the model's order, not the file's
    data = apply_overrides(Config(), ["data.image_size=64"]).data
    loaded = LoadedModel(model=nn.Identity(), class_names=names, payload={}, data=data)
    found = evaluation_data(loaded, paths["val_annotations"], paths["val_images"], "my_coco", "b")
    assert reads == [(str(paths["val_annotations"]), "b", False, names)]
    assert len(found.dataset) == 2 and found.dataset.class_names == names
    assert found.tag == f"{Path(paths['val_annotations']).stem}_b"
    # built-in COCO, no --images: the folder named as the file, as `data make` writes it
    coco = evaluation_data(loaded, paths["val_annotations"], None, "coco")
    assert len(coco.dataset) == 2 and Path(paths["val_images"]).name == "val"
    with pytest.raises(ConfigError, match=r"^--format my_generated: this format is not read"):
        evaluation_data(loaded, paths["val_annotations"], None, "my_generated")
    assert build_parser().parse_args(["eval", "m.pt", "--format", "my_coco"]).format == "my_coco"
    for no_path_form in ("my_generated", "embedded"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["eval", "m.pt", "--format", no_path_form])


def test_build_datasets_names_the_key_of_an_unknown_name(tmp_path):
    cfg = apply_overrides(Config(), ["data.format=darknet"])
    with pytest.raises(ConfigError, match=r"^data.format: unknown data format 'darknet'; "):
        build_datasets(cfg.data)
    cfg = apply_overrides(Config(), ["data.name=mnist", f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^data.name: unknown embedded data set 'mnist'; "):
        build_datasets(cfg.data)
    assert not any(tmp_path.iterdir())  # nothing generated


def reference_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """trainer.py's build_optimizer before the registry, kept here to pin the behaviour."""
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_build_optimizer_is_the_trainers(name):
    params = list(nn.Conv2d(3, 4, 3).parameters())
    cfg = TrainConfig(optimizer=name, lr=0.02, momentum=0.8, weight_decay=1e-3)
    ours, reference = build_optimizer(params, cfg), reference_optimizer(params, cfg)
    assert type(ours) is type(reference)
    assert ours.state_dict() == reference.state_dict()


def test_unknown_optimizer_and_schedule_name_the_key():
    params = list(nn.Linear(2, 2).parameters())
    with pytest.raises(ConfigError, match=r"^train.optimizer: unknown optimizer 'adam'; .*adamw"):
        build_optimizer(params, TrainConfig(optimizer="adam"))
    optimizer = build_optimizer(params, TrainConfig())
    with pytest.raises(ConfigError, match=r"^train.schedule: unknown schedule 'linear'; "):
        build_schedule(optimizer, TrainConfig(schedule="linear"), 10)


def old_lr_factor(schedule, total, per_epoch, warmup, warmup_factor, milestones, gamma, it):
    """The schedule before the registry, kept here to pin the behaviour."""
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * min(it, total) / max(total, 1)))
    else:
        decay = gamma ** sum(it // max(per_epoch, 1) >= m for m in milestones)
    if it < warmup:
        alpha = it / warmup
        decay *= warmup_factor * (1 - alpha) + alpha
    return decay


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_schedules_are_unchanged(schedule):
    cfg = TrainConfig(schedule=schedule, epochs=4, milestones=[2, 3], warmup_iters=7)
    optimizer = build_optimizer(list(nn.Linear(2, 2).parameters()), cfg)
    scheduler = build_schedule(optimizer, cfg, iters_per_epoch=5)
    factor = lr_factor(schedule, 20, 5, 7, cfg.warmup_factor, [2, 3], cfg.gamma)
    for it in range(25):
        expected = old_lr_factor(schedule, 20, 5, 7, cfg.warmup_factor, [2, 3], cfg.gamma, it)
        assert factor(it) == pytest.approx(expected, abs=1e-12)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * expected, abs=1e-12)
        optimizer.step()
        scheduler.step()


def test_plug_in_optimizer_and_schedule(scratch):
    @register_optimizer("plain_sgd")
    def plain(groups, cfg):
        return torch.optim.SGD(groups, lr=cfg.lr)

    @register_schedule("constant")
    def constant(it, plan):
        return 1.0

    cfg = TrainConfig(optimizer="plain_sgd", schedule="constant", warmup_iters=0)
    optimizer = build_optimizer(list(nn.Linear(2, 2).parameters()), cfg)
    scheduler = build_schedule(optimizer, cfg, 3)
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == cfg.lr


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("train.optimizer=adam", ["train.optimizer", "'adam'", "adamw, sgd"]),
        ("train.schedule=linear", ["train.schedule", "cosine, step"]),
        ("data.format=darknet", ["data.format", "coco, embedded, voc, yolo"]),
        ("data.name=mnist", ["data.name", "digits, digits_large, shapes"]),
    ],
)
def test_cli_one_line_errors_before_any_work(override, names, tmp_path, capsys):
    tiny = [arg for item in TINY_OVERRIDES for arg in ("--set", item)]
    code = main(["train", "digits_teacher", *tiny, "--no-progress", "--set", f"data.root={tmp_path}",
                 "--set", f"output_dir={tmp_path / 'run'}", "--set", override])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("detdistill train: error: ")
    for name in names:
        assert name in err, err
    assert not (tmp_path / "run").exists() and not any(tmp_path.iterdir())
