"""Things by name, timm style: one small helper behind every name a config or the CLI accepts.

A config names a detector, a backbone, distillation methods, a data format, an
optimizer and a schedule; ``detdistill data make`` names an embedded data set.
Each kind keeps a :class:`Registry` that maps names to builders, and the
command line lists its choices from the registry, so a name added by a
plug-in is offered everywhere a built-in one is. Registering a name twice with
a different builder is an error (a plug-in must not silently replace a
built-in), and an unknown name is an error that lists every valid one.

Plug-ins installed as packages declare modules in the ``detdistill.plugins``
entry-point group; they are imported once, the first time any registry is
listed or misses a name (:func:`load_plugins`), so that ``detdistill`` starts
without importing them when no name needs them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Generic, TypeVar

from detdistill.errors import DetDistillError, UnknownNameError

__all__ = ["PLUGIN_GROUP", "PluginError", "Registry", "load_plugins"]

T = TypeVar("T")

#: The entry-point group whose modules register names (``[project.entry-points."detdistill.plugins"]``).
PLUGIN_GROUP = "detdistill.plugins"

_plugins_loaded = False


class PluginError(DetDistillError, ImportError):
    """An installed plug-in (an entry point of :data:`PLUGIN_GROUP`) failed to load."""


def load_plugins() -> None:
    """Import every ``detdistill.plugins`` entry point, once per process.

    The flag is set before loading, so a plug-in that lists a registry while it
    is imported does not load the plug-ins again.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in metadata.entry_points(group=PLUGIN_GROUP):
        try:
            entry.load()
        except Exception as exc:  # a third-party module: any error it raises is its own
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise PluginError(
                f"plug-in {entry.name!r} ({entry.value}, entry point group {PLUGIN_GROUP}) "
                f"failed to load: {type(exc).__name__}: {reason}"
            ) from exc


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
        """Registered names, sorted (installed plug-ins included)."""
        load_plugins()
        return sorted(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def get(self, name: str) -> T:
        """The builder registered as ``name``; an unknown name lists the valid ones."""
        if name not in self._items:
            load_plugins()
        if name not in self._items:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; "
                f"registered {self.kind}s: {', '.join(self.names())}{hint}"
            )
        return self._items[name]
