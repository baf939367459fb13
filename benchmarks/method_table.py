"""The results' method tables: ``detdistill sweep`` on a bundled preset, with named variants.

    python benchmarks/method_table.py --preset digits --workdir runs/method_table
    python benchmarks/method_table.py --preset digits --methods none rm pfi rm+pfi --seeds 0

A thin caller of :mod:`detdistill.sweep` (the library behind ``detdistill
sweep``): the same plan, resumable runs, statistics and report. It adds only
what the recorded tables in ``docs/results.md`` were made with: presets by short
name with their teacher trained in ``--workdir/teacher``, rows by name with the
weights the paper's baselines use (weight 1) or the preset's (``rm``, ``pfi``,
``rm+pfi``), variants (``--weights``, ``--options``, ``--row-set``), every
``--set`` applied to the teacher too, and ``--only-completed``. Writes
``benchmarks/results/<preset>_methods.json`` (the sweep's report with the
command, commit and machine) with its ``.md``, ``.png`` and ``_best.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from _common import environment
from detdistill.sweep import Row, plan_sweep, run_sweep
from detdistill.sweep.execute import completed
from detdistill.sweep.table import write_report

PRESETS = {  # short name -> (teacher preset, distillation preset)
    "digits": ("digits_teacher", "digits_distill"),
    "digits_gfl": ("digits_gfl_teacher", "digits_gfl_distill"),  # the demo's
    "digits_yolo": ("digits_yolo_teacher", "digits_yolo_distill"),
    "shapes": ("shapes_teacher", "shapes_distill"),
    "voc": ("voc_r50", "voc_r50_r18"),
    "coco": ("coco_retinanet_r101", "coco_retinanet_r101_r50"),
}
# The baselines at weight 1 (their papers' usual setting). RM and PFI take their
# weights from the preset's distill section, so the table measures the defaults
# users get; --weights changes any row or adds a variant.
BASELINES = {"none": {}, "kd": {"kd": 1.0}, "fitnet": {"fitnet": 1.0}, "fgfi": {"fgfi": 1.0},
             "defeat": {"defeat": 1.0}, "scorel2": {"scorel2": 1.0}}  # fmt: skip
DEFAULT_METHODS = ["none", "kd", "fitnet", "fgfi", "defeat", "rm", "pfi", "rm+pfi"]


def parse_weights(text: str) -> dict[str, float | str]:
    """``rm=4,pfi=auto`` -> ``{"rm": 4.0, "pfi": "auto"}``."""
    return {
        k: v if v == "auto" else float(v)
        for k, v in (item.split("=") for item in text.split(",") if item)
    }


def parse_options(text: str) -> dict[str, dict[str, object]]:
    """``rm.score=prob,pfi.detach_weight=false`` -> ``{"rm": {"score": "prob"}, "pfi": {...: False}}``."""
    options: dict[str, dict[str, object]] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        method, _, option = key.partition(".")
        options.setdefault(method, {})[option] = yaml.safe_load(value)
    return options


def preset_methods(distill_preset: str) -> dict[str, dict[str, float | str]]:
    """The ``rm``, ``pfi`` and ``rm+pfi`` rows, weighted as the preset distils."""
    from detdistill.engine.presets import load_preset_or_file

    chosen = load_preset_or_file(distill_preset, []).distill.methods
    return {
        "rm": {"rm": chosen["rm"]},
        "pfi": {"pfi": chosen["pfi"]},
        "rm+pfi": {"rm": chosen["rm"], "pfi": chosen["pfi"]},
    }


def rows_of(args: argparse.Namespace, distill_preset: str) -> list[Row]:
    """The table's rows: each name's weights, options and row-only overrides."""
    weights = {name: dict(w) for name, w in BASELINES.items()} | preset_methods(distill_preset)
    for item in args.weights:  # a new name defines a variant, e.g. rm+pfi100:rm=4,pfi=100
        name, _, text = item.partition(":")
        weights[name] = parse_weights(text)
    unknown = sorted(set(args.methods) - set(weights))
    if unknown:
        sys.exit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(weights)}")
    options = {n: parse_options(t) for n, _, t in (o.partition(":") for o in args.options)}
    row_overrides: dict[str, list[str]] = {}
    for item in args.row_overrides:
        name, _, override = item.partition(":")
        row_overrides.setdefault(name, []).append(override)
    return [
        Row(name, weights[name], options.get(name, {}), tuple(row_overrides.get(name, [])))
        for name in args.methods
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=list(PRESETS), default="digits")
    parser.add_argument("--workdir", default="runs/method_table")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                        help="rows to train (default: %(default)s; also scorel2)")  # fmt: skip
    parser.add_argument("--weights", action="append", default=[], metavar="METHOD:NAME=W,...",
                        help="set a method's weights, or define a variant: rm+pfi100:rm=4,pfi=100")  # fmt: skip
    parser.add_argument("--options", action="append", default=[], metavar="NAME:METHOD.KEY=V,...",
                        help="method options of a row, e.g. rm-prob:rm.score=prob (with --weights "
                             "rm-prob:rm=1)")  # fmt: skip
    parser.add_argument("--row-set", dest="row_overrides", action="append", default=[],
                        metavar="NAME:KEY=VALUE", help="config override for one row, e.g. "
                        "pfi-r30:distill.auto_ratio={features: 30, outputs: 0.3} (with --weights pfi-r30:pfi=auto)")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override for every run, the teacher's too")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--only-completed", action="store_true",
                        help="train nothing: tabulate the runs already completed in --workdir "
                             "(rows and seeds without one are left out and listed)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: 1 with --jobs > 1, else all cores)")  # fmt: skip
    parser.add_argument(
        "--out", default=None, help="default: benchmarks/results/<preset>_methods.json"
    )
    args = parser.parse_args()
    teacher_preset, distill_preset = PRESETS[args.preset]
    plan = plan_sweep(
        distill_preset,
        args.overrides,
        rows_of(args, distill_preset),
        args.seeds,
        args.workdir,
        teacher=teacher_preset,
        teacher_overrides=args.overrides,
        parallel=args.jobs > 1,
    )
    if args.threads:
        plan.jobs = [dataclasses.replace(job, threads=args.threads) for job in plan.jobs]
    if args.only_completed:
        if plan.teacher_job is None or not completed(plan.teacher_job.run_dir):
            sys.exit(
                f"{args.workdir}/teacher has no completed teacher; --only-completed trains nothing"
            )
        missing = sorted(job.name for job in plan.jobs if not completed(job.run_dir))
        if missing:
            print(f"left out (not completed): {', '.join(missing)}", file=sys.stderr)
        plan.jobs = [job for job in plan.jobs if completed(job.run_dir)]
    teacher, runs = run_sweep(plan, jobs=args.jobs, say=lambda line: print(line, file=sys.stderr))
    out = Path(args.out or f"benchmarks/results/{args.preset}_methods.json")
    extra = {"benchmark": "method_table", **environment(), "preset": args.preset}
    write_report(plan, teacher, runs, out, extra)
    print(out.with_suffix(".md").read_text())
    print(f"wrote {out} and its .md, .png and _best.yaml", file=sys.stderr)


if __name__ == "__main__":
    main()
