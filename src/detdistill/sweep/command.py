"""``detdistill sweep CONFIG``: which method for this pair and data, in one command.

Kept beside the sweep rather than in ``cli.py`` so that the command line only
wires it in (``add_parser``); the handler prints the table and the verdict and
leaves the rest in the workdir.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "run_command"]

DESCRIPTION = (
    "Trains the teacher once (or uses distill.teacher_checkpoint when that file exists), the "
    "student alone, and the student with each method over --seeds, side by side (one thread "
    "per run on CPU, one GPU per run), or on a Ray cluster with --backend ray. Prints the "
    "table (mAP mean ± std over seeds, gain over the student alone, share of the "
    "teacher-student gap closed, the weights auto chose) and which adjacent rows are within "
    "the seed spread; writes sweep.json, .md, .png and sweep_best.yaml (the best row's config) "
    "to --workdir. Resumable: finished runs are read, not trained again; a killed sweep "
    "started again continues. See docs/sweep.md."
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sweep`` to the ``detdistill`` subcommands (one entry of ``cli.COMMANDS``)."""
    p = subparsers.add_parser(
        "sweep",
        help="rank the distillation methods on your data: teacher, student alone, each method, seeds",
        description=DESCRIPTION,
    )
    p.add_argument("config", help="a distillation config: YAML file or preset name")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override for every student run (data.* and device also for a teacher trained here)",
    )  # fmt: skip
    p.add_argument(
        "--methods", nargs="+", default=None, metavar="METHOD",
        help="rows: none, a method (auto weight), rm+pfi (together), rm=4+pfi (given weights) "
        "(default: none and every registered method that applies to the pair)",
    )  # fmt: skip
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds per row (default: 0 1 2)"
    )
    p.add_argument(
        "--epochs", type=int, default=None,
        help="the students' epochs: a shorter schedule ranks quickly (default: the config's)",
    )  # fmt: skip
    p.add_argument(
        "--teacher", default=None, metavar="CONFIG",
        help="train this teacher config in the workdir (default: the existing "
        "distill.teacher_checkpoint, else the bundled preset that writes it)",
    )  # fmt: skip
    p.add_argument(
        "--teacher-set", dest="teacher_overrides", action="append", default=[],
        metavar="KEY=VALUE", help="override of the teacher's config (when it is trained here)",
    )  # fmt: skip
    p.add_argument(
        "--workdir", default=None,
        help="runs and results (default: runs/sweep_<config name>)",
    )  # fmt: skip
    p.add_argument(
        "--backend", choices=["local", "ray"], default="local",
        help="local: processes on this machine; ray: tasks on a Ray cluster (extra: ray)",
    )  # fmt: skip
    p.add_argument(
        "--jobs", type=int, default=None,
        help="local runs side by side (default: one per GPU, else one per CPU core)",
    )  # fmt: skip
    p.add_argument(
        "--ray-address", default=None,
        help="the cluster for --backend ray, e.g. ray://head:10001 or auto (default: "
        "RAY_ADDRESS, else a local Ray instance)",
    )  # fmt: skip
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    """Plan (all checks first), train or read every run, write and print the table."""
    from detdistill.engine.config import import_modules
    from detdistill.engine.presets import load_preset_or_file
    from detdistill.sweep.execute import run_sweep
    from detdistill.sweep.plan import parse_row, plan_sweep
    from detdistill.sweep.table import markdown, write_report

    if args.jobs is not None and args.jobs < 1:
        from detdistill.sweep.plan import SweepError

        raise SweepError(f"--jobs must be >= 1, got {args.jobs}")
    workdir = Path(args.workdir or f"runs/sweep_{Path(args.config).stem}")
    # The config's own modules (imports:) first: a row may name a method one registers.
    import_modules(load_preset_or_file(args.config, args.overrides).imports)
    rows = None if args.methods is None else [parse_row(m) for m in args.methods]
    plan = plan_sweep(
        args.config,
        args.overrides,
        rows,
        args.seeds,
        workdir,
        teacher=args.teacher,
        teacher_overrides=args.teacher_overrides,
        epochs=args.epochs,
        parallel=args.backend == "ray" or args.jobs != 1,
    )
    print(f"[sweep] rows: {', '.join(row.name for row in plan.rows)}; seeds: {plan.seeds}")
    teacher, runs = run_sweep(plan, args.backend, args.jobs, args.ray_address)
    report = write_report(
        plan,
        teacher,
        runs,
        workdir / "sweep.json",
        {"config": args.config, "overrides": args.overrides, "backend": args.backend},
    )
    print(markdown(report["rows"], report["teacher"]))
    print(report["verdict"])
    print(f"written: {workdir / 'sweep.json'} (.md, .png) and {report['best_config']}")
    return 0
