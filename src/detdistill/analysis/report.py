"""``report.md``: the key numbers of ``analysis.json``, the figures, and what they mean.

Written for a user deciding whether Rank Mimicking and Prediction-guided
Feature Imitation have something to fix in *their* teacher/student pair: each
section restates the paper's observation (Li et al., AAAI 2022), shows the
measurement and says how to read it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from detdistill.analysis.summary import SIZE_CLASSES

__all__ = ["render_report"]


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def _pct(x: Any) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _agreement(rho: float | None) -> str:
    if rho is None or not math.isfinite(rho):
        return "could not be measured (no object had two or more candidates with distinct scores)"
    if rho >= 0.9:
        return "nearly the same order: little for Rank Mimicking to correct"
    if rho >= 0.5:
        return "a similar but clearly different order: Rank Mimicking has room to help"
    return "largely different orders: the student's choice of box per object is far from the teacher's, which is what Rank Mimicking targets"


def _relation(r: float | None) -> str:
    if r is None or not math.isfinite(r):
        return "undefined (a constant map)"
    if abs(r) < 0.3:
        return "weakly related"
    return "moderately related" if abs(r) < 0.7 else "strongly related"


def _rank_rows(ranks: dict[str, Any]) -> list[str]:
    lines = [
        "| objects | >= 2 candidates | order defined | candidates (mean) | Spearman mean | Spearman median | Kendall mean | Kendall median | top-1 differs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups = [("all", ranks)] + [(name, ranks["by_size"][name]) for name in SIZE_CLASSES]
    for name, g in groups:
        lines.append(
            f"| {name} ({g['instances']}) | {g['instances_with_2plus_candidates']} | "
            f"{g['spearman']['count']} | {_num(g['mean_candidates'], 1)} | "
            f"{_num(g['spearman']['mean'])} | {_num(g['spearman']['median'])} | "
            f"{_num(g['kendall']['mean'])} | {_num(g['kendall']['median'])} | "
            f"{_pct(g['top1_disagreement'])} |"
        )
    return lines


def render_report(
    result: dict[str, Any], candidate_pngs: Sequence[str], map_pngs: Sequence[str]
) -> str:
    """Markdown for ``result`` (the JSON-safe content of ``analysis.json``) and its figures."""
    ranks, feats = result["rank"], result["features"]
    rho = ranks["spearman"]["mean"]
    lines = [
        "# Teacher vs student: where they disagree",
        "",
        f"- Teacher: `{result['teacher']}`",
        f"- Student: `{result['student']}`",
        f"- Data: {result['data']}, {result['images']} images, "
        f"{ranks['instances_total']} objects ({ranks['instances_without_candidates']} without any "
        f"candidate anchor, {ranks['instances_with_2plus_candidates']} with two or more).",
        "",
        "All numbers are in `analysis.json` (one row per object in `instances`).",
        "",
        "## 1. Do they rank each object's candidate boxes alike?",
        "",
        "The paper's first observation: teacher and student rank the candidate boxes of the same "
        "object differently, and that order, more than the absolute scores, drives the precision "
        "gap, because it decides which box survives NMS. Candidates are the anchors the student's "
        "assigner makes positive for the object; each network scores them with its inference score "
        "for the object's class. Per object, Spearman's rho and Kendall's tau compare the two "
        "orders (1 = same order, 0 = unrelated, -1 = reversed; undefined for one candidate or "
        "constant scores). *Order defined* counts the objects where both are defined; with two "
        "candidates rho can only be +1 or -1, so objects with few candidates give coarse values. "
        "*Top-1 differs* is the share of objects with two or more candidates where no candidate is "
        "best for both networks.",
        "",
        *_rank_rows(ranks),
        "",
        f"Mean Spearman rho is {_num(rho)}, i.e. {_agreement(rho)}. The student picks a different best box "
        f"than the teacher for {_pct(ranks['top1_disagreement'])} of the objects with two or more "
        "candidates. Size classes follow COCO (small < 32², medium < 96² pixels of the original image).",
        "",
        "![Histograms of per-object rank correlations](rank_correlation_hist.png)",
        "",
    ]
    if candidate_pngs:
        lines += [
            "### The candidates themselves",
            "",
            "Each object's three best-scored candidates, decoded to boxes by each network's own "
            "regression: red is the box that would win NMS for that network. Where the student's "
            "red box is looser than the teacher's, the student's ranking costs precision.",
            "",
            *[f"![Top candidates, teacher vs student]({name})\n" for name in candidate_pngs],
        ]
    adapter = feats["adapter"]
    adapter_note = (
        "Teacher and student have the same number of channels, so D compares features directly."
        if adapter == "identity"
        else "The channel counts differ and a `model.pt` holds no trained adapter, so each level's "
        "1x1 adapter was fitted here by least squares on the analysed images (the best linear map "
        "from student to teacher features): D is what no linear read-out of the student explains."
    )
    lines += [
        "## 2. Do features differ where predictions differ?",
        "",
        "The paper's second observation: the locations where teacher and student features differ "
        "most are not where their predictions differ most, so imitating every feature location "
        "equally spends effort where it does not change the output; Prediction-guided Feature "
        "Imitation weights the imitation by P instead. Per FPN level: D = mean over channels of "
        "(adapted student feature - teacher feature)², P = mean over anchors and classes of "
        "(teacher probability - student probability)² (PFI's P, docs/methods.md), on the valid (unpadded) region.",
        "",
        adapter_note,
        "",
        "| level | stride | locations | Pearson r(D, P) | Spearman r(D, P) | mean D | mean P |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in feats["levels"]:
        lines.append(
            f"| {lv['level']} | {lv['stride']} | {lv['locations']} | {_num(lv['pearson_r'])} | "
            f"{_num(lv['spearman_r'])} | {_num(lv['mean_D'])} | {_num(lv['mean_P'])} |"
        )
    lines.append("")
    for lv in feats["levels"]:
        lines.append(
            f"- Stride {lv['stride']}: D and P are {_relation(lv['pearson_r'])} "
            f"(Pearson r = {_num(lv['pearson_r'])})."
        )
    lines += [
        "",
        "A weak correlation reproduces the paper's observation for this pair: uniform feature "
        "imitation would mostly chase differences that do not matter for the output. A strong one "
        "means plain imitation and PFI would focus on similar places.",
        "",
    ]
    if map_pngs:
        lines += [
            "Left to right: the image, D over it, P over it (one row per level; each map has its "
            "own colour scale, bright = large).",
            "",
            *[f"![Feature vs prediction difference]({name})\n" for name in map_pngs],
        ]
    return "\n".join(lines).rstrip() + "\n"
