"""Small NumPy drawing primitives shared by the embedded scene generators.

Why signed distances: an alpha of ``clip(0.5 - sdf, 0, 1)`` gives anti-aliased
edges at any size for the cost of a few array operations per object, which is
what keeps thousands of scenes within seconds.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def local_grid(
    cx: float, cy: float, radius: float, size: int
) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Window around ``(cx, cy)`` clipped to a ``size`` square canvas, and pixel-centre coords in it.

    Returns ``(rows, cols, x, y)`` with ``x, y`` relative to the centre.
    """
    r = int(np.ceil(radius)) + 2
    x0, x1 = max(0, int(cx) - r), min(size, int(cx) + r + 1)
    y0, y1 = max(0, int(cy) - r), min(size, int(cy) + r + 1)
    xs = np.arange(x0, x1, dtype=np.float32) + 0.5 - cx
    ys = np.arange(y0, y1, dtype=np.float32) + 0.5 - cy
    return slice(y0, y1), slice(x0, x1), xs[None, :], ys[:, None]


def rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in a frame rotated by ``angle`` radians (broadcasts row/column vectors)."""
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def alpha_from_sdf(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (negative inside)."""
    return np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)


def segment_sdf(
    x: np.ndarray, y: np.ndarray, ax: float, ay: float, bx: float, by: float, width: float
) -> np.ndarray:
    """Signed distance to a stroke of ``width`` from ``a`` to ``b``."""
    dx, dy = bx - ax, by - ay
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / max(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
    return np.hypot(x - ax - t * dx, y - ay - t * dy) - width / 2


def blend(
    canvas: np.ndarray, rows: slice, cols: slice, alpha: np.ndarray, colour: np.ndarray
) -> None:
    """``canvas = canvas * (1 - alpha) + colour * alpha`` in the window, in place.

    ``colour`` is an RGB triple or an (h, w, 3) texture of the window's shape.
    """
    a = alpha[..., None]
    region = canvas[rows, cols]
    region *= 1.0 - a
    region += a * colour


def ink_box(
    alpha: np.ndarray, rows: slice, cols: slice, threshold: float
) -> tuple[int, int, int, int] | None:
    """Tight integer box ``(x1, y1, x2, y2)`` (exclusive ends) of pixels with ``alpha >= threshold``."""
    ink = alpha >= threshold
    ys = np.flatnonzero(ink.any(axis=1))
    xs = np.flatnonzero(ink.any(axis=0))
    if len(xs) == 0 or len(ys) == 0:
        return None
    return (
        cols.start + int(xs[0]),
        rows.start + int(ys[0]),
        cols.start + int(xs[-1]) + 1,
        rows.start + int(ys[-1]) + 1,
    )


def smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 1) -> np.ndarray:
    """Low-frequency noise in [0, 1], (size, size, channels): a ``cells`` grid upsampled bilinearly."""
    grid = rng.random((cells, cells, channels), dtype=np.float32)
    out = np.empty((size, size, channels), dtype=np.float32)
    for c in range(channels):
        img = Image.fromarray(grid[..., c], mode="F").resize(
            (size, size), Image.Resampling.BILINEAR
        )
        out[..., c] = np.asarray(img)
    return out


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of RGB values in [0, 1] (last axis)."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def contrasting_colour(
    rng: np.random.Generator, background_luma: float, min_diff: float
) -> np.ndarray:
    """A random RGB colour whose luma differs from ``background_luma`` by at least ``min_diff``."""
    colour = rng.random(3, dtype=np.float32)
    diff = float(luminance(colour)) - background_luma
    if abs(diff) < min_diff:
        direction = float(np.sign(diff)) or (1.0 if background_luma < 0.5 else -1.0)
        if not 0.0 <= background_luma + direction * min_diff <= 1.0:
            direction = -direction
        shift = background_luma + direction * min_diff - float(luminance(colour))
        colour = np.clip(colour + shift, 0.0, 1.0)
    return colour.astype(np.float32)


def box_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box's area (0 when disjoint)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(small, 1)


def to_uint8(canvas: np.ndarray) -> np.ndarray:
    """[0, 1] float image to uint8, rounding."""
    return (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
