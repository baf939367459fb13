"""The equal-budget weight search: every method gets the same grid, chosen on a split nobody reports.

    python benchmarks/equal_budget_search.py --workdir runs/mt \\
        --grid kd=kd-x0.33,kd-auto,kd-x3 --grid pfi=pfi-x0.33,pfi-r10,pfi-x3 ... \\
        --out benchmarks/results/digits_equal_budget_search.json

Each ``--grid`` names one method's rows of a method table (``<row>_s<seed>``
folders under ``--workdir``, trained by ``method_table.py``): the same number
of settings for every method. Each trained student is evaluated once more, on
the *selection* split: the embedded set's validation scenes drawn with another
data seed (``--select-seed``, default 1), new scenes composed from the same
held-out digit scans. The setting with the best selection mAP is the method's
searched row, and the table reports that run's mAP on the usual validation
split, which took no part in the choice. The ``auto`` row (the grid's middle)
is reported beside it, so the table says what the search bought over ``auto``.

Selection metrics are cached as ``metrics_select_seed<N>.json`` in each run
folder, so the script is cheap to rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import emit, environment
from detdistill.data.embedded import embedded_dir, make_embedded
from detdistill.engine.checkpoint import load_checkpoint
from detdistill.engine.config import DataConfig
from detdistill.engine.evaluate_checkpoint import evaluate_checkpoint


def selection_set(run_dir: Path, seed: int) -> dict[str, Path]:
    """The embedded set of ``run_dir``'s config, generated with data seed ``seed``."""
    # The saved data section only: a run trained before a config change still loads.
    data = DataConfig(**load_checkpoint(run_dir / "model.pt")["config"]["data"])
    if data.format != "embedded":
        sys.exit(f"{run_dir}: the selection split is defined for embedded data only")
    # Scenes are seeded per (seed, split, index), so one training scene is enough to
    # get the same validation scenes a full-size set with this seed would have.
    out = embedded_dir(data.root, data.name, 1, data.num_val, seed, data.image_size)
    return make_embedded(data.name, out, 1, data.num_val, seed=seed, image_size=data.image_size)


def selection_map(run_dir: Path, seed: int) -> float:
    cached = run_dir / f"metrics_select_seed{seed}.json"
    if not cached.is_file():
        paths = selection_set(run_dir, seed)
        evaluate_checkpoint(
            run_dir / "model.pt", data=paths["val_annotations"], images=paths["val_images"],
            out=cached,
        )  # fmt: skip
    return json.loads(cached.read_text())["metrics"]["mAP"]


def reported_map(run_dir: Path) -> float:
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("status") != "completed":
        sys.exit(f"{run_dir} has not completed: run method_table.py for it first")
    return summary["metrics"]["mAP"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--grid", action="append", required=True, metavar="METHOD=ROW,ROW,...",
                        help="one method's settings; the middle row is its auto row")  # fmt: skip
    parser.add_argument("--baseline", default="none", help="the row without distillation")
    parser.add_argument("--seed", type=int, default=0, help="training seed of the rows")
    parser.add_argument("--select-seed", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    grids = {}
    for item in args.grid:
        method, _, rows = item.partition("=")
        grids[method] = rows.split(",")
    sizes = {len(rows) for rows in grids.values()}
    if len(sizes) != 1:
        sys.exit(f"every method needs the same grid size, got {sorted(sizes)}")
    workdir = Path(args.workdir)

    def run(row: str) -> Path:
        return workdir / f"{row}_s{args.seed}"

    baseline = reported_map(run(args.baseline))
    teacher = reported_map(workdir / "teacher")
    table = []
    for method, rows in grids.items():
        settings = [
            {"row": row, "select_mAP": selection_map(run(row), args.select_seed),
             "reported_mAP": reported_map(run(row))}
            for row in rows
        ]  # fmt: skip
        chosen = max(settings, key=lambda s: s["select_mAP"])
        auto = settings[len(settings) // 2]
        table.append({"method": method, "settings": settings, "chosen": chosen["row"],
                      "searched_mAP": chosen["reported_mAP"], "auto_mAP": auto["reported_mAP"],
                      "oracle_mAP": max(s["reported_mAP"] for s in settings)})  # fmt: skip
    lines = [
        f"Baseline {100 * baseline:.1f}, teacher {100 * teacher:.1f} mAP; seed {args.seed}; "
        f"chosen on data seed {args.select_seed}, reported on the usual validation split.",
        "",
        "| method | grid (selection mAP) | chosen | searched | auto | gain searched | gain auto |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for entry in table:
        grid = ", ".join(f"{s['row']} {100 * s['select_mAP']:.1f}" for s in entry["settings"])
        lines.append(
            f"| {entry['method']} | {grid} | {entry['chosen']} | {100 * entry['searched_mAP']:.1f} "
            f"| {100 * entry['auto_mAP']:.1f} | {100 * (entry['searched_mAP'] - baseline):+.1f} "
            f"| {100 * (entry['auto_mAP'] - baseline):+.1f} |"
        )
    emit({"benchmark": "equal_budget_search", **environment(),
          "baseline_mAP": baseline, "teacher_mAP": teacher, "select_seed": args.select_seed,
          "seed": args.seed, "table": table}, args.out)  # fmt: skip
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
