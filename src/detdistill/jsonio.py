"""Strict JSON out: every JSON file detdistill writes parses with any strict reader.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which ``jq``,
JavaScript and ``json.loads(..., parse_constant=...)`` reject. Undefined values
(a class with no ground truth, a size range with no object) are ``null``
instead, and numpy scalars become plain numbers. Writers go through
:func:`dumps` so that a non-finite number can never slip out.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["dumps", "json_safe", "write"]


def json_safe(value: Any) -> Any:
    """NaN/inf -> ``None``, numpy scalars and arrays -> Python, recursively (keys as strings)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` ``(value)``, refusing anything non-finite left."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def write(path: str | os.PathLike[str], value: Any, **kwargs: Any) -> None:
    """Write :func:`dumps` ``(value)`` to ``path`` atomically: a reader (a resumed sweep,
    ``compare``) never sees half a file, whenever the writer dies."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(dumps(value, **kwargs) + "\n")
    os.replace(tmp, path)
