"""``digits_large``: large scenes with small digits, the aerial-photograph regime.

Square scenes of ``image_size / 2`` to ``image_size`` pixels per side (1024 to
2048 with ``image_size: 2048``) on the same photograph backgrounds as
``digits``, with digits whose ink is about 12 to 40 px high (log-uniform), about 30 per
1024 x 1024 px, scattered with at most ``MAX_OVERLAP`` intersection over the
smaller box. Resized whole to a 256 px training size, a 20 px digit of a
2048 px scene becomes 2.5 px: the set exists to show what tiled training and
sliced evaluation buy (:mod:`detdistill.data.tiles`, :mod:`detdistill.slicing`).
Same digit scans and train/val split of the scans as ``digits``.
"""

from __future__ import annotations

import numpy as np

from detdistill.data.embedded.digits import (
    CLASS_NAMES,
    INK_THRESHOLD,
    MAX_OVERLAP,
    _background,
    _digits,
    _ink_colour,
    _pool,
    _render_digit,
)
from detdistill.data.embedded.render import blend, box_overlap, ink_box

__all__ = ["CLASS_NAMES", "FILE_EXT", "VERSION", "generate_scene"]

FILE_EXT = ".jpg"
VERSION = 1
MIN_HEIGHT, MAX_HEIGHT = 15, 50  # glyph heights: ink boxes of about 12 to 40 px
DIGITS_PER_MEGAPIXEL = 30


def generate_scene(
    rng: np.random.Generator, size: int, split: str
) -> tuple[np.ndarray, list[tuple[int, int, int, int]], list[int]]:
    """One scene: float32 (side, side, 3) in [0, 1] with ``size / 2 <= side <= size``, boxes, labels."""
    glyphs, _ = _digits()
    pool = _pool(split)
    side = int(rng.integers(size // 2, size + 1))
    canvas = _background(rng, side)
    wanted = int(rng.poisson(DIGITS_PER_MEGAPIXEL * (side / 1024) ** 2)) + 1
    boxes: list[tuple[int, int, int, int]] = []
    labels: list[int] = []
    lo, hi = np.log(MIN_HEIGHT), np.log(MAX_HEIGHT)
    for _attempt in range(4 * wanted):
        if len(labels) == wanted:
            break
        digit = int(rng.integers(10))
        glyph = glyphs[int(rng.choice(pool[digit]))]
        height = float(np.exp(rng.uniform(lo, hi)))
        cx, cy = rng.uniform(height, side - height, 2)
        rows, cols, alpha = _render_digit(rng, glyph, height, side, cx, cy)
        box = ink_box(alpha, rows, cols, INK_THRESHOLD)
        if box is None or min(box[2] - box[0], box[3] - box[1]) < 2:
            continue
        if any(box_overlap(box, other) > MAX_OVERLAP for other in boxes):
            continue
        blend(
            canvas, rows, cols, alpha * rng.uniform(0.75, 1.0), _ink_colour(rng, canvas, rows, cols)
        )
        boxes.append(box)
        labels.append(digit)
    noise = rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(
        rng.uniform(0.0, 0.035)
    )
    canvas += noise
    return np.clip(canvas, 0, 1, out=canvas), boxes, labels
