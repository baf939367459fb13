"""The method table: one teacher, then the student with each distillation method and seed.

    python benchmarks/method_table.py --preset digits --workdir runs/method_table
    python benchmarks/method_table.py --preset digits --methods none rm pfi rm+pfi --seeds 0

Resumable: a run whose ``summary.json`` says "completed" is not repeated, so
the script can be stopped and started again (or run in the background). Two
tables may share a workdir: a run another live process is training is left
out (a lock file in its directory), not trained twice.
Writes ``benchmarks/results/<preset>_methods.json`` (one row per run: method,
weights, seed, COCO metrics, epochs, wall time, commit, machine) and a bar
chart with the spread over seeds. ``--jobs 2`` trains two students at once,
one thread each (the fastest use of a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from _common import emit, environment

PRESETS = {
    "digits": ("digits_teacher", "digits_student", "digits_distill"),
    "digits_gfl": ("digits_gfl_teacher", "digits_gfl_student", "digits_gfl_distill"),  # the demo's
    "digits_yolo": ("digits_yolo_teacher", "digits_yolo_student", "digits_yolo_distill"),
    "shapes": ("shapes_teacher", "shapes_student", "shapes_distill"),
    "voc": ("voc_r50", "voc_r50_r18", "voc_r50_r18"),
    "coco": ("coco_retinanet_r101", "coco_retinanet_r101_r50", "coco_retinanet_r101_r50"),
}
# The baselines at weight 1 (their papers' usual setting). RM and PFI take their
# weights from the preset's distill section, so the table measures the defaults
# users get; --weights changes any row or adds a variant.
BASELINES = {"none": {}, "kd": {"kd": 1.0}, "fitnet": {"fitnet": 1.0}, "fgfi": {"fgfi": 1.0},
             "defeat": {"defeat": 1.0}, "scorel2": {"scorel2": 1.0}}  # fmt: skip
DEFAULT_METHODS = ["none", "kd", "fitnet", "fgfi", "defeat", "rm", "pfi", "rm+pfi"]
METRICS = ("mAP", "AP50", "AP75", "APs", "APm", "APl")
LOCK_FILE = "method_table.lock"  # holds the pid of the process training the run


def parse_weights(text: str) -> dict[str, float | str]:
    """``rm=4,pfi=auto`` -> ``{"rm": 4.0, "pfi": "auto"}``."""
    return {
        k: v if v == "auto" else float(v)
        for k, v in (item.split("=") for item in text.split(",") if item)
    }


def format_weights(weights: dict[str, float | str]) -> str:
    return ", ".join(f"{k} {v}" if isinstance(v, str) else f"{k} {v:g}" for k, v in weights.items())


def parse_options(text: str) -> dict[str, dict[str, object]]:
    """``rm.score=prob,pfi.detach_weight=false`` -> ``{"rm": {"score": "prob"}, "pfi": {...: False}}``."""
    options: dict[str, dict[str, object]] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        method, _, option = key.partition(".")
        options.setdefault(method, {})[option] = yaml.safe_load(value)
    return options


def preset_methods(distill_preset: str) -> dict[str, dict[str, float]]:
    """The ``rm``, ``pfi`` and ``rm+pfi`` rows, weighted as the preset distils."""
    from detdistill.engine.presets import load_preset_or_file

    chosen = load_preset_or_file(distill_preset, []).distill.methods
    return {
        "rm": {"rm": chosen["rm"]},
        "pfi": {"pfi": chosen["pfi"]},
        "rm+pfi": {"rm": chosen["rm"], "pfi": chosen["pfi"]},
    }


def _completed(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("status") == "completed"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _claim(run_dir: Path) -> int | None:
    """Mark ``run_dir`` as trained by this process; the pid of a live holder if another has it.

    Two tables started on one workdir (two lanes of a 2-core machine, say) must
    not train the same run at once: both would resume from and write to the
    same checkpoint. A lock left by a process that died is taken over.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        holder = int(lock.read_text() or 0)
        if holder and holder != os.getpid() and _alive(holder):
            return holder
        lock.unlink(missing_ok=True)
        return _claim(run_dir)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return None


def run_one(job: dict) -> dict | None:
    """Train one run (in its own process when --jobs > 1) and return its table row.

    None when another process is training that run now (see :func:`_claim`).
    """
    import torch

    torch.set_num_threads(job["threads"])
    from detdistill.engine.presets import load_preset_or_file
    from detdistill.engine.trainer import run

    run_dir = Path(job["output_dir"])
    summary = run_dir / "summary.json"
    if _completed(run_dir):
        metrics = json.loads(summary.read_text())["metrics"]
        chosen = json.loads(summary.read_text()).get("distill_weights")
        wall = (
            json.loads((run_dir / "wall_time.json").read_text())["seconds"]
            if (run_dir / "wall_time.json").exists()
            else None
        )
    else:
        holder = _claim(run_dir)
        if holder is not None:
            print(f"{job['name']} is being trained by process {holder}: left out of this table",
                  file=sys.stderr)  # fmt: skip
            return None
        try:
            cfg = load_preset_or_file(job["preset"], job["overrides"])
            start = time.perf_counter()
            result = run(cfg, resume=(run_dir / "last_state.pt").exists(), show_progress=False)
            wall = time.perf_counter() - start
        finally:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
        if result.status != "completed":  # Ctrl-C or max_steps: no row, keep what is saved
            raise RuntimeError(f"{job['name']} stopped ({result.status}); run again to resume it")
        metrics = result.metrics
        chosen = json.loads(summary.read_text()).get("distill_weights")
        (run_dir / "wall_time.json").write_text(json.dumps({"seconds": wall}) + "\n")
    return {
        "name": job["name"],
        "method": job["method"],
        "weights": job["weights"],
        "chosen_weights": chosen,  # what "auto" weights became (equal to weights otherwise)
        "options": job["options"],
        "row_overrides": job.get("row_overrides", []),
        "seed": job["seed"],
        **{k: metrics.get(k) for k in METRICS},
        "epochs": job["epochs"],
        "wall_time_s": wall,
        "run_dir": str(run_dir),
    }


def summarise(rows: list[dict], teacher: dict | None) -> list[dict]:
    """Mean and spread of mAP per method, gain over the baseline, share of the gap closed."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    base = statistics.mean(r["mAP"] for r in by_method["none"]) if "none" in by_method else None
    gap = (teacher["mAP"] - base) if teacher and base is not None else None
    table = []
    for method, runs in by_method.items():
        values = [r["mAP"] for r in runs]
        mean = statistics.mean(values)
        entry = {
            "method": method,
            "weights": runs[0]["weights"],
            "options": runs[0].get("options") or {},
            "runs": len(values),
            "mAP_mean": mean,
            "mAP_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "AP50_mean": statistics.mean(r["AP50"] for r in runs),
        }
        if base is not None:
            entry["gain"] = mean - base
            entry["gap_closed"] = (mean - base) / gap if gap else None
        table.append(entry)
    return table


def markdown(table: list[dict], teacher: dict | None) -> str:
    """The summary as the README shows it (mAP in %, std over seeds)."""
    lines = [
        "| row | weights | mAP (mean ± std) | AP50 | gain | gap closed | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    if teacher:
        lines.append(
            f"| teacher | | {100 * teacher['mAP']:.1f} | {100 * teacher['AP50']:.1f} | | | 1 |"
        )
    for t in table:
        weights = format_weights(t["weights"]) + "".join(
            f" ({m}: " + ", ".join(f"{k}={v}" for k, v in o.items()) + ")"
            for m, o in t.get("options", {}).items()
        )
        gain = f"{100 * t['gain']:+.1f}" if t["method"] != "none" and "gain" in t else ""
        closed = (
            f"{100 * t['gap_closed']:.0f}%"
            if t["method"] != "none" and t.get("gap_closed") is not None
            else ""
        )
        lines.append(
            f"| {'baseline (none)' if t['method'] == 'none' else t['method']} | {weights} "
            f"| {100 * t['mAP_mean']:.1f} ± {100 * t['mAP_std']:.1f} | {100 * t['AP50_mean']:.1f} "
            f"| {gain} | {closed} | {t['runs']} |"
        )
    return "\n".join(lines) + "\n"


def plot(table: list[dict], teacher: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [t["method"] for t in table]
    ax.bar(
        names,
        [100 * t["mAP_mean"] for t in table],
        yerr=[100 * t["mAP_std"] for t in table],
        capsize=4,
    )
    if teacher:
        ax.axhline(100 * teacher["mAP"], color="k", linestyle="--", label="teacher")
        ax.legend()
    ax.set_ylabel("val mAP (%)")
    ax.set_title("student mAP by distillation method (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="config override for every run"
    )
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
    teacher_preset, student_preset, distill_preset = PRESETS[args.preset]
    weights = {name: dict(w) for name, w in BASELINES.items()} | preset_methods(distill_preset)
    for item in args.weights:  # a new name defines a variant, e.g. rm+pfi100:rm=4,pfi=100
        name, _, text = item.partition(":")
        weights[name] = parse_weights(text)
    options = {
        name: parse_options(text) for name, _, text in (o.partition(":") for o in args.options)
    }
    row_overrides: dict[str, list[str]] = {}
    for item in args.row_overrides:
        name, _, override = item.partition(":")
        row_overrides.setdefault(name, []).append(override)
    unknown = sorted(set(args.methods) - set(weights))
    if unknown:
        sys.exit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(weights)}")

    workdir = Path(args.workdir)
    threads = args.threads or (1 if args.jobs > 1 else (os.cpu_count() or 1))
    teacher_dir = workdir / "teacher"
    teacher_job = {
        "name": "teacher", "method": "teacher", "weights": {}, "options": {}, "seed": 0, "preset": teacher_preset,
        "output_dir": str(teacher_dir), "overrides": [*args.overrides, f"output_dir={teacher_dir}"],
        "epochs": None, "threads": os.cpu_count() or 1,
    }  # fmt: skip
    if args.only_completed and not _completed(teacher_dir):
        sys.exit(f"{teacher_dir} has no completed teacher; --only-completed trains nothing")
    teacher = run_one(teacher_job)
    if teacher is None:
        sys.exit(f"{teacher_dir} is being trained by another process; run again when it is done")
    jobs = []
    for method in args.methods:
        for seed in args.seeds:
            name = f"{method}_s{seed}"
            out_dir = workdir / name
            # Only the final metrics enter the table: evaluate after the last epoch only.
            overrides = ["train.eval_interval=0", *args.overrides, f"output_dir={out_dir}",
                         f"seed={seed}"]  # fmt: skip
            if method == "none":
                preset = student_preset
            else:
                preset = distill_preset
                methods = "{" + ", ".join(f"{k}: {v}" for k, v in weights[method].items()) + "}"
                overrides += [
                    f"distill.teacher_checkpoint={teacher_dir / 'model.pt'}",
                    f"distill.methods={methods}",
                    f"distill.method_options={json.dumps(options.get(method, {}))}",
                    *row_overrides.get(method, []),
                ]
            jobs.append({"name": name, "method": method, "weights": weights[method],
                         "options": options.get(method, {}), "seed": seed,
                         "row_overrides": row_overrides.get(method, []),
                         "preset": preset, "output_dir": str(out_dir), "overrides": overrides,
                         "epochs": None, "threads": threads})  # fmt: skip
    if args.only_completed:
        done = [j for j in jobs if _completed(Path(j["output_dir"]))]
        missing = sorted(j["name"] for j in jobs if j not in done)
        if missing:
            print(f"left out (not completed): {', '.join(missing)}", file=sys.stderr)
        jobs = done
    if args.jobs > 1:
        with ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            rows = list(pool.map(run_one, jobs))
    else:
        rows = [run_one(job) for job in jobs]
    rows = [row for row in rows if row is not None]
    for row in [teacher, *rows]:
        row["epochs"] = json.loads((Path(row["run_dir"]) / "summary.json").read_text())["epoch"]
    table = summarise(rows, teacher)
    out = Path(args.out or f"benchmarks/results/{args.preset}_methods.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(table, teacher, out.with_suffix(".png"))
    emit({"benchmark": "method_table", **environment(), "preset": args.preset,
          "teacher": teacher, "summary": table, "runs": rows}, str(out))  # fmt: skip
    out.with_suffix(".md").write_text(markdown(table, teacher))
    print(markdown(table, teacher))
    print(f"wrote {out} and its .png and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
