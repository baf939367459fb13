"""Distillation losses: pure tensor functions, each with the named method built on it.

Importing this package registers every built-in method (each module registers
the methods it defines; :mod:`~detdistill.losses.methods` holds the base class
and the registry).
"""

from detdistill.losses.batch import DistillBatch, IncompatibleModelsError
from detdistill.losses.crosskd import CrossHeadKD
from detdistill.losses.feature_imitation import (
    decoupled_feature_loss,
    feature_imitation_loss,
    score_weighted_imitation,
)
from detdistill.losses.localization import localization_distillation_loss
from detdistill.losses.masks import box_center_masks, fgfi_masks
from detdistill.losses.methods import (
    DistillMethod,
    build_method,
    list_methods,
    register_method,
)
from detdistill.losses.pfi import feature_difference, pfi_loss, prediction_difference
from detdistill.losses.rank_mimicking import Candidates, rank_mimicking_loss
from detdistill.losses.soft_label import soft_label_kd_loss
from detdistill.losses.taps import NECK, Tap, tower
from detdistill.models.output import flatten_levels

__all__ = [
    "NECK",
    "Candidates",
    "CrossHeadKD",
    "DistillBatch",
    "DistillMethod",
    "IncompatibleModelsError",
    "Tap",
    "box_center_masks",
    "build_method",
    "decoupled_feature_loss",
    "feature_difference",
    "feature_imitation_loss",
    "fgfi_masks",
    "flatten_levels",
    "list_methods",
    "localization_distillation_loss",
    "pfi_loss",
    "prediction_difference",
    "rank_mimicking_loss",
    "register_method",
    "score_weighted_imitation",
    "soft_label_kd_loss",
    "tower",
]
