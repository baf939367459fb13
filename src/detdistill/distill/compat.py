"""Can these two detectors be distilled into each other? Every disagreement, named at once."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from detdistill.losses import IncompatibleModelsError

__all__ = ["check_compatible", "check_taps"]


def check_compatible(teacher: nn.Module, student: nn.Module) -> None:
    """Raise :class:`IncompatibleModelsError` naming every disagreement.

    RM compares the same candidate boxes and PFI the same feature-map locations
    in both networks, so they must share levels, strides, anchors per location,
    anchor shapes, classes, head type and input preprocessing (the teacher runs
    on the student's batched tensor). Backbones and channel widths may differ:
    adapters bridge the channels.
    """
    problems = []
    checks = {
        "head type": ("head_type", None),
        "number of classes": ("num_classes", None),
        "number of FPN levels": ("strides", len),
        "FPN strides": ("strides", tuple),
        "anchors per location": ("num_anchors_per_location", None),
    }
    for label, (attr, convert) in checks.items():
        t_value, s_value = getattr(teacher, attr, None), getattr(student, attr, None)
        if convert is not None and t_value is not None and s_value is not None:
            t_value, s_value = convert(t_value), convert(s_value)
        if t_value != s_value:
            problems.append(f"{label}: teacher {t_value!r} vs student {s_value!r}")
    for label, attr in (("anchor sizes", "sizes"), ("anchor aspect ratios", "aspect_ratios")):
        t_value = getattr(getattr(teacher, "anchor_generator", None), attr, None)
        s_value = getattr(getattr(student, "anchor_generator", None), attr, None)
        if t_value != s_value:
            problems.append(f"{label}: teacher {t_value!r} vs student {s_value!r}")
    t_input, s_input = teacher.input_settings(), student.input_settings()
    for key in sorted(set(t_input) | set(s_input)):
        if t_input.get(key) != s_input.get(key):
            problems.append(
                f"input {key}: teacher {t_input.get(key)!r} vs student {s_input.get(key)!r}"
            )
    if problems:
        raise IncompatibleModelsError(
            "teacher and student cannot be distilled together: " + "; ".join(problems)
        )


def check_taps(
    methods: Mapping[str, nn.Module], student: nn.Module, teacher: nn.Module
) -> int | None:
    """The student tower depth to keep for the methods' tower taps (``None``: no tower tap).

    The student's forward pass keeps its tower features at one depth, so every
    tower tap must agree on it; a tap before the last ``j`` convs needs towers
    of at least ``j`` convs in both detectors.
    """
    readers: dict[int, list[str]] = {}
    for name, method in methods.items():
        for tap in method.taps:
            if tap.where == "tower":
                readers.setdefault(tap.before_last, []).append(name)
    if not readers:
        return None
    if len(readers) > 1:
        raise IncompatibleModelsError(
            "methods read the head towers at different depths, and one depth is kept: "
            + "; ".join(f"{', '.join(n)} before the last {j}" for j, n in sorted(readers.items()))
        )
    ((convs, names),) = readers.items()
    depths = {"student": student.tower_depth, "teacher": teacher.tower_depth}
    if any(convs > depth for depth in depths.values()):
        raise IncompatibleModelsError(
            f"{', '.join(names)} reads the head towers before their last {convs} conv(s), but the "
            f"towers have {depths['student']} (student) and {depths['teacher']} (teacher)"
        )
    return depths["student"] - convs
