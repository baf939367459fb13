"""Weights into a module, strictly: the one place that says what does not fit.

Below both :mod:`detdistill.models` (backbone weights files) and
:mod:`detdistill.engine` (checkpoints), so neither imports the other for it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detdistill.errors import CheckpointError

__all__ = ["StateDictMismatchError", "load_state_dict_strict", "load_weights_file"]


class StateDictMismatchError(CheckpointError):
    """Strict loading found missing, unexpected or differently shaped weights."""


def _listing(title: str, items: list[str], limit: int) -> str:
    shown = "\n".join(f"    {item}" for item in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def load_state_dict_strict(
    module: torch.nn.Module, state_dict: Mapping[str, Any], what: str, limit: int = 10
) -> None:
    """Load ``state_dict`` into ``module`` or fail loudly, listing what does not fit.

    A teacher whose weights silently failed to load (``strict=False``, a
    ``module.`` prefix, a different head) is the most common reason
    distillation "does not work"; this names missing, unexpected and
    shape-mismatched keys, with counts, instead.
    """
    expected = module.state_dict()
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected
        and isinstance(v, torch.Tensor)
        and isinstance(expected[k], torch.Tensor)
        and v.shape != expected[k].shape
    ]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if not shapes:
        # The module's own loading hooks decide what counts as missing or
        # unexpected (FrozenBatchNorm2d, for one, drops num_batches_tracked).
        result = module.load_state_dict(state_dict, strict=False)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected or shapes:
        parts = [f"{what}: the weights do not fit the model"]
        if missing:
            parts.append(
                _listing("missing keys (in the model, not in the weights)", missing, limit)
            )
        if unexpected:
            parts.append(
                _listing("unexpected keys (in the weights, not in the model)", unexpected, limit)
            )
        if shapes:
            parts.append(_listing("shape mismatches", shapes, limit))
        prefixed = [k for k in unexpected if k.startswith("module.")]
        if prefixed and len(prefixed) == len(unexpected):
            parts.append(
                "  hint: keys start with 'module.' - the weights were saved from a "
                "DDP-wrapped model; save model.module.state_dict() instead"
            )
        raise StateDictMismatchError("\n".join(parts))


def load_weights_file(module: nn.Module, path: str | os.PathLike, what: str) -> None:
    """Load a state-dict file into ``module`` strictly, with an error that lists keys.

    Accepts a bare state dict or one wrapped under ``"state_dict"`` / ``"model"``.
    Loaded with ``weights_only=True``: a weights file must not execute code.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pickle, zip or torch errors: whatever the file is, not weights
        raise CheckpointError(
            f"{path} is not a PyTorch weights file ({type(exc).__name__}) for {what}"
        ) from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    load_state_dict_strict(module, obj, f"weights file {path} for {what}")
