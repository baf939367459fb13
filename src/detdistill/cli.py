"""The ``detdistill`` command.

Every subcommand turns the errors a user can cause (a bad config, a missing
file, a teacher that does not fit) into one line on stderr and exit status 2;
``--debug`` shows the traceback instead.

Each command is a pair: ``_cmd_<name>(args) -> exit status`` does the work and
``add_<name>_parser(subparsers)`` declares its options and sets ``func`` to
that handler. :data:`COMMANDS` lists the ``add_*`` functions in the order
``detdistill --help`` shows them, so a new command is its pair plus one entry
there. Choices that name registered things (embedded data sets, ...) are read
from their registries when the parser is built.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from detdistill.sweep.command import add_parser as add_sweep_parser
from detdistill.version import __version__

log = logging.getLogger("detdistill")

#: What ``add_<name>_parser`` receives: the top-level parser's subcommands.
Subparsers = argparse._SubParsersAction


def _epilog() -> str:
    from detdistill.engine.presets import list_presets

    return "Presets: " + ", ".join(list_presets())


def _add_config_args(parser: argparse.ArgumentParser, training: bool = True) -> None:
    parser.add_argument("config", help="YAML config file or preset name (see `detdistill presets`)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value with a dotted key, e.g. --set train.lr=0.02 (repeatable; "
        "YAML values, but paths and names are taken as typed)",
    )
    if not training:
        return
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in output_dir from its last state"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (logs still written)"
    )


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer ``>= low`` (argparse names the option when it is not)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _add_data_args(p: argparse.ArgumentParser, data_help: str, images_help: str) -> None:
    """The evaluation data options ``eval`` and ``analyze`` share (their help texts differ)."""
    from detdistill.engine.builders import DATA_FORMATS

    p.add_argument("--data", help=data_help)
    p.add_argument("--images", help=images_help)
    p.add_argument(
        "--format",
        choices=[n for n in DATA_FORMATS.names() if DATA_FORMATS.get(n).from_path is not None],
        default="coco",
        help="layout of --data (default: coco)",
    )
    p.add_argument("--split", default="val", help="VOC split, or data.yaml key (default: val)")


def _add_slice_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--slice-size", type=int, default=None, metavar="PX",
        help="run on overlapping PX x PX windows of each image at its native resolution and "
        "merge the detections (large images, small objects; e.g. the training tile size)",
    )  # fmt: skip
    p.add_argument(
        "--slice-overlap", type=float, default=0.2,
        help="fraction of a window its neighbour shares (default: 0.2)",
    )  # fmt: skip
    p.add_argument(
        "--slice-merge", choices=["ios", "nms"], default="ios",
        help="merge across windows by intersection over the smaller box (default) or IoU NMS",
    )  # fmt: skip


def _slices(args: argparse.Namespace) -> Any:
    from detdistill.slicing import SliceSettings

    if args.slice_size is None:
        return None
    try:
        return SliceSettings(args.slice_size, args.slice_overlap, merge=args.slice_merge)
    except ValueError as exc:
        from detdistill.errors import ConfigError

        raise ConfigError(str(exc)) from None


# ---------------------------------------------------------------------------
# The commands, each a handler and its parser


def _cmd_demo(args: argparse.Namespace) -> int:
    from detdistill.demo import run_demo

    run_demo(Path(args.workdir), quick=args.quick, show_progress=not args.no_progress)
    return 0


def add_demo_parser(sub: Subparsers) -> None:
    """Its timings and results live in docs/results.md, measured, not in the help text."""
    p = sub.add_parser(
        "demo",
        help="the embedded end-to-end run: teacher, baseline student, RM+PFI student, and their table",
        description="Makes the `digits` data (cached), trains a teacher (reused when cached), a baseline "
        "student and an RM+PFI distilled student, and prints their COCO metrics with the gain; "
        "--quick is a smoke run. How long it takes and what it gets: docs/results.md#the-demo.",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny data and few steps: checks everything runs"
    )
    p.add_argument(
        "--workdir", default="runs/demo", help="where runs and the table go (default: runs/demo)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.set_defaults(func=_cmd_demo)


def _cmd_train(args: argparse.Namespace, distill: bool) -> int:
    from detdistill.engine.presets import load_preset_or_file
    from detdistill.engine.trainer import run
    from detdistill.errors import ConfigError

    cfg = load_preset_or_file(args.config, args.overrides)
    if distill and cfg.distill is None:
        raise ConfigError(
            "`distill` needs a config with a `distill:` section (teacher_checkpoint, methods)"
        )
    if not distill and cfg.distill is not None:
        raise ConfigError("this config has a `distill:` section: run it with `detdistill distill`")
    if distill:
        from detdistill.engine.doctor import run_doctor
        from detdistill.engine.validate import validate_config

        validate_config(cfg)  # a bad name is one line, before the teacher is evaluated
        report = run_doctor(cfg)
        print(report.render())
        if not report.ok:
            return 2
    result = run(cfg, resume=args.resume, show_progress=not args.no_progress)
    from detdistill.tables import metrics_table

    print(metrics_table({Path(cfg.output_dir).name: result.metrics}))
    print(f"{result.status}: weights in {result.run_dir / 'model.pt'}")
    return 0 if result.status != "interrupted" else 130


def add_train_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "train",
        help="train a detector on its own (a teacher or the student baseline)",
        epilog=_epilog(),
    )
    _add_config_args(p)
    p.set_defaults(func=lambda a: _cmd_train(a, distill=False))


def add_distill_parser(sub: Subparsers) -> None:
    """The same handler as ``train``, which then insists on a ``distill:`` section and runs the doctor."""
    p = sub.add_parser(
        "distill",
        help="train a student with a teacher checkpoint and the chosen methods",
        description="Runs the doctor's checks, then trains. Methods and weights come from "
        "`distill.methods`, e.g. --set distill.methods='{rm: auto, pfi: auto}' (weights "
        "measured on the first batches, printed and saved in summary.json) or "
        "--set distill.methods='{rm: 4.0, pfi: 1.5}'.",
        epilog=_epilog(),
    )
    _add_config_args(p)
    p.set_defaults(func=lambda a: _cmd_train(a, distill=True))


def _cmd_eval(args: argparse.Namespace) -> int:
    from detdistill.engine.evaluate_checkpoint import evaluate_checkpoint
    from detdistill.tables import metrics_table

    result = evaluate_checkpoint(
        args.checkpoint,
        data=args.data,
        images=args.images,
        data_format=args.format,
        split=args.split,
        batch_size=args.batch_size,
        out=args.out,
        slices=_slices(args),
    )
    print(metrics_table({Path(args.checkpoint).parent.name or "model": result["metrics"]}))
    if args.per_class:
        for name, ap in result["per_class"].items():
            print(f"  {name:20s} {ap:.4f}")
    print(f"metrics written to {result['out']}")
    return 0


def add_eval_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "eval", help="COCO metrics of a checkpoint on a data set, as a table and JSON"
    )
    p.add_argument("checkpoint", help="a model.pt written by train/distill")
    _add_data_args(
        p,
        data_help="COCO annotation JSON, a VOC root with --format voc, or a data.yaml with "
        "--format yolo (default: the checkpoint's own validation data)",
        images_help="COCO images folder (default: the folder named as the file, e.g. val/ for "
        "val.json, else images/ beside it, else the file's folder)",
    )
    p.add_argument(
        "--batch-size", type=_at_least(1), default=16, help="images per batch (default: 16)"
    )
    p.add_argument("--out", help="JSON output (default: metrics_<data>.json beside the checkpoint)")
    p.add_argument("--per-class", action="store_true", help="also print per-class AP")
    _add_slice_args(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_compare(args: argparse.Namespace) -> int:
    from detdistill.tables import compare_runs

    print(compare_runs([Path(p) for p in args.runs], plot=args.plot))
    return 0


def add_compare_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "compare",
        help="runs side by side: final metrics table and mAP over epochs",
        description="Final COCO metrics of each run, with the gain over the first one, and "
        "optionally a plot of validation mAP per epoch, e.g. "
        "`detdistill compare runs/demo/student_baseline runs/demo/student_rm_pfi --plot mAP.png`.",
    )
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    p.add_argument("--plot", help="write a PNG of mAP over epochs here")
    p.set_defaults(func=_cmd_compare)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from detdistill.engine.doctor import run_doctor
    from detdistill.engine.presets import load_preset_or_file

    report = run_doctor(load_preset_or_file(args.config, args.overrides))
    print(report.render())
    return 0 if report.ok else 2


def add_doctor_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "doctor",
        help="checks before a long run: weights load, teacher mAP, compatibility, shapes, loss sizes",
        description="Loads both checkpoints strictly, evaluates the teacher on the validation data "
        "(near-zero mAP is an error), checks that teacher and student fit together, prints the "
        "feature and logit shapes per FPN level, and each weighted loss term at step 0 next to "
        "the detection loss (flagged when 100x larger or smaller). `distill` runs it first.",
        epilog=_epilog(),
    )
    _add_config_args(p, training=False)
    p.set_defaults(func=_cmd_doctor)


def _cmd_data_make(args: argparse.Namespace) -> int:
    import tempfile

    from detdistill.data import make_embedded, write_yolo
    from detdistill.data.yolo import require_new_folder

    settings = {"seed": args.seed, "image_size": args.image_size}
    if args.format == "coco":
        paths = make_embedded(args.name, Path(args.out), args.num_train, args.num_val, **settings)
        for key, value in paths.items():
            print(f"{key}: {value}")
        return 0
    out = Path(args.out).absolute()
    require_new_folder(out)  # before generating anything
    out.parent.mkdir(parents=True, exist_ok=True)
    # COCO first, beside the output so that the images can be hard-linked, then converted
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.coco-", dir=out.parent) as tmp:
        coco = make_embedded(args.name, Path(tmp), args.num_train, args.num_val, **settings)
        data_yaml = write_yolo(
            {
                split: (coco[f"{split}_images"], coco[f"{split}_annotations"])
                for split in ("train", "val")
            },
            out,
            images="hardlink",
        )
    print(f"root: {out}")
    print(f"data_yaml: {data_yaml}")
    for split in ("train", "val"):
        print(f"{split}_images: {out / 'images' / split}")
        print(f"{split}_labels: {out / 'labels' / split}")
    return 0


def add_data_parser(sub: Subparsers) -> None:
    """``data make NAME``: the names are the registered embedded sets, plug-ins' included."""
    from detdistill.data import EMBEDDED_DATASETS

    p = sub.add_parser("data", help="embedded data sets")
    data_sub = p.add_subparsers(
        dest="data_command", required=True, metavar="ACTION", help="make: write a data set"
    )
    make = data_sub.add_parser(
        "make", help="write an embedded data set in COCO (default) or YOLO format"
    )
    make.add_argument("name", choices=EMBEDDED_DATASETS.names(), help="which embedded set")
    make.add_argument("--out", required=True, help="output folder")
    make.add_argument(
        "--format",
        choices=["coco", "yolo"],
        default="coco",
        help="coco: train.json/val.json beside the image folders; yolo: data.yaml, images/, "
        "labels/ (default: coco)",
    )
    make.add_argument(
        "--num-train", type=_at_least(1), default=3000, help="training images (default: 3000)"
    )
    make.add_argument(
        "--num-val", type=_at_least(1), default=500, help="validation images (default: 500)"
    )
    make.add_argument(
        "--seed", type=_at_least(0), default=0, help="same seed, same images (default: 0)"
    )
    make.add_argument(
        "--image-size", type=_at_least(32), default=128, help="square side in px (default: 128)"
    )
    make.set_defaults(func=_cmd_data_make)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from detdistill.analysis import run_analysis

    report = run_analysis(
        args.teacher,
        args.student,
        data=args.data,
        images=args.images,
        data_format=args.format,
        split=args.split,
        out=Path(args.out),
        max_images=args.max_images,
        num_visualize=args.num_images,
    )
    print(f"report written to {report}")
    return 0


def add_analyze_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "analyze",
        help="the paper's two observations on your models: rank agreement, feature vs prediction gaps",
        description="Per ground-truth instance, how teacher and student rank its candidate boxes "
        "(Spearman/Kendall, top-1 agreement), and per FPN level where their features and their "
        "predictions differ; writes PNGs, report.md and analysis.json to --out.",
    )
    p.add_argument("teacher", help="teacher model.pt")
    p.add_argument("student", help="student model.pt")
    _add_data_args(
        p,
        data_help="COCO annotation JSON, VOC root or YOLO data.yaml (default: the student's "
        "validation data)",
        images_help="COCO images folder",
    )
    p.add_argument("--out", default="analysis", help="output folder (default: analysis)")
    p.add_argument(
        "--max-images", type=_at_least(1), default=200, help="images to analyse (default: 200)"
    )
    p.add_argument("--num-images", type=_at_least(0), default=4, help="images to draw (default: 4)")
    p.set_defaults(func=_cmd_analyze)


def _cmd_predict(args: argparse.Namespace) -> int:
    from detdistill.predict import run_predict

    summary = run_predict(
        args.checkpoint,
        args.inputs,
        out=Path(args.out),
        score_threshold=args.score_threshold,
        max_detections=args.max_detections,
        batch_size=args.batch_size,
        show_progress=not args.no_progress,
        slices=_slices(args),
    )
    print(
        f"{summary['images']} images, {summary['detections']} detections, "
        f"{summary['skipped']} skipped; results in {summary['out']}"
    )
    return 0


def add_predict_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "predict", help="run a checkpoint on images: drawn boxes and COCO results JSON"
    )
    p.add_argument("checkpoint", help="a model.pt")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--score-threshold", type=float, default=0.3, help="boxes drawn and kept (default: 0.3)"
    )
    p.add_argument(
        "--max-detections", type=_at_least(1), default=100, help="per image (default: 100)"
    )
    p.add_argument(
        "--batch-size", type=_at_least(1), default=8, help="images per batch (default: 8)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_slice_args(p)
    p.set_defaults(func=_cmd_predict)


def _cmd_export(args: argparse.Namespace) -> int:
    from detdistill.export import export_onnx

    path = export_onnx(args.checkpoint, Path(args.out), opset=args.opset)
    print(f"exported {path}")
    return 0


def add_export_parser(sub: Subparsers) -> None:
    p = sub.add_parser("export", help="export the student alone (no teacher, no adapters) to ONNX")
    p.add_argument("checkpoint", help="a model.pt")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (onnx)")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.set_defaults(func=_cmd_export)


def _cmd_presets(args: argparse.Namespace) -> int:
    from detdistill.engine.presets import list_presets, preset_path

    for name in list_presets():
        print(f"{name:28s} {preset_path(name)}")
    return 0


def add_presets_parser(sub: Subparsers) -> None:
    p = sub.add_parser("presets", help="list the bundled config presets")
    p.set_defaults(func=_cmd_presets)


#: Every command's parser, in the order ``detdistill --help`` lists them.
COMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    add_demo_parser,
    add_train_parser,
    add_distill_parser,
    add_eval_parser,
    add_compare_parser,
    add_doctor_parser,
    add_data_parser,
    add_analyze_parser,
    add_predict_parser,
    add_export_parser,
    add_sweep_parser,
    add_presets_parser,
)


# ---------------------------------------------------------------------------
# The top level


def _add_import_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first, for the methods, detectors, data formats, ... it registers "
        "(repeatable; like `imports:` in a config)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: the global options, then each of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="detdistill",
        description="Knowledge distillation for one-stage object detectors (Rank Mimicking, PFI and baselines).",
    )
    parser.add_argument("--version", action="version", version=f"detdistill {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    _add_import_arg(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in COMMANDS:
        add_parser(sub)
    return parser


def _import_requested(argv: Sequence[str]) -> None:
    """Import the ``--import`` modules before the parser is built, so their names are choices."""
    early = argparse.ArgumentParser(add_help=False)
    _add_import_arg(early)
    from detdistill.engine.config import import_modules

    import_modules(early.parse_known_args(argv)[0].imports, "--import")


def _user_errors() -> tuple[type[BaseException], ...]:
    from detdistill.errors import DetDistillError

    return (
        DetDistillError,
        FileNotFoundError,
        FileExistsError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # the user's modules and installed plug-ins register names the parser lists
        _import_requested(argv)
        parser = build_parser()
    except _user_errors() as exc:
        if "--debug" in argv:
            raise
        print(f"detdistill: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    if args.debug:
        return func(args)
    try:
        return func(args)
    except _user_errors() as exc:
        print(f"detdistill {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"detdistill {args.command}: interrupted", file=sys.stderr)
        return 130
