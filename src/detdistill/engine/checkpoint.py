"""Checkpoint files: atomic writes, safe loads, RNG state.

Two files per run directory, both plain ``torch.save`` archives that load with
``torch.load(..., weights_only=True)`` (tensors, dicts, lists, tuples, numbers,
strings and None only, so loading one never runs pickled code):

``model.pt`` (:data:`WEIGHTS_FILE`), the weights a user keeps::

    {
        "model": state_dict,        # loads straight into the plain detector
        "config": dict,             # config_to_dict(cfg) of the run
        "class_names": [str, ...],
        "version": str,             # detdistill.__version__ that wrote it
        "epoch": int,
        "step": int,
        "metrics": dict,            # e.g. {"mAP": 0.41, ...}
    }

  For a distilled student, ``model`` holds only the student (adaptation layers
  are dropped), so the file needs no conversion script.

``last_state.pt`` (:data:`STATE_FILE`), what resuming needs on top of that::

    {
        "optimizer": dict, "scheduler": dict, "scaler": dict | None,
        "ema": dict | None,                 # EMA model state_dict
        "rng": capture_rng_state(),
        "epoch": int, "step": int,
        "teacher": {"path": str, "sha256": str},   # distillation only
        ...                                 # adapters etc., as the trainer needs
    }

Writes go to a temporary file in the target directory, are fsynced and then
renamed over the target with ``os.replace``, so a crash (or a full disk) while
saving leaves the previous checkpoint intact instead of a truncated one.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detdistill.errors import CheckpointError
from detdistill.version import __version__

__all__ = [
    "STATE_FILE",
    "ULTRALYTICS_FILE",
    "WEIGHTS_FILE",
    "capture_rng_state",
    "file_sha256",
    "load_checkpoint",
    "make_weights_payload",
    "restore_rng_state",
    "save_checkpoint",
]

WEIGHTS_FILE = "model.pt"
STATE_FILE = "last_state.pt"
ULTRALYTICS_FILE = "ultralytics.pt"  # a YOLO student, for `ultralytics.YOLO(path)`


# ---------------------------------------------------------------------------
# Files


def save_checkpoint(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    # A process killed in the middle of an earlier write left its temp file: the
    # checkpoint itself was never touched, only the leftover goes.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    return path


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX); not possible or needed on Windows."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; errors name the file and the cause."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a checkpoint file" if path.is_dir() else "not found"
        raise CheckpointError(f"checkpoint {what}: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        reason = " ".join(str(exc).split())
        if len(reason) > 300:
            reason = reason[:297] + "..."
        raise CheckpointError(
            f"cannot load checkpoint {path} (truncated, corrupt, not a torch checkpoint, "
            f"or it holds pickled objects that weights_only=True refuses): {reason}"
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(payload).__name__}, expected a dict payload"
        )
    return payload


def file_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (teacher files can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def make_weights_payload(
    model_state: Mapping[str, Any],
    config: Mapping[str, Any],
    class_names: list[str],
    epoch: int,
    step: int,
    metrics: Mapping[str, Any] | None = None,
    category_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The ``model.pt`` payload of the module docstring, stamped with the code version.

    ``category_ids``: the data set's id of each class (COCO's own numbering), so
    that ``predict`` and ONNX export write the ids ``eval`` scores with; without
    them the ids are ``1..K``.
    """
    return {
        "model": dict(model_state),
        "config": dict(config),
        "class_names": list(class_names),
        "category_ids": None if category_ids is None else [int(i) for i in category_ids],
        "version": __version__,
        "epoch": int(epoch),
        "step": int(step),
        "metrics": dict(metrics or {}),
    }


# ---------------------------------------------------------------------------
# RNG state (so a resumed run continues the same curve)


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when in use) CUDA generator states, as tensors/lists.

    The state is per process: under torchrun, gather it from every rank
    (``all_gather_objects``) and give each rank its own back on resume, or all
    ranks would draw the same augmentations.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current device only: one device per process under torchrun, and
        # touching every device would create a CUDA context on each of them.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; parts absent from ``state`` are left alone."""
    if "python" in state:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
    if "numpy" in state:
        npy = state["numpy"]
        keys = np.asarray(torch.as_tensor(npy["keys"]).cpu().numpy(), dtype=np.uint32)
        np.random.set_state(
            (
                str(npy["kind"]),
                keys,
                int(npy["pos"]),
                int(npy["has_gauss"]),
                float(npy["cached_gaussian"]),
            )
        )
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"]).cpu().to(torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.as_tensor(state["cuda"]).cpu().to(torch.uint8))
