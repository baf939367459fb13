"""Train/eval transforms on ``(tv_tensors.Image, target)`` pairs with ``transforms.v2``.

Why v2: the boxes (:class:`torchvision.tv_tensors.BoundingBoxes` inside the
target) are resized and flipped by the same call as the pixels, so they can
never drift apart. The pipeline ends in float32 in [0, 1]: ImageNet
mean/std normalisation is done by the model's ``GeneralizedRCNNTransform``, not
here, so that predictions, visualisations and every model share one input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2


def resize_longest(size: int) -> v2.Resize:
    """Resize keeping the aspect ratio so that the longest side is ``size`` (up or down)."""
    if size <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    return v2.Resize(size=None, max_size=int(size), antialias=True)


def build_transforms(
    train: bool, image_size: int | None, hflip: float = 0.5, multiscale: Sequence[int] = ()
) -> v2.Compose:
    """The sample transforms: resize (longest side), flip when training, [0, 1] float32.

    - Resize: longest side = ``image_size``; ``None`` keeps the native
      resolution (sliced evaluation runs windows of the original pixels); when ``train`` and ``multiscale``
      is non-empty, the longest side is drawn uniformly from ``multiscale`` per
      image instead (``image_size`` is then only used for evaluation).
    - ``train``: random horizontal flip with probability ``hflip``, then boxes
      are clamped to the image and those under 1 px on a side are removed by
      ``SanitizeBoundingBoxes``. The data sets compare the box count before and
      after and count the difference as ``problems['dropped_by_transform']``
      (logged), so nothing disappears silently.
    - Evaluation keeps every box (clamped): targets are only used for
      ``orig_size``/``size`` there, the ground truth comes from the annotations.
    - Output image: float32 in [0, 1], not normalised (see module docstring).

    Randomness comes from torch's RNG (seeded per worker by the loader).
    """
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
    ops: list[v2.Transform] = []
    if train and len(multiscale) > 0:
        ops.append(v2.RandomChoice([resize_longest(s) for s in multiscale]))
    elif image_size is not None:
        ops.append(resize_longest(image_size))
    if train and hflip > 0:
        ops.append(v2.RandomHorizontalFlip(p=hflip))
    ops.append(v2.ClampBoundingBoxes())
    if train:
        ops.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(ops)
