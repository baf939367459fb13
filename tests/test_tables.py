"""The result tables every command prints."""

from __future__ import annotations

import pytest

from detdistill.tables import compare_runs, metrics_table


def test_metrics_table_percentages_gain_and_missing_sizes():
    rows = {
        "student": {
            "mAP": 0.101,
            "AP50": 0.199,
            "AP75": 0.087,
            "APs": 0.104,
            "APm": 0.098,
            "APl": float("nan"),
        },
        "distilled": {
            "mAP": 0.106,
            "AP50": 0.205,
            "AP75": 0.097,
            "APs": 0.11,
            "APm": 0.108,
            "APl": float("nan"),
        },
    }
    lines = metrics_table(rows, baseline="student").splitlines()
    assert lines[0].split() == ["run", "mAP", "AP50", "AP75", "APs", "APm", "APl", "gain"]
    student, distilled = lines[2].split(), lines[3].split()
    assert student == ["student", "10.1", "19.9", "8.7", "10.4", "9.8", "-"]
    assert distilled[1] == "10.6" and distilled[6] == "-" and distilled[7] == "+0.5"


def test_compare_refuses_folders_that_are_not_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        compare_runs([tmp_path])


def test_gain_is_blank_where_a_run_has_no_map():
    """A run whose validation set had no annotations has mAP null: no gain, no crash."""
    rows = {"base": {"mAP": None}, "other": {"mAP": 0.2}, "empty": {}}
    lines = metrics_table(rows, baseline="base").splitlines()[2:]
    assert [line.split()[-1] for line in lines[1:]] == ["-", "-"]
    rows = {"base": {"mAP": 0.1}, "other": {"mAP": None}, "third": {"mAP": 0.25}}
    assert [line.split()[-1] for line in metrics_table(rows, "base").splitlines()[3:]] == [
        "-",
        "+15.0",
    ]
