"""The one registry helper behind every named thing (detectors, methods, backbones, ...)."""

from __future__ import annotations

import pytest

from detdistill.errors import UnknownNameError
from detdistill.losses.methods import METHODS
from detdistill.models.backbones import BODIES
from detdistill.models.registry import DETECTORS
from detdistill.registry import Registry


def test_register_get_names_and_errors():
    things: Registry[object] = Registry("thing")

    @things.register("b")
    def build_b():
        return "b"

    things.register("a")(len)
    assert things.names() == ["a", "b"] and things.get("b") is build_b
    things.register("b")(build_b)  # the same builder again is harmless (module reloads)
    with pytest.raises(ValueError, match="thing 'b' is already registered"):
        things.register("b")(len)
    with pytest.raises(ValueError, match="unknown thing 'c'; registered things: a, b"):
        things.get("c")
    things.register("bbb")(len)
    with pytest.raises(UnknownNameError, match=r"things: a, b, bbb \(did you mean 'bbb'\?\)$"):
        things.get("bb")
    assert "a" in things and "z" not in things and list(things) == ["a", "b", "bbb"]


def test_the_three_kinds_share_it():
    for registry, kind in ((DETECTORS, "detector"), (METHODS, "distillation method"),
                           (BODIES, "backbone")):  # fmt: skip
        assert isinstance(registry, Registry) and registry.kind == kind and registry.names()
