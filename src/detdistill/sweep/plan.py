"""Which runs a sweep trains, and with which configs, decided before anything trains.

A sweep starts from a distillation config (preset or YAML). The student alone
is that config without its ``distill`` section (the presets' convention: a
``*_distill`` preset is its student preset plus ``distill``), so every row
differs from the others only in its distillation terms and seed. Every name is
checked here, and every method is tried on the pair's architectures (an
untrained teacher when it is still to be trained), so that a typo or a method
the pair cannot use costs one line, not a trained teacher.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from detdistill.engine.config import Config, apply_overrides, config_to_dict, parse_override
from detdistill.engine.presets import PRESET_DIR, list_presets, load_preset_or_file
from detdistill.errors import DetDistillError

__all__ = [
    "NONE",
    "Job",
    "Row",
    "SweepError",
    "SweepPlan",
    "applicable_rows",
    "parse_row",
    "plan_sweep",
    "row_config",
]

#: The row of the student trained alone: the baseline every gain is measured against.
NONE = "none"
#: Config keys of the sweep's ``--set`` that the teacher takes too: the teacher must see
#: the same data as its students; model and schedule overrides are the student's.
TEACHER_SHARED_KEYS = ("data", "device")


class SweepError(DetDistillError, ValueError):
    """A sweep that cannot run as asked (bad method list, no teacher to use or train)."""


@dataclass(frozen=True)
class Row:
    """One row of the table: the student with these distillation terms (none: alone).

    ``overrides`` are config overrides of this row only (e.g.
    ``distill.auto_guard=false`` for a variant); ``options`` are the methods'
    keyword options (``distill.method_options``).
    """

    name: str
    methods: Mapping[str, float | str] = field(default_factory=dict)
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Job:
    """One training run: its directory name, table row, seed and full config (plain data).

    The config travels as a plain dict so that a job pickles to any worker
    process or Ray node unchanged.
    """

    name: str
    row: str
    seed: int
    config: dict[str, Any]
    threads: int = 1

    @property
    def run_dir(self) -> Path:
        return Path(self.config["output_dir"])


@dataclass
class SweepPlan:
    """The teacher run (None when a trained checkpoint is used), the student runs, the rows."""

    workdir: Path
    teacher_checkpoint: Path
    teacher_job: Job | None
    jobs: list[Job]
    rows: list[Row]
    seeds: list[int]
    base: Config  # the user's config with --set applied: what the best row's config starts from


def parse_row(spec: str) -> Row:
    """``rm`` / ``rm+pfi`` / ``rm=4+pfi`` -> a :class:`Row` (weights ``auto`` unless given).

    ``none`` is the student alone. Method names are checked against the
    registry: an unknown name is one line listing the registered ones.
    """
    from detdistill.losses import list_methods

    if spec == NONE:
        return Row(NONE)
    methods: dict[str, float | str] = {}
    for part in spec.split("+"):
        name, sep, weight = part.partition("=")
        if not name or name == NONE:
            raise SweepError(f"bad method {spec!r}: expected e.g. rm, rm+pfi or rm=4+pfi=auto")
        if name not in list_methods():
            raise SweepError(
                f"unknown distillation method {name!r}; registered methods: "
                f"{', '.join(list_methods())} (and none: the student alone)"
            )
        try:
            methods[name] = "auto" if not sep or weight == "auto" else float(weight)
        except ValueError:
            raise SweepError(
                f"bad weight in {spec!r}: {weight!r} is not a number or auto"
            ) from None
    return Row(spec, methods)


def _teacher_preset_for(checkpoint: str) -> str | None:
    """The bundled preset whose run writes ``checkpoint`` (``runs/X/model.pt`` <- preset X)."""
    import yaml

    wanted = Path(checkpoint)
    for name in list_presets():
        text = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text()) or {}
        output = text.get("output_dir")
        if output and "distill" not in text and Path(output) / "model.pt" == wanted:
            return name
    return None


def _shared_with_teacher(overrides: Sequence[str]) -> list[str]:
    return [o for o in overrides if parse_override(o)[0].split(".")[0] in TEACHER_SHARED_KEYS]


def _teacher(
    cfg: Config,
    overrides: Sequence[str],
    teacher: str | None,
    teacher_overrides: Sequence[str],
    workdir: Path,
) -> tuple[Config | None, Path]:
    """The teacher's config when it must be trained (else None) and its checkpoint path.

    An explicit ``teacher`` config is trained in the workdir; otherwise an
    existing ``distill.teacher_checkpoint`` is used as it is; otherwise the
    bundled preset that writes that checkpoint is trained in the workdir.
    """
    assert cfg.distill is not None
    given = cfg.distill.teacher_checkpoint
    if teacher is None and Path(given).is_file():
        return None, Path(given)
    if teacher is None:
        teacher = _teacher_preset_for(given)
        if teacher is None:
            raise SweepError(
                f"distill.teacher_checkpoint {given} does not exist and no bundled preset "
                "writes it: give the teacher's config with --teacher to train it"
            )
    out = workdir / "teacher"
    teacher_cfg = load_preset_or_file(
        teacher, [*_shared_with_teacher(overrides), *teacher_overrides, f"output_dir={out}"]
    )
    if teacher_cfg.distill is not None:
        raise SweepError(f"the teacher config {teacher} has a distill section: give a plain one")
    return teacher_cfg, out / "model.pt"


def _check_rows(rows: Sequence[Row], student_cfg: Config, teacher: nn.Module) -> None:
    """Build each row's Distiller on the pair's architectures: a misfit is one line now."""
    from detdistill.distill import Distiller
    from detdistill.engine.builders import build_model

    student = build_model(student_cfg.model, student_cfg.data.model_input_size, pretrained=False)
    for row in rows:
        if not row.methods:
            continue
        try:
            Distiller(student, teacher, row.methods, row.options)
        except (DetDistillError, ValueError, TypeError) as exc:
            raise SweepError(f"method {row.name} does not apply to this pair: {exc}") from None


def applicable_rows(student_cfg: Config, teacher: nn.Module) -> list[Row]:
    """Every registered method, alone at ``auto``, that the pair can use (the default rows)."""
    from detdistill.distill import Distiller
    from detdistill.engine.builders import build_model
    from detdistill.losses import list_methods

    student = build_model(student_cfg.model, student_cfg.data.model_input_size, pretrained=False)
    rows = [Row(NONE)]
    for name in list_methods():
        try:
            Distiller(student, teacher, {name: "auto"})
        except (DetDistillError, ValueError):
            continue  # e.g. ld without box-edge distributions, crosskd without towers
        rows.append(Row(name, {name: "auto"}))
    return rows


def _teacher_model(student_cfg: Config, teacher_cfg: Config | None, checkpoint: Path) -> nn.Module:
    """The trained teacher, or one built untrained from its config: a method's fit to the pair
    depends on the architectures only, so it is known before the teacher trains."""
    from detdistill.engine.builders import build_model, load_detector

    if teacher_cfg is None:
        assert student_cfg.distill is not None
        return load_detector(checkpoint, student_cfg.distill.teacher_model).model
    return build_model(teacher_cfg.model, teacher_cfg.data.model_input_size, pretrained=False)


def _distill_overrides(row: Row) -> list[str]:
    """The overrides that give a config ``row``'s distillation terms."""
    if not row.methods:
        return list(row.overrides)
    options = {name: dict(value) for name, value in row.options.items()}
    return [
        f"distill.methods={json.dumps(dict(row.methods))}",
        f"distill.method_options={json.dumps(options)}",
        *row.overrides,
    ]


def plan_sweep(
    config: str,
    overrides: Sequence[str] = (),
    rows: Sequence[Row] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    workdir: str | Path = "runs/sweep",
    teacher: str | None = None,
    teacher_overrides: Sequence[str] = (),
    epochs: int | None = None,
    parallel: bool = True,
) -> SweepPlan:
    """The runs of a sweep of ``config`` (a distillation preset or YAML) under ``workdir``.

    ``rows`` default to every registered method that applies to the pair, each
    at ``auto``; the student alone is always a row; ``epochs`` shortens the students'
    schedule (a quick ranking; the teacher keeps its own). Students evaluate
    after their last epoch only: the table needs final metrics. ``parallel``
    runs students one thread each (they train side by side).
    """
    import os

    workdir = Path(workdir)
    probe = load_preset_or_file(config, overrides)
    if probe.distill is None:
        raise SweepError(f"{config} has no distill section: sweep a distillation config")
    teacher_cfg, checkpoint = _teacher(probe, overrides, teacher, teacher_overrides, workdir)
    base = apply_overrides(probe, [f"distill.teacher_checkpoint={checkpoint}"])
    teacher_model = _teacher_model(base, teacher_cfg, checkpoint)
    if rows is None:
        rows = applicable_rows(base, teacher_model)
    else:  # the student alone always: every gain is measured against it
        rows = [Row(NONE), *rows] if NONE not in (row.name for row in rows) else list(rows)
        names = [row.name for row in rows]
        if len(set(names)) != len(names):
            raise SweepError(f"a row is listed twice: {', '.join(names)}")
        _check_rows(rows, base, teacher_model)
    if not seeds:
        raise SweepError("no seeds: give at least one, e.g. --seeds 0 1 2")
    if len(set(seeds)) != len(seeds):  # one run counted twice would fake a spread of 0
        raise SweepError(f"a seed is listed twice: {' '.join(map(str, seeds))}")
    if epochs is not None and epochs < 1:
        raise SweepError(f"--epochs must be >= 1, got {epochs}")
    schedule = ["train.eval_interval=0", *([f"train.epochs={epochs}"] if epochs else [])]
    threads = 1 if parallel else (os.cpu_count() or 1)
    jobs = []
    for row in rows:
        for seed in seeds:
            name = f"{row.name}_s{seed}"
            run = [*schedule, f"output_dir={workdir / name}", f"seed={seed}"]
            cfg = apply_overrides(base, [*run, *_distill_overrides(row)])
            if not row.methods:
                cfg = dataclasses.replace(cfg, distill=None)
            jobs.append(Job(name, row.name, seed, config_to_dict(cfg), threads))
    teacher_job = None
    if teacher_cfg is not None:
        config = config_to_dict(teacher_cfg)
        teacher_job = Job("teacher", "teacher", teacher_cfg.seed, config, os.cpu_count() or 1)
    return SweepPlan(workdir, checkpoint, teacher_job, jobs, rows, list(seeds), base)


def row_config(plan: SweepPlan, row: Row) -> Config:
    """The user's config with ``row``'s distillation: the config to train the chosen row with.

    The sweep's own settings (seed, short schedule, run directory) are left out.
    """
    cfg = apply_overrides(plan.base, _distill_overrides(row))
    return cfg if row.methods else dataclasses.replace(cfg, distill=None)
