"""The docs are executed or checked against their sources, so they cannot rot.

The how-to guides and the README's quick start run; the README's demo numbers
and headline tables are rebuilt from the JSON under ``benchmarks/results/``;
every relative link and anchor in README.md and docs/ resolves.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
DEMO_JSON = RESULTS / "demo.json"
DEMO_PRESETS = ("digits_gfl_teacher", "digits_gfl_student", "digits_gfl_distill")

# A number standing on its own: not part of a word, a commit hash or a name (AP50, e1b51f7).
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?!\w)")


def python_blocks(path: Path) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))


def section(text: str, heading: str) -> str:
    """The body of the level-2 section ``## heading``, up to the next level-2 heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def summary(name: str) -> dict[str, dict]:
    return {row["method"]: row for row in json.loads((RESULTS / name).read_text())["summary"]}


@pytest.mark.slow
@pytest.mark.parametrize("guide", ["adding-a-method.md", "adding-a-detector.md"])
def test_guide_runs(guide):
    code = python_blocks(DOCS / guide)
    assert code.strip(), f"{guide} has no python block"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_docs_link_each_other_and_exist():
    readme = README.read_text()
    for name in ("methods.md", "weights.md", "architecture.md", "adding-a-method.md",
                 "adding-a-detector.md", "large-images.md", "yolo.md", "results.md"):  # fmt: skip
        assert (DOCS / name).is_file(), name
    for path in DOCS.glob("*.md"):
        assert f"docs/{path.name}" in readme, f"README does not link docs/{path.name}"


def test_readme_is_one_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; results go to docs/results.md"


# --- links and anchors ------------------------------------------------------------------


def github_anchors(path: Path) -> set[str]:
    """The anchors GitHub makes for the headings of a markdown file (code blocks skipped)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fence = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        if fence or not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", ["README.md", *sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))])
def test_relative_links_and_anchors_resolve(doc):
    source = ROOT / doc
    text = re.sub(r"```.*?```", "", source.read_text(), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        file_part, _, anchor = target.partition("#")
        path = (source.parent / file_part).resolve() if file_part else source
        assert path.exists(), f"{doc}: link to missing {target}"
        if anchor and path.suffix == ".md":
            assert anchor in github_anchors(path), f"{doc}: no heading for #{anchor} in {path.name}"


def test_readme_names_only_modules_that_exist():
    """The package table and examples name importable modules (or their attributes)."""
    for name in sorted(set(re.findall(r"\bdetdistill(?:\.\w+)+", README.read_text()))):
        parent, _, attr = name.rpartition(".")
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            assert hasattr(importlib.import_module(parent), attr), f"README names {name}"


# --- the demo: one JSON for every number -----------------------------------------------


def demo() -> dict:
    return json.loads(DEMO_JSON.read_text())


def demo_table(run: dict) -> str:
    """The table `detdistill demo` prints, from a run in demo.json (values in %)."""
    from detdistill.tables import metrics_table

    rows = {
        name: {k: None if v is None else v / 100 for k, v in metrics.items()}
        for name, metrics in run["rows"].items()
    }
    table = metrics_table(rows, baseline="student")
    gain = (
        f"RM+PFI gain: {run['gain_mAP']:+.1f} mAP ({run['gap_closed_percent']}% of the "
        f"teacher-student gap closed); {run['minutes']['total']} min"
    )
    return "\n".join(line.rstrip() for line in table.splitlines()) + "\n\n" + gain + "\n"


@pytest.mark.parametrize("doc", ["README.md", "docs/results.md"])
def test_demo_table_is_the_one_in_demo_json(doc):
    text = section((ROOT / doc).read_text(), "The demo")
    headline = demo()["headline"]
    assert headline["printed_table"] in blocks(text, ""), f"{doc}: demo table != demo.json"
    assert "benchmarks/results/demo.json" in text


def test_the_printed_demo_table_agrees_with_its_rows():
    """The table as the demo printed it, against one rebuilt from the JSON's rounded rows:
    equal but for the teacher's gain, which the demo takes from unrounded values (+-0.1)."""
    headline = demo()["headline"]
    printed, rebuilt = headline["printed_table"].splitlines(), demo_table(headline).splitlines()
    assert len(printed) == len(rebuilt)
    for got, want in zip(printed, rebuilt, strict=True):
        if got.startswith("teacher"):
            assert got.split()[:-1] == want.split()[:-1]
            assert abs(float(got.split()[-1]) - float(want.split()[-1])) <= 0.1 + 1e-9
        else:
            assert got == want


@pytest.mark.parametrize("doc", ["README.md", "docs/results.md"])
def test_every_number_about_the_demo_is_in_demo_json(doc):
    allowed = set(NUMBER.findall(DEMO_JSON.read_text()))
    text = section((ROOT / doc).read_text(), "The demo")
    stray = sorted(set(NUMBER.findall(text)) - allowed, key=float)
    assert not stray, f"{doc}'s demo section quotes numbers that demo.json does not hold: {stray}"


def test_readme_states_the_measured_demo_time():
    text = section(README.read_text(), "The demo")
    fresh = demo()["fresh_clone"]["minutes"]
    assert f"**{fresh['total']} minutes**" in text
    assert f"{fresh['data_and_teacher']} for the data and the teacher" in text
    assert f"{fresh['students_side_by_side']} for the two" in text
    assert "10-12" not in README.read_text(), "no fresh-clone run took 10-12 minutes"


def test_demo_json_three_seeds_match_their_json():
    seeds = demo()["three_seeds"]
    recipe = json.loads((ROOT / seeds["json"]).read_text())
    assert seeds["teacher_mAP"] == round(100 * recipe["teacher"]["mAP"], 1)
    rows = {row["method"]: row for row in recipe["summary"]}
    for method, row in seeds["rows"].items():
        assert row["mAP_mean"] == round(100 * rows[method]["mAP_mean"], 1), method
        assert row["mAP_std"] == round(100 * rows[method]["mAP_std"], 1), method
        if row["gain"] is not None:
            assert row["gain"] == round(100 * rows[method]["gain"], 1), method
            assert row["gap_closed_percent"] == round(100 * rows[method]["gap_closed"]), method


@pytest.mark.parametrize("preset", DEMO_PRESETS)
def test_demo_presets_cite_demo_json_and_quote_no_times(preset):
    path = ROOT / "src" / "detdistill" / "configs" / f"{preset}.yaml"
    comments = "\n".join(line for line in path.read_text().splitlines() if "#" in line)
    assert "benchmarks/results/demo.json" in comments, f"{preset}.yaml does not cite demo.json"
    assert not re.search(r"\bmin(ute)?s?\b", comments), f"{preset}.yaml quotes a time"


def test_demo_help_cites_demo_results_and_quotes_only_their_numbers():
    from detdistill.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    description = action.choices["demo"].description
    assert "docs/results.md#the-demo" in description or "demo.json" in description
    stray = set(NUMBER.findall(description)) - set(NUMBER.findall(DEMO_JSON.read_text()))
    assert not stray, f"`detdistill demo --help` quotes numbers not in demo.json: {stray}"


# --- the README's headline results, rebuilt from their JSON ----------------------------


def cell(row: dict, scale: float = 100.0) -> str:
    """mean ± std where a row has several seeds, the single run's value otherwise."""
    runs = row.get("runs") or len(row.get("seeds") or [0])
    mean = f"{scale * row['mAP_mean']:.1f}"
    return f"{mean} ± {scale * row['mAP_std']:.1f}" if runs > 1 else mean


def in_table(line: str, text: str) -> bool:
    """Whether a markdown table row is in ``text``, however many spaces its empty cells hold."""
    return re.sub(r" +", " ", line) in re.sub(r" +", " ", text)


def gain(row: dict, scale: float = 100.0) -> str:
    return f"{scale * row['gain']:+.1f}"


def test_readme_retinanet_table_is_its_json():
    table = summary("digits_auto_table.json")
    sweep = json.loads((RESULTS / "digits_sweep.json").read_text())
    guard = {row["row"]: row for row in sweep["rows"]}  # the sweep's rows, by name
    assert sweep["command"].startswith("detdistill sweep digits_distill")
    rows = [  # README label, digits_auto_table.json method, digits_sweep.json row
        ("student alone", "none", "none"),
        ("kd", "kd-auto", None),
        ("fitnet", "fitnet-auto", None),
        ("scorel2", "scorel2-auto", None),
        ("fgfi", "fgfi-auto", "fgfi"),
        ("defeat", "defeat-auto", "defeat"),
        ("rm (top-16)", "rm-topk-auto", None),
        ("pfi", "pfi-r10", "pfi"),
        ("**rm + pfi** (the preset)", "rm-topk+pfi-auto", "rm+pfi"),
    ]
    readme = README.read_text()
    for label, method, guarded in rows:
        row = table[method]
        with_guard = ""
        if guarded:
            with_guard = cell(guard[guarded])
            with_guard += f" ({gain(guard[guarded])})" if guarded != "none" else ""
        line = (
            f"| {label} | {cell(row)} | {gain(row) if method != 'none' else ''} | "
            f"{row['runs']} | {with_guard} |"
        )
        assert in_table(line, readme), f"README row differs from its JSON; expected:\n{line}"


def test_readme_other_detectors_are_their_json():
    readme = README.read_text()
    for label, name in [
        ("GFL", "digits_gfl_auto.json"),
        ("FCOS", "digits_fcos_auto.json"),
        ("ATSS", "digits_atss_auto.json"),
        ("FCOS, pretrained MobileNetV2 teacher", "digits_fcos_mbv2_auto.json"),
    ]:
        rows = summary(name)
        teacher = json.loads((RESULTS / name).read_text())["teacher"]["mAP"]
        rmpfi, defeat = rows["rm+pfi-auto"], rows["defeat-auto"]
        line = (
            f"| {label} | {100 * teacher:.1f} | {cell(rows['none'])} | {cell(rmpfi)} | "
            f"{gain(rmpfi)} | {cell(defeat)} | {gain(defeat)} | `{name}` |"
        )
        assert in_table(line, readme), f"README row differs from its JSON; expected:\n{line}"


def test_readme_yolo_table_is_its_json():
    data = json.loads((RESULTS / "digits_yolo_table.json").read_text())
    rows = {(r["trainer"], r["recipe"], r["method"]): r for r in data["summary"]}
    readme = README.read_text()
    assert f"YOLO11n teacher {100 * data['teacher']['mAP']:.1f} mAP" in readme
    for trainer, label, key in [
        ("detdistill", "student alone", ("detdistill", "sgd", "student alone")),
        ("detdistill", "rm + pfi", ("detdistill", "sgd", "rm+pfi")),
        ("detdistill", "crosskd", ("detdistill", "sgd", "crosskd")),
        ("detdistill", "ld", ("detdistill", "sgd", "ld")),
        ("Ultralytics", "student alone", ("ultralytics", "ultralytics", "ultralytics alone")),
        ("Ultralytics", "its own distillation", ("ultralytics", "ultralytics", "ultralytics distill")),
    ]:  # fmt: skip
        row = rows[key]
        change = gain(row, 1.0) if "alone" not in key[2] else ""
        line = f"| {trainer} | {label} | {cell(row, 1.0)} | {change} | {len(row['seeds'])} |"
        assert in_table(line, readme), f"README YOLO row differs from its JSON; expected:\n{line}"
    assert data["command"].split(" --ours ")[0] in README.read_text()


# --- the README's quick start runs ------------------------------------------------------

# Appended to every `train`/`distill` line of the quick start: the same commands on a few
# images and steps. The doctor's teacher-mAP floor is lowered, since a 2-step teacher has
# none; everything else runs as written.
SMALL = ["--set", "data.num_train=32", "--set", "data.num_val=8", "--set", "train.epochs=1",
         "--set", "train.max_steps=2", "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_readme_quick_start_runs(tmp_path, monkeypatch):
    from PIL import Image

    from detdistill.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("detdistill.engine.doctor.MIN_TEACHER_MAP", 0.0)
    text = section(README.read_text(), "Quick start")
    (commands,) = blocks(text, "bash")
    commands = commands.replace("\\\n", " ")
    ran = []
    for line in commands.splitlines():
        args = shlex.split(line, comments=True)
        if not args:
            continue
        assert args[0] == "detdistill", line
        extra = SMALL if args[1] in ("train", "distill") else []
        assert main(args[1:] + extra) == 0, line
        ran.append(args[1])
    assert {"train", "distill", "eval"} <= set(ran)

    for name in ("a.jpg", "b.png"):  # the files the README's prediction example reads
        Image.new("RGB", (96, 80), (120, 90, 60)).save(tmp_path / name)
    code = "\n".join(blocks(text, "python"))
    assert "Distiller(" in code and "detdistill.load(" in code
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
