"""Counted, reported data problems: what was dropped, clipped or skipped, and why.

Why: silent data loss is never acceptable. Every repair a loader makes (dropping a
zero-size box, clipping a box to the image, skipping an unreadable file) is
counted here by kind, with a few examples, so that the CLI can print it and the
loader can log it once per data set instead of once per box.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

#: Problem kinds and what the loaders did about each (the CLI prints these).
PROBLEM_KINDS: dict[str, str] = {
    "missing_image": "image file not found; image dropped at construction",
    "missing_annotation": "VOC annotation XML not found; image dropped at construction",
    "unreadable_image": "image could not be decoded (truncated/corrupt); skipped when loaded",
    "image_size_mismatch": "decoded size differs from the annotation's width/height; skipped",
    "box_nonpositive_size": "box with zero or negative width/height; dropped",
    "box_nonfinite": "box with NaN/inf coordinates; dropped",
    "box_clipped": "box partly outside the image; clipped to the image",
    "box_outside_image": "box entirely outside the image; dropped",
    "unknown_image_id": "annotation refers to an image id that is not in 'images'; dropped",
    "unknown_category_id": "annotation refers to a category id not in 'categories'; dropped",
    "dropped_by_transform": "box smaller than 1 px after resizing; dropped by SanitizeBoundingBoxes",
    "label_malformed": "YOLO label line without 5 numeric fields (class cx cy w h); line dropped",
    "label_class_out_of_range": "YOLO class id not an integer in [0, number of names); line dropped",
    "label_unreadable": "YOLO label file is not UTF-8 text; image dropped at construction",
}

_MAX_EXAMPLES = 5


@dataclass
class DataProblems:
    """Counts of data problems by kind, plus neutral facts (``info``) about the data set.

    ``counts`` holds problems (see :data:`PROBLEM_KINDS`); ``info`` holds
    non-problems worth printing (``images``, ``annotations``,
    ``negative_images``, ``crowd_ignored``, ``difficult_ignored``,
    ``background_images``).
    Load-time problems (``unreadable_image``, ``dropped_by_transform``) are
    counted in the process that loads the sample: with ``num_workers > 0`` they
    are logged by the worker but do not reach the main process's copy.
    """

    source: str = ""
    counts: Counter[str] = field(default_factory=Counter)
    info: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, n: int = 1, example: str | None = None) -> None:
        """Count ``n`` problems of ``kind``; keep the first few ``example`` strings."""
        if n <= 0:
            return
        self.counts[kind] += n
        if example is not None:
            bucket = self.examples.setdefault(kind, [])
            if len(bucket) < _MAX_EXAMPLES:
                bucket.append(example)

    @property
    def total(self) -> int:
        """Number of problems of every kind."""
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return self.total > 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view: ``{"source", "counts", "info", "examples"}``."""
        return {
            "source": self.source,
            "counts": dict(sorted(self.counts.items())),
            "info": dict(sorted(self.info.items())),
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
        }

    def summary(self) -> str:
        """One line: counts by kind with the first example of each."""
        if not self:
            return f"{self.source}: no data problems"
        parts = []
        for kind, n in sorted(self.counts.items()):
            example = self.examples.get(kind)
            parts.append(f"{kind}={n}" + (f" (e.g. {example[0]})" if example else ""))
        return f"{self.source}: {self.total} data problem(s): " + ", ".join(parts)

    def log(self, logger: logging.Logger) -> None:
        """Log the summary once: WARNING when there are problems, INFO otherwise."""
        info = ", ".join(f"{k}={v}" for k, v in sorted(self.info.items()))
        if self:
            logger.warning("%s [%s]", self.summary(), info)
        else:
            logger.info("%s: no data problems [%s]", self.source, info)
