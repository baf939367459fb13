"""Default anchor sizes that scale with the pyramid levels and the input size.

torchvision's RetinaNet uses ``(x, x*2^(1/3), x*2^(2/3))`` with ``x = 4 * stride``
(32 px at P3 up to ~813 px at P7) for 800-1333 px COCO images: the largest anchor is
about 0.6 of the longest image side. Keeping that ratio for other input sizes and
pyramids gives ``scale = reference * (max_size / 1333) * (128 / max_stride)``: for
COCO with P3-P7 that is exactly torchvision's 4; for 128 px images with P3-P5 it is
1.5, i.e. anchors from 12 px to ~76 px, which match 8-100 px objects at IoU >= 0.4.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["default_anchor_scale", "octave_anchor_sizes"]

_COCO_MAX_SIZE = 1333
_COCO_MAX_STRIDE = 128


def default_anchor_scale(reference: float, max_size: int, max_stride: int) -> float:
    """Anchor base size in units of stride, scaled from the COCO ``reference``.

    Rounded to a quarter and clamped to ``[1, reference]``: smaller than one stride
    would leave gaps between neighbouring anchors, larger than the COCO value would
    drop small objects.
    """
    scale = reference * (max_size / _COCO_MAX_SIZE) * (_COCO_MAX_STRIDE / max_stride)
    return min(float(reference), max(1.0, round(scale * 4) / 4))


def octave_anchor_sizes(
    strides: Sequence[int], scale: float, scales_per_octave: int
) -> tuple[tuple[int, ...], ...]:
    """``int(stride * scale * 2**(i / scales_per_octave))`` per level, torchvision's formula."""
    return tuple(
        tuple(int(s * scale * 2 ** (i / scales_per_octave)) for i in range(scales_per_octave))
        for s in strides
    )
