"""Bundled YAML presets, addressed by name or by path.

The presets ship inside the package (``detdistill/configs``; the repository's
top-level ``configs/`` points there) so ``detdistill demo`` and
``detdistill train digits_teacher`` work from any installation.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from detdistill.engine.config import Config, load_config
from detdistill.errors import ConfigError

PRESET_DIR = Path(str(resources.files("detdistill") / "configs"))


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset named {name!r}; presets: {', '.join(list_presets())}")
    return path


def load_preset_or_file(name_or_path: str, overrides: Sequence[str] = ()) -> Config:
    """A config from a YAML file, or from a bundled preset when no such file exists."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_config(path, list(overrides))
    return load_config(preset_path(name_or_path), list(overrides))
