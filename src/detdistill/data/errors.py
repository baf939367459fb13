"""Exceptions raised for bad data, each naming the file and the field at fault.

Why a small hierarchy: the CLI catches :class:`DataError` and prints the message
without a traceback, and tests can assert on the exact kind of failure.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from detdistill.errors import DetDistillError


class DataError(DetDistillError, ValueError):
    """Base class for every data problem that stops a data set from being built."""


class AnnotationFormatError(DataError):
    """An annotation file is not valid JSON/XML or violates the expected schema.

    ``path`` is the file, ``field`` the JSON path (``annotations[3].bbox``) or XML
    element (``object[1]/bndbox/xmin``) at fault, when known.
    """

    def __init__(self, path: str | Path, message: str, field: str | None = None) -> None:
        self.path = Path(path)
        self.field = field
        where = f"{self.path}" + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")


class ClassMismatchError(DataError):
    """Two class lists that must agree do not: names the missing and extra classes."""

    def __init__(
        self,
        expected: Iterable[str],
        found: Iterable[str],
        what: str = "data set",
        check_missing: bool = True,
    ) -> None:
        expected_list, found_list = list(expected), list(found)
        self.missing = sorted(set(expected_list) - set(found_list)) if check_missing else []
        self.extra = sorted(set(found_list) - set(expected_list))
        parts = []
        if self.missing:
            parts.append(f"missing from the {what}: {self.missing}")
        if self.extra:
            parts.append(f"in the {what} but not in the expected class list: {self.extra}")
        super().__init__("class lists differ; " + "; ".join(parts))


class ImageReadError(DataError, OSError):
    """An image file exists but cannot be decoded (truncated, corrupt, wrong size)."""

    def __init__(self, path: str | Path, reason: str, kind: str = "unreadable_image") -> None:
        self.path = Path(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{self.path}: cannot read image: {reason}")
