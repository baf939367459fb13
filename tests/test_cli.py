"""The `detdistill` command as a user meets it: help, one-line errors, and the main flows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detdistill.cli import build_parser, main

COMMANDS = ["demo", "train", "distill", "eval", "compare", "doctor", "data", "presets"]

TINY = [
    "--set", "data.name=shapes",
    "--set", "data.num_train=16",
    "--set", "data.num_val=8",
    "--set", "data.image_size=64",
    "--set", "data.batch_size=4",
    "--set", "data.num_workers=0",
    "--set", "model.num_classes=6",
    "--set", "model.backbone_kwargs={width: 4, depth: 1}",
    "--set", "train.epochs=1",
    "--set", "train.warmup_iters=1",
    "--no-progress",
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_useful_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: detdistill" in out and len(out.splitlines()) > 3


def test_top_level_help_lists_every_command():
    text = build_parser().format_help()
    for command in COMMANDS:
        assert command in text


def test_unknown_config_key_is_one_line_naming_the_key(capsys):
    code = main(["train", "digits_teacher", "--set", "train.lrr=0.1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "train.lrr" in err and "train.lr" in err


def test_wrong_type_and_missing_file_are_one_line_errors(capsys, tmp_path):
    assert main(["train", "digits_teacher", "--set", "train.epochs=ten"]) == 2
    assert "train.epochs" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_train_eval_compare_and_data_make(tmp_path, capsys):
    root = f"data.root={tmp_path / 'data'}"
    for name in ("a", "b"):
        code = main(
            [
                "train",
                "digits_teacher",
                *TINY,
                "--set",
                root,
                "--set",
                f"output_dir={tmp_path / name}",
            ]
        )
        assert code == 0
    out = capsys.readouterr().out
    assert "mAP" in out and "model.pt" in out

    assert main(["eval", str(tmp_path / "a" / "model.pt"), "--per-class"]) == 0
    out = capsys.readouterr().out
    assert "AP50" in out
    written = json.loads((tmp_path / "a" / "metrics_val.json").read_text())
    assert set(written["metrics"]) == {"mAP", "AP50", "AP75", "APs", "APm", "APl"}
    assert len(written["per_class"]) == 6

    shapes = tmp_path / "data" / "shapes"
    assert main(["eval", str(tmp_path / "a" / "model.pt"), "--data", str(shapes / "val.json"),
                 "--images", str(shapes / "val")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "a" / "metrics_val.json").read_text())["images"] == 8

    plot = tmp_path / "curves.png"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "gain" in out and plot.stat().st_size > 1000

    out_dir = tmp_path / "made"
    assert (
        main(
            ["data", "make", "shapes", "--out", str(out_dir), "--num-train", "4", "--num-val", "2"]
        )
        == 0
    )
    assert len(json.loads((out_dir / "train.json").read_text())["images"]) == 4


def test_doctor_flags_an_untrained_teacher(tmp_path, capsys):
    root = f"data.root={tmp_path / 'data'}"
    teacher = tmp_path / "teacher"
    assert main(["train", "digits_teacher", *TINY, "--set", root, "--set", f"output_dir={teacher}",
                 "--set", "train.max_steps=1"]) == 0  # fmt: skip
    capsys.readouterr()
    code = main(["doctor", "digits_distill", *TINY[:-1], "--set", root,
                 "--set", f"distill.teacher_checkpoint={teacher / 'model.pt'}"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 2
    assert "[FAIL] teacher mAP" in out
    assert "teacher weights load strictly" in out
    assert "level 0 (stride 8)" in out
    assert "rm:" in out and "pfi:" in out


def test_distill_refuses_a_config_without_a_teacher(capsys):
    assert main(["distill", "digits_teacher"]) == 2
    assert "distill:" in capsys.readouterr().err


def test_data_make_output_is_listed(tmp_path, capsys):
    main(
        [
            "data",
            "make",
            "digits",
            "--out",
            str(tmp_path / "d"),
            "--num-train",
            "2",
            "--num-val",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "train_annotations" in out and Path(tmp_path / "d" / "val.json").is_file()
