"""``detdistill sweep``: the table's arithmetic, bad input, an end-to-end sweep, resuming, Ray."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY_OVERRIDES
from detdistill.cli import main
from detdistill.sweep import parse_row, plan_sweep, rank, run_sweep
from detdistill.sweep.execute import LOCK_FILE
from detdistill.sweep.plan import applicable_rows
from detdistill.sweep.table import markdown, summarise, verdict

# The tiny student of conftest, and a teacher of the same size: seconds per run.
TEACHER = [
    "model.num_classes=6",
    "model.backbone_kwargs={width: 4, depth: 1}",
    "train.epochs=1",
    "train.warmup_iters=1",
]


def tiny_args(tmp: Path) -> list[str]:
    sets = [*TINY_OVERRIDES, f"data.root={tmp / 'data'}"]
    return [
        "digits_distill",
        *(arg for item in sets for arg in ("--set", item)),
        "--teacher",
        "digits_teacher",
        *(arg for item in TEACHER for arg in ("--teacher-set", item)),
    ]


def strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"non-strict JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


# --- the table's arithmetic ------------------------------------------------------------


def run(row: str, seed: int, mAP: float, weights: dict | None = None) -> dict:
    return {"row": row, "seed": seed, "metrics": {"mAP": mAP, "AP50": 2 * mAP},
            "chosen_weights": weights}  # fmt: skip


def test_table_mean_std_gain_and_gap_closed_by_hand():
    runs = [
        run("none", 0, 0.10), run("none", 1, 0.12),
        run("rm", 0, 0.15, {"rm": 2.0}), run("rm", 1, 0.17, {"rm": 4.0}),
        run("pfi", 0, 0.16, {"pfi": 10.0}), run("pfi", 1, 0.17, {"pfi": 10.0}),
    ]  # fmt: skip
    table = {t["row"]: t for t in summarise(runs, 0.31, ["none", "rm", "pfi"])}
    assert math.isclose(table["none"]["mAP_mean"], 0.11)
    assert math.isclose(table["rm"]["mAP_std"], math.sqrt(2 * 0.01**2))  # sample std of .15, .17
    assert math.isclose(table["rm"]["gain"], 0.05)
    assert math.isclose(table["rm"]["gap_closed"], 0.05 / 0.20)  # teacher .31 - alone .11
    assert math.isclose(table["pfi"]["gap_closed"], 0.055 / 0.20)
    assert table["rm"]["chosen_weights"] == {"rm": 3.0}  # mean over seeds
    assert table["rm"]["AP50_mean"] == pytest.approx(0.32)

    ranked = rank(list(table.values()))
    assert [t["row"] for t in ranked] == ["pfi", "rm", "none"]
    # pfi - rm = 0.005 < max(std) 0.0141: tied; rm - none = 0.05 > 0.0141: clear
    assert ranked[0]["tied"] and not ranked[1]["tied"] and ranked[2]["tied"] is None
    assert math.isclose(ranked[0]["spread"], math.sqrt(2 * 0.01**2))
    text = verdict(ranked)
    assert "pfi > rm" in text and "rm > none" not in text and "treat them as tied" in text
    lines = markdown(ranked, {"metrics": {"mAP": 0.31, "AP50": 0.5}})
    assert "| | teacher | 31.0 | 50.0 |" in lines
    assert "| 2 | rm | 16.0 ± 1.4 | 32.0 | +5.0 | 25% | rm 3 | 2 |" in lines
    assert "| 3 | none | 11.0 ± 1.4 | 22.0 |  |  |  | 2 |" in lines


def test_one_seed_has_no_spread_and_no_gap_has_no_share():
    table = summarise([run("none", 0, 0.2), run("kd", 0, 0.25)], 0.1, ["none", "kd"])
    assert all(t["mAP_std"] is None for t in table)
    assert table[1]["gap_closed"] is None  # the teacher is below the student: no gap to close
    assert "no spread measured" in verdict(rank(table))


def test_rows_parse_with_auto_or_given_weights():
    assert dict(parse_row("rm+pfi").methods) == {"rm": "auto", "pfi": "auto"}
    assert dict(parse_row("rm=4+pfi").methods) == {"rm": 4.0, "pfi": "auto"}
    assert not parse_row("none").methods


# --- bad input ---------------------------------------------------------------------------


def one_line_error(capsys, argv: list[str], *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("detdistill sweep: error:")
    for needle in needles:
        assert needle in err, err


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    args = ["sweep", *tiny_args(tmp_path), "--workdir", str(tmp_path / "runs")]
    one_line_error(capsys, [*args, "--methods", "rm", "nosuch"], "nosuch", "registered methods")
    # ld distils box-edge distributions: a RetinaNet pair has none (checked before training)
    one_line_error(capsys, [*args, "--methods", "ld"], "ld does not apply to this pair")
    one_line_error(capsys, [*args, "--methods", "rm=x"], "'x'")
    one_line_error(capsys, [*args, "--seeds", "0", "0"], "a seed is listed twice: 0 0")
    one_line_error(capsys, [*args, "--epochs", "0"], "--epochs must be >= 1, got 0")
    missing = tmp_path / "distill.yaml"
    missing.write_text(f"_base_: {Path(__file__).parents[1] / 'configs' / 'digits_distill.yaml'}\n"
                       f"distill: {{teacher_checkpoint: {tmp_path / 'gone.pt'}}}\n")  # fmt: skip
    one_line_error(capsys, ["sweep", str(missing)], "gone.pt", "--teacher")
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_default_rows_are_the_registered_methods_that_fit_the_pair(tmp_path):
    from detdistill.engine.builders import build_model
    from detdistill.engine.presets import load_preset_or_file
    from detdistill.losses import list_methods

    overrides = [*TINY_OVERRIDES, f"data.root={tmp_path}"]
    student = load_preset_or_file("digits_distill", overrides)
    teacher = load_preset_or_file("digits_teacher", overrides)
    rows = applicable_rows(student, build_model(teacher.model, 64, pretrained=False))
    names = [row.name for row in rows]
    assert names[0] == "none" and {"rm", "pfi", "kd", "crosskd"} <= set(names)
    assert "ld" not in names  # GFL heads only
    assert set(names) - {"none"} <= set(list_methods())
    assert all(set(row.methods.values()) == {"auto"} for row in rows[1:])


# --- end to end --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """One tiny sweep: teacher, student alone and rm, two seeds, two processes side by side."""
    tmp = tmp_path_factory.mktemp("sweep")
    workdir = tmp / "runs"
    argv = ["sweep", *tiny_args(tmp), "--methods", "rm", "--seeds", "0", "1", "--jobs", "2",
            "--workdir", str(workdir)]  # fmt: skip
    assert main(argv) == 0
    (tmp / "argv.json").write_text(json.dumps(argv))
    return workdir


@pytest.mark.slow
def test_sweep_writes_the_table_chart_json_and_best_config(swept):
    from detdistill.engine.config import load_config

    report = strict_json(swept / "sweep.json")
    assert {r["row"] for r in report["rows"]} == {"none", "rm"}
    assert sorted(r["name"] for r in report["runs"]) == ["none_s0", "none_s1", "rm_s0", "rm_s1"]
    rm = next(r for r in report["rows"] if r["row"] == "rm")
    assert rm["seeds"] == [0, 1] and rm["chosen_weights"]["rm"] > 0  # what auto chose
    assert report["teacher"]["run_dir"] == str(swept / "teacher")
    assert "best:" in report["verdict"]
    assert (swept / "sweep.png").stat().st_size > 0
    assert "| rank | row |" in (swept / "sweep.md").read_text()
    best = load_config(report["best_config"])  # the user's config, with the best row's methods
    assert best.train.epochs == 1 and best.seed == 0
    assert best.distill is None or dict(best.distill.methods) == {"rm": "auto"}


@pytest.mark.slow
def test_a_resumed_sweep_trains_only_what_is_missing(swept, capsys, monkeypatch):
    argv = json.loads((swept.parent / "argv.json").read_text())
    stamps = {p: p.stat().st_mtime_ns for p in swept.glob("*/model.pt")}
    assert len(stamps) == 5  # teacher and four students
    # As if killed while rm_s1 was starting: its run gone, the dead process's lock left.
    shutil.rmtree(swept / "rm_s1")
    stamps.pop(swept / "rm_s1" / "model.pt")
    (swept / "rm_s1").mkdir()
    (swept / "rm_s1" / LOCK_FILE).write_text(f"{os.uname().nodename} 999999999")
    capsys.readouterr()
    # Resumed with --jobs 1 on a 3-core machine: the run left trains with 3 threads, not 1.
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    threads = torch.get_num_threads()
    jobs = argv.index("--jobs") + 1
    assert main([*argv[:jobs], "1", *argv[jobs + 1 : -1], str(swept)]) == 0
    out = capsys.readouterr().out
    assert "3 finished earlier" in out
    assert "the finished runs trained with 1 thread(s) each, the 1 left will train with 3" in out
    assert torch.get_num_threads() == threads  # the in-process run gave the threads back
    retrained = {p for p in stamps if p.stat().st_mtime_ns != stamps[p]}
    assert retrained == set() and (swept / "rm_s1" / "model.pt").is_file()
    assert not list(swept.glob(f"*/{LOCK_FILE}"))
    report = strict_json(swept / "sweep.json")
    assert {r["name"]: r["threads"] for r in report["runs"]} == {
        "none_s0": 1, "none_s1": 1, "rm_s0": 1, "rm_s1": 3,
    }  # fmt: skip
    assert "The runs trained with 1 and 3 threads" in report["verdict"]


@pytest.mark.slow
def test_a_sweep_on_a_local_ray_instance(swept, tmp_path):
    ray = pytest.importorskip(
        "ray", reason="Ray is an optional extra: pip install 'detdistill[ray]'"
    )
    overrides = [*TINY_OVERRIDES, f"data.root={swept.parent / 'data'}",
                 f"distill.teacher_checkpoint={swept / 'teacher' / 'model.pt'}"]  # fmt: skip
    plan = plan_sweep("digits_distill", overrides, [parse_row("rm")], [0], tmp_path)
    assert plan.teacher_job is None  # the given, trained checkpoint
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        teacher, runs = run_sweep(plan, backend="ray")
    finally:
        ray.shutdown()
    assert teacher is None
    assert sorted(r["name"] for r in runs) == ["none_s0", "rm_s0"]
    # the same runs as the local sweep's seed 0: the same numbers
    local = strict_json(swept / "sweep.json")["runs"]
    for result in runs:
        twin = next(r for r in local if r["name"] == result["name"])
        assert result["metrics"]["mAP"] == pytest.approx(twin["metrics"]["mAP"])
