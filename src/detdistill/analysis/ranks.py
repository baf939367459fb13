"""How differently teacher and student rank the candidate boxes of each object.

Observation 1 of Li et al. (AAAI 2022): the precision gap
comes from the *order* in which the two networks score an object's candidates
(which box survives NMS), not from the absolute scores. Rank correlations per
ground-truth instance measure exactly that order, so they are invariant to any
monotone change of scale (logit, probability, sqrt(cls * quality)).

Inputs follow :func:`detdistill.losses.rank_mimicking_loss`: one row per
candidate (positive anchor) with an integer instance id; ids need not be
contiguous or sorted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

__all__ = ["InstanceRanks", "rank_statistics", "summarize"]


@dataclass
class InstanceRanks:
    """Per-instance results, one entry per distinct instance id (sorted by id).

    ``spearman``/``kendall`` are NaN where they are undefined: fewer than two
    candidates, or either network giving all candidates the same score.
    ``top1_differs`` is True when no candidate is best for both networks
    (ties count as "best", so a network that scores all candidates alike has
    no preference and never disagrees); always False for one candidate. ``comparable`` marks instances with >= 2 candidates, the
    ones whose top-1 can differ at all.
    """

    instance_ids: np.ndarray  # (M,) int64
    num_candidates: np.ndarray  # (M,) int64
    spearman: np.ndarray  # (M,) float64
    kendall: np.ndarray  # (M,) float64
    top1_differs: np.ndarray  # (M,) bool

    def __len__(self) -> int:
        return int(self.instance_ids.size)

    @property
    def comparable(self) -> np.ndarray:
        return self.num_candidates >= 2

    def top1_disagreement(self) -> float:
        """Share of instances with >= 2 candidates whose top-1 differs (NaN if none)."""
        mask = self.comparable
        return float(self.top1_differs[mask].mean()) if mask.any() else math.nan


def _as_numpy(x: np.ndarray | torch.Tensor, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy() if dtype is np.float64 else x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def _correlations(t: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """Spearman rho and Kendall tau-b (scipy's tie handling), NaN when undefined.

    Undefined cases are detected here instead of letting scipy emit a
    ConstantInputWarning per instance (thousands per COCO run).
    """
    if t.size < 2 or np.ptp(t) == 0 or np.ptp(s) == 0:
        return math.nan, math.nan
    rho = float(stats.spearmanr(t, s).statistic)
    tau = float(stats.kendalltau(t, s).statistic)
    return rho, tau


def rank_statistics(
    teacher_scores: np.ndarray | torch.Tensor,
    student_scores: np.ndarray | torch.Tensor,
    instance_ids: np.ndarray | torch.Tensor,
) -> InstanceRanks:
    """Spearman rho, Kendall tau and top-1 agreement of every instance's candidates.

    Args:
        teacher_scores, student_scores: (P,) score of the instance's class for
            each candidate; any monotone score gives the same result.
        instance_ids: (P,) integer instance id of each candidate.

    Returns:
        :class:`InstanceRanks` with one entry per distinct id; empty (length 0)
        when ``P == 0``.
    """
    t = _as_numpy(teacher_scores, np.float64)
    s = _as_numpy(student_scores, np.float64)
    ids = _as_numpy(instance_ids, np.int64)
    if not (t.shape == s.shape == ids.shape):
        raise ValueError(
            f"teacher_scores, student_scores and instance_ids must have one length, got "
            f"{t.size}, {s.size}, {ids.size}"
        )
    if not (np.isfinite(t).all() and np.isfinite(s).all()):
        raise ValueError("scores must be finite")
    unique, dense, counts = np.unique(ids, return_inverse=True, return_counts=True)
    # Group candidates by instance with one stable sort instead of M boolean masks.
    order = np.argsort(dense, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts)])
    m = unique.size
    rho, tau = np.full(m, math.nan), np.full(m, math.nan)
    top1_differs = np.zeros(m, dtype=bool)
    for j in range(m):
        sel = order[bounds[j] : bounds[j + 1]]
        t_j, s_j = t[sel], s[sel]
        rho[j], tau[j] = _correlations(t_j, s_j)
        top1_differs[j] = not np.any((t_j == t_j.max()) & (s_j == s_j.max()))
    return InstanceRanks(
        instance_ids=unique.astype(np.int64),
        num_candidates=counts.astype(np.int64),
        spearman=rho,
        kendall=tau,
        top1_differs=top1_differs,
    )


def summarize(values: np.ndarray) -> dict[str, float | int]:
    """Mean, median and count of the finite values; NaN mean/median (no warning) when none."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": math.nan, "median": math.nan, "count": 0}
    return {
        "mean": float(finite.mean()),
        "median": float(np.median(finite)),
        "count": int(finite.size),
    }
