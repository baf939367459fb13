"""The precision view: each object's top candidate boxes by teacher and by student.

Why: a rank correlation is abstract; seeing that the student's best-scored
candidate for an object is a looser box than the teacher's best (the one that
would survive NMS) is what observation 1 means for precision. Boxes are drawn
with :func:`torchvision.utils.draw_bounding_boxes` on the pixels the models
saw, upscaled so that small images and their labels stay legible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib import font_manager
from matplotlib.figure import Figure
from torch import Tensor
from torch.nn import functional as F
from torchvision.utils import draw_bounding_boxes

from detdistill.analysis.collect import ObjectCandidates

__all__ = ["RANK_COLORS", "draw_candidates", "plot_candidates"]

GT_COLOR = (0, 230, 0)
UNCOVERED_COLOR = (255, 255, 255)  # a ground truth without any candidate anchor
RANK_COLORS = ((255, 0, 0), (255, 140, 0), (255, 230, 0))  # candidate rank 1, 2, 3
MIN_SIDE = 480


def _font() -> str | None:
    """Matplotlib's bundled DejaVu Sans, so label size is controllable everywhere."""
    try:
        return font_manager.findfont("DejaVu Sans", fallback_to_default=True)
    except Exception:  # pragma: no cover - a broken font cache should not stop the analysis
        return None


def draw_candidates(
    image: Tensor,
    objects: Sequence[ObjectCandidates],
    who: str,
    class_names: Sequence[str],
) -> Tensor:
    """uint8 (3, H', W') image with ground truths and ``who``'s ("teacher"/"student") top candidates.

    Ground truths are green with their class name (white: the assigner gave
    the object no candidate, so it is not ranked); candidates are coloured by
    rank (1 red, 2 orange, 3 yellow; thicker = better) and labelled
    ``rank:score``. The image is upscaled by an integer factor to at least
    ``MIN_SIDE`` pixels on its longer side.
    """
    if who not in ("teacher", "student"):
        raise ValueError(f"who must be 'teacher' or 'student', got {who!r}")
    h, w = image.shape[-2:]
    scale = max(1, math.ceil(MIN_SIDE / max(h, w)))
    big = F.interpolate(image[None].float(), scale_factor=scale, mode="nearest")[0]
    canvas = (big.clamp(0, 1) * 255).round().to(torch.uint8)
    font = _font()
    size = max(11, min(18, canvas.shape[-1] // 40))
    # Worst rank first, so the rank-1 box ends up on top.
    for rank in reversed(range(len(RANK_COLORS))):
        boxes, labels = [], []
        for obj in objects:
            cand_boxes = obj.teacher_boxes if who == "teacher" else obj.student_boxes
            cand_scores = obj.teacher_scores if who == "teacher" else obj.student_scores
            if rank < cand_boxes.shape[0]:
                boxes.append(cand_boxes[rank])
                labels.append(f"{rank + 1}:{float(cand_scores[rank]):.3f}")
        if boxes:
            canvas = _draw(
                canvas, torch.stack(boxes) * scale, labels, RANK_COLORS[rank], 3 - rank, font, size
            )
    for color, wanted in ((GT_COLOR, True), (UNCOVERED_COLOR, False)):
        chosen = [obj for obj in objects if obj.has_candidates == wanted]
        if chosen:
            gt = torch.stack([obj.gt_box for obj in chosen]) * scale
            names = [_name(obj.label, class_names) for obj in chosen]
            canvas = _draw(canvas, gt, names, color, 2, font, size)
    return canvas


def _name(label: int, class_names: Sequence[str]) -> str:
    return class_names[label] if label < len(class_names) else str(label)


def _draw(
    canvas: Tensor,
    boxes: Tensor,
    labels: list[str],
    color: tuple[int, int, int],
    width: int,
    font: str | None,
    size: int,
) -> Tensor:
    h, w = canvas.shape[-2:]
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
    if font is None:
        return draw_bounding_boxes(canvas, boxes, labels, colors=color, width=width)
    return draw_bounding_boxes(
        canvas, boxes, labels, colors=color, width=width, font=font, font_size=size
    )


def plot_candidates(
    image: Tensor,
    objects: Sequence[ObjectCandidates],
    class_names: Sequence[str],
    path: Path,
    title: str = "",
) -> Path:
    """Teacher and student side by side, with a legend of the colours."""
    fig = Figure(figsize=(12, 6.6), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, who in zip(axes, ("teacher", "student"), strict=True):
        ax.imshow(draw_candidates(image, objects, who, class_names).permute(1, 2, 0).numpy())
        ax.set_title(f"{who}: its top-3 candidates per object", fontsize=13)
        ax.set_xticks([])
        ax.set_yticks([])
    legend = (
        "green: ground truth (white: no candidate anchor, not ranked)\n"
        "red / orange / yellow: the candidate ranked 1 / 2 / 3 by that network's score of the "
        "object's class (label = rank:score)"
    )
    fig.suptitle((title + "\n" if title else "") + legend, fontsize=11)
    fig.savefig(path, dpi=90)
    return path
