"""Vectorised box checks shared by the COCO and VOC loaders.

Why one place: both loaders must repair boxes the same way and count every
repair under the same problem kinds (see :mod:`detdistill.data.problems`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Excess beyond the image border (pixels) treated as float noise, not a problem.
CLIP_TOLERANCE = 0.01


@dataclass
class SanitizedBoxes:
    """Result of :func:`sanitize_boxes`: clipped boxes, a keep mask and per-kind masks."""

    boxes: np.ndarray  # (N, 4) float32 xyxy, clipped to the image
    keep: np.ndarray  # (N,) bool
    kinds: dict[str, np.ndarray]  # problem kind -> (N,) bool


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """COCO ``[x, y, w, h]`` to ``[x1, y1, x2, y2]`` (float64 to keep COCO's precision)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def sanitize_boxes(xyxy: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> SanitizedBoxes:
    """Drop non-finite and non-positive boxes, clip the rest to their image.

    Kinds (each box gets at most one): ``box_nonfinite`` and
    ``box_nonpositive_size`` (dropped), ``box_outside_image`` (nothing left after
    clipping, dropped), ``box_clipped`` (kept, clipped). Excess up to
    :data:`CLIP_TOLERANCE` px is clipped without being counted.
    """
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    w = np.asarray(widths, dtype=np.float64).reshape(-1)
    h = np.asarray(heights, dtype=np.float64).reshape(-1)
    finite = np.isfinite(xyxy).all(axis=1)
    safe = np.where(finite[:, None], xyxy, 0.0)
    positive = finite & (safe[:, 2] > safe[:, 0]) & (safe[:, 3] > safe[:, 1])
    clipped = np.stack(
        [
            np.clip(safe[:, 0], 0, w),
            np.clip(safe[:, 1], 0, h),
            np.clip(safe[:, 2], 0, w),
            np.clip(safe[:, 3], 0, h),
        ],
        axis=1,
    )
    inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    moved = (np.abs(clipped - safe) > CLIP_TOLERANCE).any(axis=1)
    kinds = {
        "box_nonfinite": ~finite,
        "box_nonpositive_size": finite & ~positive,
        "box_outside_image": positive & ~inside,
        "box_clipped": positive & inside & moved,
    }
    return SanitizedBoxes(clipped.astype(np.float32), positive & inside, kinds)
