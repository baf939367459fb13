"""benchmarks/method_table.py: the summary arithmetic, option parsing, and resuming a table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY_OVERRIDES

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from method_table import LOCK_FILE, _claim, markdown, parse_options, summarise  # noqa: E402

pytestmark = pytest.mark.slow  # every test here trains or spawns processes


def row(method: str, mAP: float, weights: dict | None = None) -> dict:
    return {"method": method, "mAP": mAP, "AP50": 2 * mAP, "weights": weights or {}}


def test_summary_gain_and_gap_closed_by_hand():
    rows = [row("none", 0.10), row("none", 0.12), row("rm", 0.15, {"rm": 1.0}),
            row("rm", 0.17, {"rm": 1.0})]  # fmt: skip
    teacher = {"mAP": 0.31, "AP50": 0.5}
    table = {t["method"]: t for t in summarise(rows, teacher)}
    assert math.isclose(table["none"]["mAP_mean"], 0.11)
    assert math.isclose(table["rm"]["mAP_std"], math.sqrt(2 * 0.01**2))  # sample std of 0.15, 0.17
    assert math.isclose(table["rm"]["gain"], 0.05)
    assert math.isclose(table["rm"]["gap_closed"], 0.05 / 0.20)
    assert table["rm"]["AP50_mean"] == pytest.approx(0.32)
    text = markdown(list(table.values()), teacher)
    assert "| teacher | | 31.0 | 50.0 |" in text
    assert "| rm | rm 1 | 16.0 ± 1.4 | 32.0 | +5.0 | 25% | 2 |" in text
    assert "| baseline (none) |  | 11.0 ± 1.4 | 22.0 |  |  | 2 |" in text


def test_options_are_typed_per_method():
    assert parse_options("rm.score=prob,pfi.detach_weight=false,rm.temperature=2") == {
        "rm": {"score": "prob", "temperature": 2},
        "pfi": {"detach_weight": False},
    }


def test_a_finished_table_is_not_trained_again(tmp_path):
    sets = [arg for item in TINY_OVERRIDES for arg in ("--set", item)]
    out = tmp_path / "table.json"
    cmd = [sys.executable, str(BENCHMARKS / "method_table.py"), "--preset", "digits",
           "--workdir", str(tmp_path / "runs"), "--methods", "none", "rm-prob", "--weights",
           "rm-prob:rm=1", "--options", "rm-prob:rm.score=prob", "--seeds", "0",
           "--out", str(out), "--set", f"data.root={tmp_path / 'data'}", *sets]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    first = json.loads(out.read_text())
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/model.pt")}
    assert len(stamps) == 3  # teacher, none_s0, rm-prob_s0
    distilled = next(r for r in first["runs"] if r["method"] == "rm-prob")
    assert distilled["options"] == {"rm": {"score": "prob"}}
    saved = yaml.safe_load((tmp_path / "runs" / "rm-prob_s0" / "config.yaml").read_text())
    assert saved["distill"]["method_options"] == {"rm": {"score": "prob"}}

    subprocess.run(cmd, check=True, capture_output=True, env=env)
    second = json.loads(out.read_text())
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert not list((tmp_path / "runs").glob(f"*/{LOCK_FILE}"))  # released after each run
    assert [r["mAP"] for r in second["runs"]] == [r["mAP"] for r in first["runs"]]
    assert (
        out.with_suffix(".png").is_file()
        and "| rm-prob | rm 1 (rm: score=prob) |" in out.with_suffix(".md").read_text()
    )


def test_a_run_held_by_a_live_process_is_not_claimed_and_a_dead_holder_is_taken_over(tmp_path):
    run_dir = tmp_path / "rm_s0"
    assert _claim(run_dir) is None
    assert (run_dir / LOCK_FILE).read_text() == str(os.getpid())
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / LOCK_FILE).write_text(str(holder.pid))
        assert _claim(run_dir) == holder.pid
        assert (run_dir / LOCK_FILE).read_text() == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()
    assert _claim(run_dir) is None  # the holder died: its lock is stale
    assert (run_dir / LOCK_FILE).read_text() == str(os.getpid())
