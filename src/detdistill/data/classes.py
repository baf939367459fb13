"""One class-name mapping shared by every loader, model and checkpoint.

Why: a teacher trained on one class order and a data set that enumerates its
categories in another silently produce wrong labels. Labels are therefore
always derived by *name*, and any difference between the expected class list
and the data set's is an error that names the classes.
"""

from __future__ import annotations

from collections.abc import Sequence

from detdistill.data.errors import ClassMismatchError, DataError

#: The 20 Pascal VOC classes in their customary order.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def check_class_names(
    expected: Sequence[str],
    found: Sequence[str],
    what: str = "data set",
    check_missing: bool = True,
) -> None:
    """Raise :class:`ClassMismatchError` unless ``found`` has the classes of ``expected``.

    Order is not compared (labels are mapped by name); only the sets. With
    ``check_missing=False`` classes of ``expected`` absent from ``found`` are
    allowed (a VOC split need not contain every class).
    """
    if len(set(expected)) != len(expected):
        dupes = sorted({n for n in expected if list(expected).count(n) > 1})
        raise DataError(f"duplicate class names in the expected class list: {dupes}")
    missing = set(expected) - set(found) if check_missing else set()
    if missing or set(found) - set(expected):
        raise ClassMismatchError(expected, found, what, check_missing=check_missing)


def resolve_class_names(
    found: Sequence[str],
    class_names: Sequence[str] | None,
    what: str = "data set",
    check_missing: bool = True,
) -> list[str]:
    """The class list to use: ``class_names`` when given (after checking), else ``found``."""
    if class_names is None:
        return list(found)
    check_class_names(list(class_names), list(found), what, check_missing=check_missing)
    return list(class_names)
