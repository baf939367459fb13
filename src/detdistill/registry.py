"""Things by name, timm style: one small helper behind detectors, methods and backbones.

A config names a detector, a backbone and distillation methods; each kind keeps
a :class:`Registry` that maps names to builders. Registering a name twice with a
different builder is an error (a plug-in must not silently replace a built-in),
and an unknown name is an error that lists every valid one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from detdistill.errors import UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named builders of one kind (``kind`` names it in errors, e.g. ``"detector"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` on a class or builder function."""

        def add(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return add

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def get(self, name: str) -> T:
        """The builder registered as ``name``; an unknown name lists the valid ones."""
        if name not in self._items:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: {', '.join(self.names())}"
            )
        return self._items[name]
