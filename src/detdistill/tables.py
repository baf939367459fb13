"""Metric tables and run comparisons: one place that formats what every command prints."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from detdistill.engine.metrics_log import read_metrics
from detdistill.errors import ConfigError

COLUMNS = ("mAP", "AP50", "AP75", "APs", "APm", "APl")


def metrics_table(rows: Mapping[str, Mapping[str, float]], baseline: str | None = None) -> str:
    """A fixed-width table of COCO metrics (in %), one row per run; with ``baseline``, a gain column.

    An undefined metric (NaN: no ground truth of that size, COCOeval's -1) shows as "-".
    """
    width = max([len(name) for name in rows] + [8])
    header = f"{'run':{width}s} " + " ".join(f"{c:>6s}" for c in COLUMNS)
    if baseline is not None:
        header += f" {'gain':>6s}"
    lines = [header, "-" * len(header)]
    base = rows.get(baseline, {}) if baseline else {}
    for name, metrics in rows.items():
        cells = " ".join(
            f"{100 * metrics[c]:6.1f}"
            if isinstance(metrics.get(c), (int, float)) and metrics[c] >= 0
            else f"{'-':>6s}"
            for c in COLUMNS
        )
        line = f"{name:{width}s} {cells}"
        if baseline is not None and name == baseline:
            line += f" {'':>6s}"
        elif baseline is not None:
            mine, theirs = metrics.get("mAP"), base.get("mAP")
            known = all(isinstance(v, (int, float)) and v >= 0 for v in (mine, theirs))
            line += f" {100 * (mine - theirs):+6.1f}" if known else f" {'-':>6s}"
        lines.append(line)
    return "\n".join(lines)


def _final_metrics(run_dir: Path) -> dict[str, float]:
    summary = run_dir / "summary.json"
    if summary.exists():
        return dict(json.loads(summary.read_text()).get("metrics", {}))
    evals = [r for r in read_metrics(run_dir) if "val/mAP" in r]
    if not evals:
        return {}
    return {k.removeprefix("val/"): v for k, v in evals[-1].items() if k.startswith("val/")}


def compare_runs(run_dirs: list[Path], plot: str | None = None) -> str:
    """Final metrics of several runs as a table; optionally a PNG of validation mAP per epoch."""
    missing = [str(d) for d in run_dirs if not (d / "metrics.jsonl").exists()]
    if missing:
        raise FileNotFoundError(f"not a run directory (no metrics.jsonl): {', '.join(missing)}")
    names = _unique_names(run_dirs)
    table = metrics_table(
        {name: _final_metrics(d) for name, d in zip(names, run_dirs, strict=True)}, names[0]
    )
    if plot and Path(plot).suffix.lower() != ".png":
        raise ConfigError(f"--plot {plot}: give a .png file name")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, run_dir in zip(names, run_dirs, strict=True):
            evals = [r for r in read_metrics(run_dir) if "val/mAP" in r]
            ax.plot(
                [r["epoch"] for r in evals],
                [100 * r["val/mAP"] for r in evals],
                marker="o",
                label=name,
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel("val mAP (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=120)
        plt.close(fig)
        table += f"\nplot written to {plot}"
    return table


def _unique_names(run_dirs: list[Path]) -> list[str]:
    names = [d.resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(d) for d in run_dirs]
