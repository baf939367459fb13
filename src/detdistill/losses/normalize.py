"""Scale-free feature comparison: per-channel standardisation of FPN features.

Feature imitation compares ``phi(F^s)`` with ``F^t``. Its size is the size of
the teacher's activations, which differs by orders of magnitude between
backbones, FPN levels and data sets, so a loss weight tuned on one pair means
nothing on another (one FPN level can also dominate the sum). Standardising
each channel first, as PKD does (Cao et al., "PKD: General Distillation
Framework for Object Detectors via Pearson Correlation Coefficient", NeurIPS
2022), removes that scale::

    F_hat[n,c,h,w] = (F[n,c,h,w] - mu_c) / sqrt(var_c + eps),
    mu_c, var_c = mean and (biased) variance of channel c over n, h, w

applied to the student's (adapted) and the teacher's features separately.
Then ``mean_c (F_hat^s - F_hat^t)^2`` at a location averages to
``2 (1 - rho)`` over the level, with ``rho`` the per-channel Pearson
correlation: a number in [0, 4] on any data, any detector and any level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor

FeatureNorm = Literal["none", "channel"]
FEATURE_NORMS: tuple[str, ...] = ("none", "channel")
EPS = 1e-6


def standardize_channels(features: Tensor, eps: float = EPS) -> Tensor:
    """(N, C, H, W) -> the same, each channel with zero mean and unit variance over N, H, W."""
    mean = features.mean(dim=(0, 2, 3), keepdim=True)
    var = features.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
    return (features - mean) * (var + eps).rsqrt()


def normalize_features(
    student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], feature_norm: FeatureNorm
) -> tuple[list[Tensor], list[Tensor]]:
    """Both lists as given (``"none"``) or standardised per channel (``"channel"``).

    The teacher's features are detached either way: they are targets.
    """
    if feature_norm not in FEATURE_NORMS:
        raise ValueError(f"feature_norm must be 'none' or 'channel', got {feature_norm!r}")
    teacher = [f.detach() for f in teacher_feats]
    if feature_norm == "none":
        return list(student_feats), teacher
    return [standardize_channels(f) for f in student_feats], [
        standardize_channels(f) for f in teacher
    ]
