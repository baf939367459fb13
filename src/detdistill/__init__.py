"""Knowledge distillation for one-stage object detectors."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from detdistill.version import __version__

if TYPE_CHECKING:
    import torch

    from detdistill.predict import Predictor

__all__ = ["__version__", "load"]


def load(checkpoint: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """A detector ready for inference: ``detdistill.load("model.pt").predict(image)``.

    Imported lazily so that ``import detdistill`` stays cheap (no torch import);
    see :func:`detdistill.predict.load`.
    """
    from detdistill.predict import load as _load

    return _load(checkpoint, device=device)
