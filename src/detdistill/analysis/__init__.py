"""Analysis of a teacher/student pair: the two observations of Li et al. (AAAI 2022) on your models.

1. Rank agreement: per ground-truth object, how alike teacher and student
   order its candidate boxes (:mod:`~detdistill.analysis.ranks`).
2. Feature vs prediction difference: per FPN level, whether the locations
   where features differ are those where predictions differ
   (:mod:`~detdistill.analysis.features`).

:func:`run_analysis` (``detdistill analyze``) measures both on a data set
and writes ``analysis.json``, figures and ``report.md``.
"""

from detdistill.analysis.adapter import ChannelMap, ChannelMapFitter, fit_channel_map
from detdistill.analysis.features import (
    feature_maps,
    level_correlations,
    pearson_r,
    prediction_maps,
    spearman_r,
)
from detdistill.analysis.ranks import InstanceRanks, rank_statistics, summarize
from detdistill.analysis.run import run_analysis
from detdistill.analysis.summary import size_class

__all__ = [
    "ChannelMap",
    "ChannelMapFitter",
    "InstanceRanks",
    "feature_maps",
    "fit_channel_map",
    "level_correlations",
    "pearson_r",
    "prediction_maps",
    "rank_statistics",
    "run_analysis",
    "size_class",
    "spearman_r",
    "summarize",
]
