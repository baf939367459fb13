"""The `detdistill` command as a user meets it: help, one-line errors, and the main flows."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES, tiny_data_dir
from detdistill.cli import build_parser, main


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand the parser has, read from the parser (no hand-kept list)."""
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


COMMANDS = sorted(subcommands())

TINY = [*(arg for item in TINY_OVERRIDES for arg in ("--set", item)), "--no-progress"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_documents_every_option(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: detdistill {command}")
    sub = subcommands()[command]
    assert sub.description or sub.format_usage(), command
    for action in sub._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings or [action.metavar or action.dest]
        assert action.help, f"{command} {name[0]} has no help text"
        for flag in name:
            assert flag in out, f"{command} --help does not show {flag}"


def test_demo_help_points_to_the_results_instead_of_quoting_them(capsys):
    """Timings and mAP change with the machine and the code: docs/results.md keeps them."""
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "docs/results.md#the-demo" in out
    description = subcommands()["demo"].description
    assert not re.search(r"\d", description) and "minute" not in out and "mAP" not in out


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


@pytest.mark.slow
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

    shapes = tiny_data_dir(tmp_path / "data")
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_eval_on_a_voc_directory_with_broken_files(tiny_checkpoint, tmp_path, capsys):
    """A VOC copy of the validation scenes, plus a truncated image and a degenerate box."""
    shapes = tiny_data_dir(tiny_checkpoint.parent.parent)
    coco = json.loads((shapes / "val.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    root = tmp_path / "voc"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    ids = []
    for image in coco["images"]:
        stem = Path(image["file_name"]).stem
        ids.append(stem)
        (root / "JPEGImages" / f"{stem}.jpg").write_bytes(
            (shapes / "val" / image["file_name"]).read_bytes()
        )
        objects = "".join(
            f"<object><name>{names[a['category_id']]}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{a['bbox'][0] + 1}</xmin><ymin>{a['bbox'][1] + 1}</ymin>"
            f"<xmax>{a['bbox'][0] + a['bbox'][2]}</xmax><ymax>{a['bbox'][1] + a['bbox'][3]}</ymax>"
            "</bndbox></object>"
            for a in coco["annotations"]
            if a["image_id"] == image["id"]
        )
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{image['width']}</width>"
            f"<height>{image['height']}</height><depth>3</depth></size>{objects}</annotation>"
        )
    # a truncated image, and a zero-width box (VOC pixels 10..9) added to the first scene
    (root / "JPEGImages" / "broken.jpg").write_bytes(
        (root / "JPEGImages" / f"{ids[0]}.jpg").read_bytes()[:200]
    )
    (root / "Annotations" / "broken.xml").write_text(
        "<annotation><filename>broken.jpg</filename><size><width>64</width><height>64</height>"
        "<depth>3</depth></size></annotation>"
    )
    first = root / "Annotations" / f"{ids[0]}.xml"
    degenerate = (
        f"<object><name>{names[1]}</name><difficult>0</difficult><bndbox>"
        "<xmin>10</xmin><ymin>10</ymin><xmax>9</xmax><ymax>30</ymax></bndbox></object>"
    )
    first.write_text(first.read_text().replace("</annotation>", degenerate + "</annotation>"))
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join([*ids, "broken"]) + "\n")

    out = tmp_path / "voc_metrics.json"
    code = main(
        ["eval", str(tiny_checkpoint), "--data", str(root), "--format", "voc", "--out", str(out)]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["metrics"]) == {"mAP", "AP50", "AP75", "APs", "APm", "APl"}
    problems = result["data_problems"]
    assert problems["counts"] == {"unreadable_image": 1, "box_nonpositive_size": 1}
    assert "broken.jpg" in problems["examples"]["unreadable_image"][0]
    assert f"{ids[0]}.xml" in problems["examples"]["box_nonpositive_size"][0]
    assert "error" not in capsys.readouterr().err


@pytest.mark.slow
def test_quick_demo_prints_its_table_and_reuses_the_teacher(tmp_path, capsys, one_thread):
    assert main(["demo", "--quick", "--no-progress", "--workdir", str(tmp_path)]) == 0
    first = capsys.readouterr().out
    assert "training the teacher" in first and "RM+PFI gain:" in first
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["rows"]) == ["teacher", "student", "student + RM + PFI"]
    assert set(results["phase_minutes"]) == {"teacher", "student", "student + RM + PFI"}
    assert results["gain_mAP"] == pytest.approx(
        results["rows"]["student + RM + PFI"]["mAP"] - results["rows"]["student"]["mAP"]
    )
    teacher_weights = (tmp_path / "teacher" / "model.pt").stat().st_mtime_ns

    assert main(["demo", "--quick", "--no-progress", "--workdir", str(tmp_path)]) == 0
    assert "reusing the teacher" in capsys.readouterr().out
    assert (tmp_path / "teacher" / "model.pt").stat().st_mtime_ns == teacher_weights
    assert "teacher" not in json.loads((tmp_path / "results.json").read_text())["phase_minutes"]


@pytest.mark.parametrize(
    ("command", "override", "names"),
    [
        ("train", "model.name=retinanett", ["model.name", "retinanett", "retinanet"]),
        ("train", "data.batch_size=64", ["data.batch_size", "16 images"]),
        ("train", "model.num_classes=5", ["model.num_classes", "6 classes"]),
        ("distill", "distill.methods={rmm: auto}", ["distill.methods", "'rmm'", "crosskd"]),
        ("distill", "distill.methods={}", ["distill.methods is empty", "detdistill train"]),
        ("distill", "distill.method_options={rm: {tempreature: 2}}",
         ["distill.method_options.rm", "tempreature", "temperature"]),
        ("distill", "distill.method_options={pfi: {norm: mean}}",
         ["distill.method_options", "not selected: pfi"]),
    ],
)  # fmt: skip
def test_user_mistakes_are_one_line_errors_before_any_work(
    command, override, names, capsys, tmp_path
):
    preset = "digits_teacher" if command == "train" else "digits_distill"
    extra = ["--set", f"data.root={tmp_path}", "--set", f"output_dir={tmp_path / 'run'}"]
    if command == "distill":  # the methods are checked before the teacher is even looked for
        extra += ["--set", f"distill.teacher_checkpoint={tmp_path / 'missing.pt'}"]
        if "pfi" in override:
            extra += ["--set", "distill.methods={rm: auto}"]
    code = main([command, preset, *TINY, *extra, "--set", override])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"detdistill {command}: error: ")
    for name in names:
        assert name in err, err


def test_a_training_split_without_boxes_is_an_error(tmp_path, capsys):
    data = tiny_data_dir(tmp_path)
    code = main(["train", "digits_teacher", *TINY, "--set", f"data.root={tmp_path}",
                 "--set", f"output_dir={tmp_path / 'run'}", "--set", "train.max_steps=1"])  # fmt: skip
    assert code == 0
    train = json.loads((data / "train.json").read_text())
    train["annotations"] = []
    (tmp_path / "empty.json").write_text(json.dumps(train))
    val = data / "val.json"
    overrides = ["data.format=coco", f"data.train_images={data / 'train'}",
                 f"data.train_annotations={tmp_path / 'empty.json'}",
                 f"data.val_images={data / 'val'}", f"data.val_annotations={val}",
                 f"output_dir={tmp_path / 'run2'}"]  # fmt: skip
    capsys.readouterr()
    code = main(["train", "digits_teacher", *TINY, *(a for o in overrides for a in ("--set", o))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "empty.json" in err and "no boxes at all" in err and "nothing to learn" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["data", "make", "shapes", "--out", "x", "--image-size", "8"], "must be at least 32"),
        (["data", "make", "shapes", "--out", "x", "--num-train", "-2"], "must be at least 1"),
        (["eval", "m.pt", "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["predict", "m.pt", "a.jpg", "--max-detections", "x"], "'x' is not an integer"),
    ],
)
def test_bad_numbers_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_eval_refuses_a_folder_as_out_before_evaluating(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "never_loaded.pt"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {tmp_path} is a folder" in err
