"""Where teacher and student features differ versus where their predictions differ.

Observation 2 of Li et al. (AAAI 2022): the locations with the
largest feature difference ``D`` are not the ones with the largest prediction
difference ``P``, so imitating every location equally wastes effort. Both maps
use PFI's definitions (docs/methods.md) (through :func:`detdistill.losses.feature_difference`
and :func:`detdistill.losses.prediction_difference`), and their agreement per
FPN level is measured by the Pearson correlation over all analysed locations
(Spearman alongside, since both maps are heavy-tailed).

Maps are cropped to each image's valid (unpadded) region: padding is the same
zeros for both networks, and including it would add agreeing, uninformative
locations that inflate the correlation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from detdistill.losses import feature_difference, prediction_difference

__all__ = [
    "feature_maps",
    "level_correlations",
    "pearson_r",
    "prediction_maps",
    "spearman_r",
    "valid_grid",
]

Adapter = Callable[[Tensor], Tensor]


def valid_grid(image_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Cells of a level's grid that see the valid image region: ``ceil(size / stride)``."""
    h, w = image_size
    return math.ceil(h / stride), math.ceil(w / stride)


def _crop(maps: Tensor, image_sizes: Sequence[tuple[int, int]], stride: int) -> list[Tensor]:
    out = []
    for n, size in enumerate(image_sizes):
        gh, gw = valid_grid(size, stride)
        out.append(maps[n, :gh, :gw].float().cpu())
    return out


def prediction_maps(
    student_logits: Sequence[Tensor],
    teacher_logits: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
) -> list[list[Tensor]]:
    """``P_l`` per image then per level, (H_l', W_l') each, cropped to the valid region."""
    per_level = [
        _crop(prediction_difference(z_s.float(), z_t.float()), image_sizes, stride)
        for z_s, z_t, stride in zip(student_logits, teacher_logits, strides, strict=True)
    ]
    return [list(maps) for maps in zip(*per_level, strict=True)]


def feature_maps(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    adapters: Sequence[Adapter],
    image_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
) -> list[list[Tensor]]:
    """``D_l = mean_c (phi_l(F^s_l) - F^t_l)^2`` per image then per level, cropped."""
    per_level = [
        _crop(feature_difference(phi(f_s.float()), f_t.float()), image_sizes, stride)
        for f_s, f_t, phi, stride in zip(
            student_feats, teacher_feats, adapters, strides, strict=True
        )
    ]
    return [list(maps) for maps in zip(*per_level, strict=True)]


def _finite_pair(x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64).reshape(-1)
    y = np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same number of values, got {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def pearson_r(x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> float:
    """``scipy.stats.pearsonr`` over the finite pairs; NaN (no warning) when undefined.

    Undefined: fewer than two pairs, or either side constant (e.g. identical
    teacher and student give ``P == 0`` everywhere).
    """
    x, y = _finite_pair(x, y)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.pearsonr(x, y).statistic)


def spearman_r(x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> float:
    """``scipy.stats.spearmanr`` over the finite pairs; NaN when undefined."""
    x, y = _finite_pair(x, y)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def level_correlations(
    d_maps: Sequence[Sequence[Tensor]],
    p_maps: Sequence[Sequence[Tensor]],
    strides: Sequence[int],
) -> list[dict[str, float | int]]:
    """Per level: Pearson/Spearman of D vs P over every location of every image, and means.

    ``d_maps``/``p_maps`` are indexed [image][level] as returned by
    :func:`feature_maps` and :func:`prediction_maps`.
    """
    rows: list[dict[str, float | int]] = []
    for level, stride in enumerate(strides):
        d = torch.cat([maps[level].reshape(-1) for maps in d_maps]) if d_maps else torch.zeros(0)
        p = torch.cat([maps[level].reshape(-1) for maps in p_maps]) if p_maps else torch.zeros(0)
        rows.append(
            {
                "level": level,
                "stride": int(stride),
                "locations": int(d.numel()),
                "pearson_r": pearson_r(d, p),
                "spearman_r": spearman_r(d, p),
                "mean_D": float(d.double().mean()) if d.numel() else math.nan,
                "mean_P": float(p.double().mean()) if p.numel() else math.nan,
            }
        )
    return rows
