"""Every error class of the package derives from DetDistillError (and keeps its built-in base)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import detdistill
from detdistill.errors import DetDistillError


def package_error_classes() -> list[type[BaseException]]:
    found = {}
    for info in pkgutil.walk_packages(detdistill.__path__, "detdistill."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("detdistill."):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return list(found.values())


def test_every_error_is_a_detdistill_error_and_keeps_its_builtin_base():
    classes = package_error_classes()
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, DetDistillError), cls
    builtin = {
        "ConfigError": ValueError,
        "DataError": ValueError,
        "IncompatibleModelsError": ValueError,
        "CheckpointError": RuntimeError,
        "NonFiniteLossError": RuntimeError,
        "ImageReadError": OSError,
        "NoImagesError": FileNotFoundError,
    }
    by_name = {cls.__name__: cls for cls in classes}
    for name, base in builtin.items():
        assert issubclass(by_name[name], base), name
