"""From collected results to numbers: per-instance rows, means by object size, per-level correlations.

Kept apart from the figures and the Markdown so that ``analysis.json`` is
the one source of every number the report quotes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from detdistill.analysis.collect import InstanceInfo
from detdistill.analysis.ranks import InstanceRanks, summarize

__all__ = ["SIZE_CLASSES", "rank_summary", "size_class"]

#: COCO's object size classes by area in original-image pixels (COCOeval's areaRng).
SMALL_MAX, MEDIUM_MAX = 32.0**2, 96.0**2
SIZE_CLASSES = ("small", "medium", "large")


def size_class(area: float) -> str:
    """COCO size class: small < 32^2 <= medium < 96^2 <= large."""
    if area < SMALL_MAX:
        return "small"
    return "medium" if area < MEDIUM_MAX else "large"


def _group(ranks: InstanceRanks, mask: np.ndarray) -> dict[str, Any]:
    comparable = mask & ranks.comparable
    return {
        "instances": int(mask.sum()),
        "instances_with_2plus_candidates": int(comparable.sum()),
        "mean_candidates": float(ranks.num_candidates[mask].mean()) if mask.any() else math.nan,
        "spearman": summarize(ranks.spearman[mask]),
        "kendall": summarize(ranks.kendall[mask]),
        "top1_disagreement": float(ranks.top1_differs[comparable].mean())
        if comparable.any()
        else math.nan,
    }


def rank_summary(
    ranks: InstanceRanks, instances: Sequence[InstanceInfo], class_names: Sequence[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Overall and per-size statistics, and one row per instance that has candidates.

    ``ranks.instance_ids`` index ``instances``; objects without any candidate
    appear only in the counts (there is nothing to rank).
    """
    sizes = np.array([size_class(instances[i].area) for i in ranks.instance_ids], dtype=object)
    rows = []
    for k, instance_id in enumerate(ranks.instance_ids.tolist()):
        info = instances[instance_id]
        rows.append(
            {
                "image_id": info.image_id,
                "object": info.index,
                "class": class_names[info.label] if info.label < len(class_names) else info.label,
                "area": info.area,
                "size": sizes[k],
                "num_candidates": int(ranks.num_candidates[k]),
                "spearman": float(ranks.spearman[k]),
                "kendall": float(ranks.kendall[k]),
                "top1_differs": bool(ranks.top1_differs[k]),
            }
        )
    everything = np.ones(len(ranks), dtype=bool)
    summary = {
        "instances_total": len(instances),
        "instances_without_candidates": sum(1 for i in instances if i.num_candidates == 0),
        **_group(ranks, everything),
        "by_size": {name: _group(ranks, sizes == name) for name in SIZE_CLASSES},
    }
    return summary, rows
