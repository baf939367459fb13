"""benchmarks/method_table.py, a thin caller of detdistill.sweep: its rows, and resuming a table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY_OVERRIDES

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from method_table import parse_options, rows_of  # noqa: E402

pytestmark = pytest.mark.slow  # every test here trains or spawns processes


def test_options_are_typed_per_method():
    assert parse_options("rm.score=prob,pfi.detach_weight=false,rm.temperature=2") == {
        "rm": {"score": "prob", "temperature": 2},
        "pfi": {"detach_weight": False},
    }


def test_a_table_trains_its_rows_through_the_sweep(tmp_path):
    sets = [arg for item in TINY_OVERRIDES for arg in ("--set", item)]
    out = tmp_path / "table.json"
    cmd = [sys.executable, str(BENCHMARKS / "method_table.py"), "--preset", "digits",
           "--workdir", str(tmp_path / "runs"), "--methods", "none", "rm-prob", "--weights",
           "rm-prob:rm=1", "--options", "rm-prob:rm.score=prob", "--seeds", "0",
           "--out", str(out), "--set", f"data.root={tmp_path / 'data'}", *sets]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    table = json.loads(out.read_text())
    assert len(list((tmp_path / "runs").glob("*/model.pt"))) == 3  # teacher, none_s0, rm-prob_s0
    assert [r["row"] for r in table["runs"]] == ["none", "rm-prob"]
    assert table["benchmark"] == "method_table" and "commit" in table
    saved = yaml.safe_load((tmp_path / "runs" / "rm-prob_s0" / "config.yaml").read_text())
    assert saved["distill"]["method_options"] == {"rm": {"score": "prob"}}
    assert saved["distill"]["methods"] == {"rm": 1.0}
    assert out.with_suffix(".png").is_file() and "rm-prob" in out.with_suffix(".md").read_text()
    # Resuming is the sweep's (tests/test_sweep.py): this caller adds no runner of its own.


def test_rows_take_the_presets_weights_variants_options_and_row_overrides():
    import argparse

    args = argparse.Namespace(
        methods=["none", "fgfi", "rm+pfi", "pfi-r30"],
        weights=["pfi-r30:pfi=auto"],
        options=["pfi-r30:pfi.feature_norm=channel"],
        row_overrides=["pfi-r30:distill.auto_guard=false"],
    )
    rows = {row.name: row for row in rows_of(args, "digits_distill")}
    assert rows["none"].methods == {} and rows["fgfi"].methods == {"fgfi": 1.0}
    assert rows["rm+pfi"].methods == {"rm": "auto", "pfi": "auto"}  # the preset's weights
    assert rows["pfi-r30"].methods == {"pfi": "auto"}
    assert rows["pfi-r30"].options == {"pfi": {"feature_norm": "channel"}}
    assert rows["pfi-r30"].overrides == ("distill.auto_guard=false",)
