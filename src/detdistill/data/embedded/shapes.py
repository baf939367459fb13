"""``shapes``: procedural scenes of six shape classes, for fast tests and smoke runs.

Why these ingredients: textured fills, gradient/noise backgrounds, clutter
(thin strokes, elongated blobs), occlusion and sizes from 8 px to most of the
image make every FPN level and the class confusions (circle/ring, square/cross
at small sizes) matter, while a scene costs well under a millisecond.

Boxes are tight around each whole shape (coverage >= 0.5); a later shape may
hide at most :data:`MAX_OCCLUDED` of an earlier one. About 3 % of the scenes
are negatives (no shapes). Class frequencies are imbalanced on purpose
(:data:`CLASS_WEIGHTS`).
"""

from __future__ import annotations

import numpy as np

from detdistill.data.embedded.render import (
    alpha_from_sdf,
    blend,
    contrasting_colour,
    ink_box,
    local_grid,
    luminance,
    rotate,
    segment_sdf,
    smooth_noise,
)

CLASS_NAMES: tuple[str, ...] = ("square", "circle", "triangle", "cross", "ring", "star")
CLASS_WEIGHTS = np.array([0.24, 0.22, 0.18, 0.14, 0.12, 0.10])
MAX_OCCLUDED = 0.4
FILE_EXT = ".jpg"
VERSION = 1


def _sdf(kind: int, x: np.ndarray, y: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """Signed distance (pixels) of shape ``kind`` with outer radius ``r`` at the origin."""
    if kind == 0:  # square
        return np.maximum(np.abs(x), np.abs(y)) - r * 0.78
    if kind == 1:  # circle
        return np.hypot(x, y) - r
    if kind == 2:  # triangle (equilateral, circumradius r)
        d = None
        for k in range(3):
            a = np.pi / 2 + k * 2 * np.pi / 3
            e = np.cos(a) * x + np.sin(a) * y - r / 2
            d = e if d is None else np.maximum(d, e)
        return d
    if kind == 3:  # cross
        t = r * rng.uniform(0.25, 0.4)
        a = np.maximum(np.abs(x) - r * 0.9, np.abs(y) - t)
        b = np.maximum(np.abs(x) - t, np.abs(y) - r * 0.9)
        return np.minimum(a, b)
    if kind == 4:  # ring
        w = r * rng.uniform(0.22, 0.45)
        return np.abs(np.hypot(x, y) - (r - w / 2)) - w / 2
    # star: five points, inner radius ~0.45 r; straight edges from tip to inner vertex
    inner = r * rng.uniform(0.38, 0.5)
    sector = 2 * np.pi / 5
    phi = np.abs(np.mod(np.arctan2(y, x) + sector / 2, sector) - sector / 2)
    rho = np.hypot(x, y)
    p1 = np.array([r, 0.0])
    p2 = inner * np.array([np.cos(sector / 2), np.sin(sector / 2)])
    edge = p2 - p1
    normal = np.array([edge[1], -edge[0]]) / np.hypot(*edge)
    if normal @ p1 < 0:
        normal = -normal
    return normal[0] * (rho * np.cos(phi) - p1[0]) + normal[1] * (rho * np.sin(phi) - p1[1])


def _texture(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, base: np.ndarray
) -> np.ndarray:
    """Fill of the object's window: solid, stripes, checks or a gradient around ``base``."""
    h, w = y.shape[0], x.shape[1]
    kind = rng.choice(4, p=[0.5, 0.2, 0.15, 0.15])
    if kind == 0:
        return np.broadcast_to(base, (h, w, 3))
    other = np.clip(base + rng.uniform(-0.35, 0.35, 3), 0, 1).astype(np.float32)
    u, _ = rotate(x, y, rng.uniform(0, np.pi))
    period = rng.uniform(3.0, 8.0)
    if kind == 1:
        m = (np.sin(u * 2 * np.pi / period) > 0).astype(np.float32)
    elif kind == 2:
        m = ((np.floor(x / period) + np.floor(y / period)) % 2).astype(np.float32)
    else:
        m = np.clip(u / max(float(np.abs(u).max()), 1.0) * 0.5 + 0.5, 0, 1)
    m = np.broadcast_to(m, (h, w))[..., None]
    return base * (1 - m) + other * m


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    c1, c2 = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
    u = np.linspace(0, 1, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    g = np.clip(ca * u[None, :] + sa * u[:, None], 0, 1)[..., None]
    canvas = c1 * (1 - g) + c2 * g
    canvas += (smooth_noise(rng, size, int(rng.integers(3, 9)), 3) - 0.5) * np.float32(
        rng.uniform(0.1, 0.5)
    )
    return np.clip(canvas, 0, 1, out=canvas)


def _clutter(rng: np.random.Generator, canvas: np.ndarray, size: int) -> None:
    """Unlabelled distractors: strokes and elongated blobs."""
    for _ in range(int(rng.integers(0, 7))):
        cx, cy = rng.uniform(0, size, 2)
        length = rng.uniform(6, size * 0.5)
        rows, cols, x, y = local_grid(cx, cy, length / 2 + 3, size)
        if rng.random() < 0.6:
            a = rng.uniform(0, np.pi)
            dx, dy = np.cos(a) * length / 2, np.sin(a) * length / 2
            sdf = segment_sdf(x, y, -dx, -dy, dx, dy, rng.uniform(1.0, 3.0))
        else:
            u, v = rotate(x, y, rng.uniform(0, np.pi))
            sdf = (np.hypot(u / (length / 2), v / (length / rng.uniform(6, 12))) - 1) * length / 4
        blend(
            canvas,
            rows,
            cols,
            alpha_from_sdf(sdf) * rng.uniform(0.4, 1.0),
            rng.random(3, dtype=np.float32),
        )


def generate_scene(
    rng: np.random.Generator, size: int, split: str
) -> tuple[np.ndarray, list[tuple[int, int, int, int]], list[int]]:
    """One scene: float32 (size, size, 3) in [0, 1], integer xyxy boxes, labels."""
    canvas = _background(rng, size)
    _clutter(rng, canvas, size)
    n = 0 if rng.random() < 0.03 else int(rng.integers(1, 9))
    owner = np.full((size, size), -1, dtype=np.int16)
    full_area: list[int] = []
    visible: list[int] = []
    boxes: list[tuple[int, int, int, int]] = []
    labels: list[int] = []
    lo, hi = np.log(8.0 * size / 128), np.log(0.8 * size)
    for _ in range(n):
        for _attempt in range(10):
            kind = int(rng.choice(len(CLASS_NAMES), p=CLASS_WEIGHTS))
            r = float(np.exp(rng.uniform(lo, hi))) / 2
            cx, cy = rng.uniform(r * 0.8, size - r * 0.8, 2)
            rows, cols, x, y = local_grid(cx, cy, r, size)
            u, v = rotate(x, y, rng.uniform(0, 2 * np.pi) if kind != 0 else rng.uniform(-0.3, 0.3))
            alpha = alpha_from_sdf(_sdf(kind, u, v, r, rng))
            box = ink_box(alpha, rows, cols, 0.5)
            if box is None or box[2] - box[0] < 4 or box[3] - box[1] < 4:
                continue
            covered = alpha >= 0.5
            hidden = np.bincount(owner[rows, cols][covered] + 1, minlength=len(boxes) + 1)[1:]
            if any(
                visible[j] - hidden[j] < (1 - MAX_OCCLUDED) * full_area[j]
                for j in range(len(boxes))
            ):
                continue
            region = canvas[rows, cols]
            local_luma = float(luminance(region.reshape(-1, 3).mean(0)))
            colour = contrasting_colour(rng, local_luma, rng.uniform(0.12, 0.45))
            blend(canvas, rows, cols, alpha, _texture(rng, x, y, colour))
            for j in range(len(boxes)):
                visible[j] -= int(hidden[j])
            owner[rows, cols][covered] = len(boxes)
            full_area.append(int(covered.sum()))
            visible.append(int(covered.sum()))
            boxes.append(box)
            labels.append(kind)
            break
    noise = rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(rng.uniform(0.0, 0.04))
    canvas += noise
    return np.clip(canvas, 0, 1, out=canvas), boxes, labels
