"""Atomic, manifest-checked caching of generated data sets.

Why: generation runs once per machine and is reused by every command; an
interrupted run must never leave a half-written folder that a later run
mistakes for a complete one. Everything is written to a temporary sibling
folder, the manifest last, and then renamed into place in one step.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "detdistill-embedded"


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a cache folder, or ``None`` when absent or unreadable."""
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Remove temporary siblings left by interrupted runs whose process is gone."""
    for tmp in out.parent.glob(f".{out.name}.*-*"):
        parts = tmp.name.rsplit("-", 2)
        with contextlib.suppress(ValueError):
            if tmp.is_dir() and not _pid_alive(int(parts[-2])):
                shutil.rmtree(tmp, ignore_errors=True)


def build_atomically(
    out: Path, manifest: dict[str, Any], fill: Callable[[Path], dict[str, Any]]
) -> None:
    """Create ``out`` by calling ``fill(tmp_dir)`` then renaming ``tmp_dir`` to ``out``.

    ``fill`` returns extra manifest entries. An existing ``out`` is replaced
    only if it is empty or a cache of ours (it has our manifest); anything else
    is refused with ``FileExistsError`` rather than deleted. If another process
    finishes the same cache first, its result is kept and ours discarded.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and any(out.iterdir()) and read_manifest(out) is None:
        raise FileExistsError(
            f"{out} exists and is not a detdistill embedded data set (no {MANIFEST}); "
            "refusing to overwrite it: choose another directory or remove it"
        )
    _remove_stale(out)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        extra = fill(tmp)
        (tmp / MANIFEST).write_text(
            json.dumps({**manifest, **extra}, indent=2, sort_keys=True) + "\n"
        )
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            if read_manifest(out) is None:  # not a concurrent success: put the old one back
                if old is not None and not out.exists():
                    os.rename(old, out)
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
