"""A sweep's table: mean and spread over seeds, gain, gap closed, and how far the order holds.

mAP differences between distillation methods on a short schedule are often
within the spread over seeds; a ranking printed without that spread invites
choosing a method on noise. :func:`rank` therefore marks each pair of
adjacent rows whose difference is within one standard deviation over seeds
(the larger of the two rows'): their order is not established.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from detdistill.sweep.plan import NONE, SweepPlan, row_config

__all__ = ["markdown", "plot", "rank", "summarise", "verdict", "write_report"]


def summarise(
    runs: Sequence[Mapping[str, Any]], teacher_mAP: float | None, rows: Sequence[str]
) -> list[dict[str, Any]]:
    """One entry per row (in ``rows`` order, rows without a run left out).

    ``mAP_mean`` and ``mAP_std`` (sample standard deviation; None with one
    seed: no spread measured), ``gain`` over the student alone, ``gap_closed``:
    gain / (teacher mAP - student-alone mAP), None without a positive gap, and
    ``chosen_weights``: each method's weight averaged over seeds (what ``auto``
    chose; the given weight otherwise).
    """
    by_row: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        by_row.setdefault(run["row"], []).append(run)
    alone = [r["metrics"]["mAP"] for r in by_row.get(NONE, [])]
    base = statistics.mean(alone) if alone else None
    gap = teacher_mAP - base if teacher_mAP is not None and base is not None else None
    table = []
    for name in rows:
        if name not in by_row:
            continue
        values = [r["metrics"]["mAP"] for r in by_row[name]]
        mean = statistics.mean(values)
        chosen: dict[str, list[float]] = {}
        for run in by_row[name]:
            for method, weight in (run.get("chosen_weights") or {}).items():
                if weight is not None:
                    chosen.setdefault(method, []).append(weight)
        gain = mean - base if base is not None else None
        table.append(
            {
                "row": name,
                "seeds": sorted(r["seed"] for r in by_row[name]),
                "mAP_mean": mean,
                "mAP_std": statistics.stdev(values) if len(values) > 1 else None,
                "AP50_mean": statistics.mean(r["metrics"].get("AP50", 0.0) for r in by_row[name]),
                "gain": gain,
                "gap_closed": gain / gap if gain is not None and gap and gap > 0 else None,
                "chosen_weights": {m: statistics.mean(w) for m, w in chosen.items()},
            }
        )
    return table


def rank(table: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows best first, each with how it compares to the row below it.

    ``margin``: its mAP over the next row's; ``spread``: the larger of the two
    rows' standard deviations over seeds (None when either has one seed);
    ``tied``: the margin is within the spread (or no spread was measured), so
    the two rows' order is not established.
    """
    ordered = sorted(table, key=lambda t: t["mAP_mean"], reverse=True)
    out = []
    for i, entry in enumerate(ordered):
        below = ordered[i + 1] if i + 1 < len(ordered) else None
        item = {**entry, "rank": i + 1, "margin": None, "spread": None, "tied": None}
        if below is not None:
            item["margin"] = entry["mAP_mean"] - below["mAP_mean"]
            stds = (entry["mAP_std"], below["mAP_std"])
            item["spread"] = None if None in stds else max(stds)
            item["tied"] = item["spread"] is None or item["margin"] <= item["spread"]
        out.append(item)
    return out


def verdict(ranked: Sequence[Mapping[str, Any]]) -> str:
    """What the ranking says and how far it holds, in a few sentences."""
    if not ranked:
        return "no finished runs to rank"
    best = ranked[0]
    lines = [f"best: {best['row']} ({100 * best['mAP_mean']:.1f} mAP)."]
    if any(t["mAP_std"] is None for t in ranked):
        lines.append(
            "One seed per row: no spread measured, so the order may be noise; "
            "run with --seeds 0 1 2 to know."
        )
        return " ".join(lines)
    ties = [
        f"{a['row']} > {b['row']} (+{100 * a['margin']:.1f}, spread {100 * a['spread']:.1f})"
        for a, b in itertools.pairwise(ranked)
        if a["tied"]
    ]
    if ties:
        lines.append("Within the seed spread, order not established: " + "; ".join(ties) + ".")
    else:
        lines.append("Every adjacent pair differs by more than its seed spread.")
    if best["tied"]:
        lines.append(
            f"{best['row']} is not clearly ahead of {ranked[1]['row']}: treat them as tied."
        )
    return " ".join(lines)


def _pct(value: float | None, sign: bool = False) -> str:
    if value is None:
        return ""
    return f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"


def _weights(chosen: Mapping[str, float]) -> str:
    return ", ".join(f"{m} {w:.3g}" for m, w in chosen.items())


def markdown(ranked: Sequence[Mapping[str, Any]], teacher: Mapping[str, Any] | None) -> str:
    """The ranked table in percent: mean ± std over seeds, gain, gap closed, weights used."""
    lines = [
        "| rank | row | mAP (mean ± std) | AP50 | gain | gap closed | weights | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if teacher is not None:
        metrics = teacher["metrics"]
        lines.append(
            f"| | teacher | {_pct(metrics['mAP'])} | {_pct(metrics.get('AP50'))} | | | | |"
        )
    for t in ranked:
        std = "–" if t["mAP_std"] is None else _pct(t["mAP_std"])
        closed = (
            "" if t["gap_closed"] is None or t["row"] == NONE else f"{100 * t['gap_closed']:.0f}%"
        )
        gain = "" if t["row"] == NONE else _pct(t["gain"], sign=True)
        lines.append(
            f"| {t['rank']} | {t['row']} | {_pct(t['mAP_mean'])} ± {std} | {_pct(t['AP50_mean'])} "
            f"| {gain} | {closed} | {_weights(t['chosen_weights'])} | {len(t['seeds'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(ranked: Sequence[Mapping[str, Any]], teacher_mAP: float | None, path: Path) -> None:
    """Bars of mean mAP with the seed spread, best on top; the teacher as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(reversed(ranked))  # barh draws bottom-up
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.4 * len(rows)))
    ax.barh(
        [t["row"] for t in rows],
        [100 * t["mAP_mean"] for t in rows],
        xerr=[100 * (t["mAP_std"] or 0.0) for t in rows],
        capsize=4,
        color=["0.6" if t["row"] == NONE else "C0" for t in rows],
    )
    if teacher_mAP is not None:
        ax.axvline(100 * teacher_mAP, color="k", linestyle="--", label="teacher")
        ax.legend(loc="lower right")
    ax.set_xlabel("val mAP (%), mean ± std over seeds")
    ax.set_title("student by distillation method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TEACHER_METRICS_FILE = "teacher_metrics.json"


def given_teacher_metrics(plan: SweepPlan) -> dict[str, Any]:
    """The given teacher checkpoint's metrics: those its run saved, or measured here.

    An Ultralytics checkpoint records none that compare with the students'
    COCOeval numbers, so it is evaluated once on the sweep's validation set,
    as the students are, and the result is kept in the workdir
    (``teacher_metrics.json``, for that file's path, size and time).
    """
    from detdistill import jsonio
    from detdistill.engine.builders import build_datasets, build_eval_loader, load_detector
    from detdistill.engine.distributed import resolve_device
    from detdistill.evaluation import evaluate

    checkpoint = plan.teacher_checkpoint
    loaded = load_detector(checkpoint)
    if loaded.has_data_section:
        return dict(loaded.payload.get("metrics") or {})
    stat = checkpoint.stat()
    key = {"checkpoint": str(checkpoint), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = plan.workdir / TEACHER_METRICS_FILE
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("of") == key:
            return saved["metrics"]
    device = resolve_device(plan.base.device)
    data = plan.base.data
    dataset = build_datasets(data, train=False, class_names=loaded.class_names).val
    loader = build_eval_loader(dataset, data.batch_size, num_workers=0)
    result = evaluate(loaded.model.to(device), loader, dataset, device=device, progress=False)
    metrics = jsonio.json_safe({k: result[k] for k in ("mAP", "AP50", "AP75", "APs", "APm", "APl")})
    cache.parent.mkdir(parents=True, exist_ok=True)
    jsonio.write(cache, {"of": key, "metrics": metrics}, indent=2)
    return metrics


def write_report(
    plan: SweepPlan,
    teacher: Mapping[str, Any] | None,
    runs: Sequence[Mapping[str, Any]],
    out: Path,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``out`` (strict JSON), its ``.md`` table, ``.png`` chart and ``_best.yaml``.

    The teacher's mAP comes from its run, or from the checkpoint's own saved
    metrics when a trained teacher was given. ``_best.yaml`` is the user's
    config with the best row's distillation (not the sweep's seed or schedule):
    the config to train the chosen method with.
    """
    from detdistill import jsonio
    from detdistill.engine.config import save_config

    if teacher is None:
        teacher = {
            "name": "teacher",
            "metrics": given_teacher_metrics(plan),
            "run_dir": str(plan.teacher_checkpoint.parent),
        }
    teacher_mAP = teacher["metrics"].get("mAP")
    ranked = rank(summarise(runs, teacher_mAP, [row.name for row in plan.rows]))
    out.parent.mkdir(parents=True, exist_ok=True)
    best = None
    if ranked:
        best = out.with_name(out.stem + "_best.yaml")
        save_config(
            row_config(plan, next(r for r in plan.rows if r.name == ranked[0]["row"])), best
        )
        plot(ranked, teacher_mAP, out.with_suffix(".png"))
    judged = verdict(ranked)
    threads = sorted({r["threads"] for r in runs if r.get("threads") is not None})
    if len(threads) > 1:
        judged += (
            f" The runs trained with {' and '.join(map(str, threads))} threads (see runs): "
            "a run reproduces only at its own thread count."
        )
    report = {
        **(extra or {}),
        "teacher": teacher,
        "rows": ranked,
        "verdict": judged,
        "best_config": None if best is None else str(best),
        "runs": list(runs),
    }
    jsonio.write(out, report, indent=2)
    out.with_suffix(".md").write_text(markdown(ranked, teacher) + "\n" + report["verdict"] + "\n")
    return report
