"""``digits``: real handwritten digits on crops of real photographs, the default benchmark.

Why this is hard enough to separate teacher and student: digits are small
(10-60 px at 128 px), thin and sometimes faint, their contrast with a textured
photo varies (some barely visible), they are rotated and sheared, and the
scenes contain unlabelled look-alikes (parts of digits, pen strokes, the text
in some photographs). Why it is fair: the digits are scikit-learn's 1797 real
8x8 scans, upsampled smoothly, and boxes are tight around the ink.

Train and val use disjoint digit scans (``index % 5 == 0`` are val), so val
measures generalisation to unseen handwriting; both use all photographs, with
independent random crops.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from detdistill.data.embedded.render import (
    alpha_from_sdf,
    blend,
    box_overlap,
    contrasting_colour,
    ink_box,
    local_grid,
    luminance,
    segment_sdf,
)

CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))
FILE_EXT = ".jpg"
VERSION = 3
#: ``skimage.data`` images that ship inside the package (no download needed).
PHOTOS: tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "brick", "grass", "gravel",
    "text", "moon", "page", "hubble_deep_field", "immunohistochemistry", "cell", "clock",
    "retina",
)  # fmt: skip
INK_THRESHOLD = 0.3  # alpha at or above this is "ink" for the box
MAX_OVERLAP = 0.2  # intersection over the smaller box, between digits (and partial digits)
# Digit heights at 128 px, log-uniform: small enough that a tiny detector must work for
# them (stride 8 is the finest level), large enough to be learnable in a CPU budget.
MIN_HEIGHT, MAX_HEIGHT = 20, 64
_UPSAMPLE = 4  # digits are pre-upsampled 8x8 -> 32x32 with cubic splines, then sampled bilinearly


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits, upsampled smoothly to 32x32 in [0, 1], and their labels."""
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images.astype(np.float32) / 16.0
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))  # zero border so strokes fade out
    big = zoom(padded, (1, _UPSAMPLE, _UPSAMPLE), order=3, mode="grid-constant", grid_mode=True)
    return np.clip(big, 0, 1).astype(np.float32), data.target.astype(np.int64)


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """Offline photographs from scikit-image and scikit-learn as RGB uint8 arrays."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = []
    for name in PHOTOS:
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception:  # an image this scikit-image cannot load offline is skipped
            continue
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        photos.append(np.ascontiguousarray(img[..., :3].astype(np.uint8)))
    photos.extend(np.asarray(img, dtype=np.uint8) for img in load_sample_images().images)
    if len(photos) < 4:
        raise RuntimeError("too few offline photographs available for the digits data set")
    return tuple(photos)


@lru_cache(maxsize=2)
def _pool(split: str) -> dict[int, np.ndarray]:
    """Indices of each digit's scans in ``split`` (every fifth scan is val)."""
    _, labels = _digits()
    index = np.arange(len(labels))
    mask = index % 5 == 0 if split == "val" else index % 5 != 0
    return {d: index[mask & (labels == d)] for d in range(10)}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    photos = _photos()
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.25, 1.0))
    side = max(side, min(h, w, size // 2))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[y0 : y0 + side, x0 : x0 + side]).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    img = np.asarray(crop, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if rng.random() < 0.2:
        img = np.repeat(luminance(img)[..., None], 3, axis=2)
    contrast, brightness = rng.uniform(0.6, 1.2), rng.uniform(-0.15, 0.15)
    mean = img.mean()
    return np.clip((img - mean) * contrast + mean + brightness, 0, 1).astype(np.float32)


def _render_digit(
    rng: np.random.Generator, glyph: np.ndarray, height: float, size: int, cx: float, cy: float
) -> tuple[slice, slice, np.ndarray]:
    """Warp a 32x32 glyph (scale, aspect, rotation, shear) into the canvas window at ``(cx, cy)``.

    Returns the window and the ink alpha (thresholded with a random soft ramp,
    which varies stroke thickness and crispness).
    """
    gh = glyph.shape[0]
    width = height * rng.uniform(0.7, 1.05)
    angle, shear = rng.uniform(-0.25, 0.25), rng.uniform(-0.2, 0.2)
    c, s = np.cos(angle), np.sin(angle)
    # forward: glyph unit square -> canvas offset; M maps (gx, gy) in [-0.5, 0.5] to pixels
    m = (
        np.array([[c, -s], [s, c]])
        @ np.array([[1.0, shear], [0.0, 1.0]])
        @ np.diag([width, height])
    )
    inv = np.linalg.inv(m)
    radius = 0.5 * float(np.abs(m).sum(axis=1).max())
    rows, cols, x, y = local_grid(cx, cy, radius, size)
    gx = (inv[0, 0] * x + inv[0, 1] * y + 0.5) * gh - 0.5
    gy = (inv[1, 0] * x + inv[1, 1] * y + 0.5) * gh - 0.5
    x0, y0 = np.floor(gx).astype(np.int32), np.floor(gy).astype(np.int32)
    fx, fy = gx - x0, gy - y0
    padded = np.pad(glyph, 1)
    x0c, y0c = np.clip(x0 + 1, 0, gh + 1), np.clip(y0 + 1, 0, gh + 1)
    x1c, y1c = np.clip(x0 + 2, 0, gh + 1), np.clip(y0 + 2, 0, gh + 1)
    v = (
        padded[y0c, x0c] * (1 - fx) * (1 - fy)
        + padded[y0c, x1c] * fx * (1 - fy)
        + padded[y1c, x0c] * (1 - fx) * fy
        + padded[y1c, x1c] * fx * fy
    )
    outside = (gx < -1) | (gx > gh) | (gy < -1) | (gy > gh)
    v = np.where(outside, 0.0, v)
    t0 = rng.uniform(0.4, 0.62)
    alpha = np.clip((v - t0) / rng.uniform(0.06, 0.2), 0.0, 1.0).astype(np.float32)
    return rows, cols, alpha


def _ink_colour(
    rng: np.random.Generator, canvas: np.ndarray, rows: slice, cols: slice
) -> np.ndarray:
    """Pen-like (dark or greyish) 40 % of the time, any colour otherwise; faint 10 % of the time."""
    local = float(luminance(canvas[rows, cols].reshape(-1, 3).mean(0)))
    # mostly clear, sometimes faint: the faint tail is what separates big and small models
    min_diff = rng.uniform(0.15, 0.25) if rng.random() < 0.1 else rng.uniform(0.3, 0.6)
    colour = contrasting_colour(rng, local, min_diff)
    if rng.random() < 0.4:
        grey = float(luminance(colour))
        colour = np.clip(grey + (colour - grey) * rng.uniform(0.0, 0.4), 0, 1).astype(np.float32)
    return colour


def _distractors(
    rng: np.random.Generator, canvas: np.ndarray, size: int, split: str, taken: list
) -> None:
    """Unlabelled look-alikes: parts of digits and pen strokes of digit-like width."""
    glyphs, _ = _digits()
    pool = np.concatenate(list(_pool(split).values()))
    scale = size / 128
    for _ in range(int(rng.integers(0, 2))):  # partial digits: keep 30-55 % of one side
        glyph = glyphs[int(rng.choice(pool))].copy()
        keep = int(glyph.shape[0] * rng.uniform(0.3, 0.55))
        side = int(rng.integers(4))
        if side == 0:
            glyph[keep:] = 0
        elif side == 1:
            glyph[:-keep] = 0
        elif side == 2:
            glyph[:, keep:] = 0
        else:
            glyph[:, :-keep] = 0
        height = float(np.exp(rng.uniform(np.log(MIN_HEIGHT * scale), np.log(MAX_HEIGHT * scale))))
        cx, cy = rng.uniform(height / 2, size - height / 2, 2)
        rows, cols, alpha = _render_digit(rng, glyph, height, size, cx, cy)
        box = ink_box(alpha, rows, cols, INK_THRESHOLD)
        if box is None:
            continue
        blend(
            canvas, rows, cols, alpha * rng.uniform(0.7, 1.0), _ink_colour(rng, canvas, rows, cols)
        )
        taken.append(box)
    for _ in range(int(rng.integers(0, 3))):  # strokes and arcs
        length = rng.uniform(6, 40) * scale
        cx, cy = rng.uniform(0, size, 2)
        rows, cols, x, y = local_grid(cx, cy, length / 2 + 3, size)
        a = rng.uniform(0, np.pi)
        dx, dy = np.cos(a) * length / 2, np.sin(a) * length / 2
        width = rng.uniform(1.0, 3.5) * scale
        if rng.random() < 0.5:
            sdf = segment_sdf(x, y, -dx, -dy, dx, dy, width)
        else:
            ring = np.abs(np.hypot(x, y) - length / 2) - width / 2
            wedge = np.cos(np.arctan2(y, x) - a) < rng.uniform(-0.5, 0.5)
            sdf = np.where(wedge, np.inf, ring)
        blend(
            canvas,
            rows,
            cols,
            alpha_from_sdf(sdf) * rng.uniform(0.6, 1.0),
            _ink_colour(rng, canvas, rows, cols),
        )


def generate_scene(
    rng: np.random.Generator, size: int, split: str
) -> tuple[np.ndarray, list[tuple[int, int, int, int]], list[int]]:
    """One scene: float32 (size, size, 3) in [0, 1], integer xyxy boxes, labels 0-9."""
    glyphs, _ = _digits()
    pool = _pool(split)
    canvas = _background(rng, size)
    taken: list[tuple[int, int, int, int]] = []
    _distractors(rng, canvas, size, split, taken)
    boxes: list[tuple[int, int, int, int]] = []
    labels: list[int] = []
    scale = size / 128
    lo, hi = np.log(MIN_HEIGHT * scale), np.log(MAX_HEIGHT * scale)
    n = int(rng.choice(6, p=[0.15, 0.2, 0.2, 0.2, 0.15, 0.1])) + 1
    while len(labels) < n:
        for _attempt in range(12):
            digit = int(rng.integers(10))
            glyph = glyphs[int(rng.choice(pool[digit]))]
            height = float(np.exp(rng.uniform(lo, hi)))
            margin = height * 0.6
            cx, cy = rng.uniform(margin, size - margin, 2)
            rows, cols, alpha = _render_digit(rng, glyph, height, size, cx, cy)
            box = ink_box(alpha, rows, cols, INK_THRESHOLD)
            if box is None or min(box[2] - box[0], box[3] - box[1]) < 2:
                continue
            if any(box_overlap(box, other) > MAX_OVERLAP for other in taken + boxes):
                continue
            opacity = rng.uniform(0.75, 1.0)
            blend(canvas, rows, cols, alpha * opacity, _ink_colour(rng, canvas, rows, cols))
            boxes.append(box)
            labels.append(digit)
            break
        else:
            break  # the scene is full: fewer digits than drawn
    noise = rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(
        rng.uniform(0.0, 0.035)
    )
    canvas += noise
    return np.clip(canvas, 0, 1, out=canvas), boxes, labels
