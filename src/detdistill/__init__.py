"""Knowledge distillation for one-stage object detectors."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from detdistill.predict import Predictor

try:
    __version__ = version("detdistill")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["__version__", "load"]


def load(checkpoint: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """A detector ready for inference: ``detdistill.load("model.pt").predict(image)``.

    Imported lazily so that ``import detdistill`` stays cheap (no torch import);
    see :func:`detdistill.predict.load`.
    """
    from detdistill.predict import load as _load

    return _load(checkpoint, device=device)
