"""Typed run configuration: nested dataclasses loaded from YAML presets.

A long training run that dies after an hour because of a typo in a key is the
failure this module exists to prevent, so everything is checked up front:

* A preset is a YAML mapping. ``_base_: other.yaml`` (relative to the preset)
  inherits another preset. Sections (dataclasses) merge key by key; a field
  whose value is itself a mapping (``distill.methods``, ``model.kwargs``) or a
  list is replaced as a whole, because a preset that says
  ``methods: {rm: 4.0}`` means "only RM", not "RM plus whatever the base had".
* Overrides are ``KEY=VALUE`` strings (``train.lr=0.02``,
  ``distill.methods.rm=4``, ``model.levels=[3,4,5,6,7]``). The value is parsed
  as YAML and set on the fully resolved config, so an override changes exactly
  one entry, also inside mapping fields; a section that is ``null`` (no
  ``distill``) starts from its defaults when an override sets a key in it.
* Values are checked against the field annotations (``int`` is accepted where
  ``float`` is expected; ``X | None``, ``list``, ``tuple``, ``dict[K, V]``,
  ``Literal``, nested dataclasses) and a few ranges. Every problem raises
  :class:`ConfigError` with a one-line message naming the full dotted key.

YAML is read with a ``SafeLoader`` that also reads ``1e-3`` as a float (plain
PyYAML follows YAML 1.1 and would read it as a string).

The schema is in :mod:`detdistill.engine.config_schema`; this module is the
loader. Why not pydantic (v2, tried for this): its lax mode silently turns
``"3"`` into ``3``, ``true`` into ``1``, ``"1e-3"`` into ``0.001`` and ``2.0``
into ``2`` (the quiet fixes this module refuses, because a typo'd type is
usually a typo'd intent), and its strict mode refuses the YAML lists that
tuple fields receive. It also reports a union as one error per branch, has
no partial validation (used here to blame the preset file that has the
error), and gives neither dotted keys nor "did you mean": formatting its
errors into this module's one-line messages takes about as much code as the
checker below, so the checker stays.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from detdistill.engine.config_schema import (
    Config,
    DataConfig,
    DistillConfig,
    ModelConfig,
    TileConfig,
    TrainConfig,
)
from detdistill.errors import ConfigError, UnknownNameError
from detdistill.registry import Registry

__all__ = [
    "Config",
    "DataConfig",
    "DistillConfig",
    "ModelConfig",
    "TileConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_section",
    "config_to_dict",
    "dump_config",
    "import_modules",
    "load_config",
    "parse_override",
    "registered",
    "save_config",
]

T = TypeVar("T")


# ---------------------------------------------------------------------------
# YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` / ``5E4`` as floats (YAML 1.2 style)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader


def _yaml_error(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        return f"{exc.problem} (line {exc.problem_mark.line + 1})"
    return " ".join(str(exc).split())


# ---------------------------------------------------------------------------
# Type checking and conversion


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        args = get_args(tp)
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _mismatch(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}", key)


@cache
def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


_BARE: dict[Any, Any] = {list: list[Any], tuple: tuple[Any, ...], dict: dict[Any, Any]}


def _convert(value: Any, tp: Any, key: str, partial: bool = False) -> Any:
    """Check ``value`` against annotation ``tp`` and return the typed value."""
    origin = get_origin(tp)
    if tp is Any:
        return copy.deepcopy(value)
    if tp is type(None):
        if value is None:
            return None
        raise _mismatch(key, tp, value)
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, key, partial)
    if origin is Literal:
        choices = get_args(tp)
        if value in choices and any(type(value) is type(c) for c in choices):
            return value
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}{hint}", key)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(value, tp, key, partial)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _mismatch(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _mismatch(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _mismatch(key, tp, value)
    if tp in _BARE:
        return _convert(value, _BARE[tp], key, partial)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _mismatch(key, tp, value)
        args = get_args(tp)
        if origin is list:
            return [_convert(v, args[0], f"{key}[{i}]", partial) for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]", partial) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}", key)
        return tuple(
            _convert(v, a, f"{key}[{i}]", partial)
            for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _mismatch(key, tp, value)
        key_tp, value_tp = get_args(tp) or (Any, Any)
        out = {}
        for k, v in value.items():
            sub = _join(key, str(k))
            out[_convert(k, key_tp, f"{sub} (key)", partial)] = _convert(v, value_tp, sub, partial)
        return out
    raise TypeError(f"{key}: unsupported annotation {tp!r} in the config schema")


def _convert_union(value: Any, tp: Any, key: str, partial: bool) -> Any:
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    candidates = [a for a in args if a is not type(None)]
    errors: list[ConfigError] = []
    for candidate in candidates:
        try:
            return _convert(value, candidate, key, partial)
        except ConfigError as exc:
            errors.append(exc)
    # A problem deeper inside the value (a nested key) is the informative one.
    nested = [e for e in errors if e.key != key]
    if len(candidates) == 1 and nested:
        raise nested[0]
    hints = [str(e)[str(e).index(" (did you mean") :] for e in errors if "(did you mean" in str(e)]
    mismatch = _mismatch(key, tp, value)
    if hints:
        raise ConfigError(f"{mismatch}{hints[0]}", key)
    raise mismatch


def _convert_dataclass(value: Any, cls: type, key: str, partial: bool) -> Any:
    if not isinstance(value, Mapping):
        raise _mismatch(key, cls, value)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _field_types(cls)
    for name in value:
        if name not in fields:
            raise _unknown_key(_join(key, str(name)), str(name), list(fields), key)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in value:
            continue
        sub = _join(key, name)
        converted = _convert(value[name], hints[name], sub, partial)
        check = f.metadata.get("check")
        if check is not None and not check[0](converted):
            raise ConfigError(f"{sub}: {check[1]}, got {converted!r}", sub)
        kwargs[name] = converted
    if partial:
        return kwargs
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in kwargs:
            sub = _join(key, name)
            raise ConfigError(f"missing required key '{sub}'", sub)
    return cls(**kwargs)


def _unknown_key(full: str, name: str, valid: list[str], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        return ConfigError(
            f"unknown key '{full}' (did you mean '{_join(prefix, close[0])}'?)", full
        )
    where = f"'{prefix}'" if prefix else "the top level"
    return ConfigError(f"unknown key '{full}' (valid keys in {where}: {', '.join(valid)})", full)


# ---------------------------------------------------------------------------
# Merging presets


def _section_type(tp: Any) -> type | None:
    """The dataclass behind ``tp`` (also through ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        found = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def _merge(base: Any, update: Any, tp: Any) -> Any:
    """Merge ``update`` over ``base``: sections key by key, other values replaced."""
    cls = _section_type(tp)
    if cls is None or not isinstance(base, Mapping) or not isinstance(update, Mapping):
        return copy.deepcopy(update)
    hints = _field_types(cls)
    merged = dict(base)
    for name, value in update.items():
        if name in merged:
            merged[name] = _merge(merged[name], value, hints.get(name, Any))
        else:
            merged[name] = copy.deepcopy(value)
    return merged


def _read_preset(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a preset and its ``_base_`` chain into one raw (unchecked) mapping."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"_base_ cycle: {cycle}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a YAML config (not UTF-8 text)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        raw = _yaml_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_error(exc)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a preset must be a mapping, got {_describe(raw)}")
    base = raw.pop("_base_", None)
    try:  # check this file on its own so errors name the file that has them
        _convert(raw, Config, "", partial=True)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}", exc.key) from None
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: _base_: expected str (a relative path), got {_describe(base)}")
    base_path = path.parent / base
    if not base_path.exists():
        raise ConfigError(f"{path}: _base_ file not found: {base_path}")
    return _merge(_read_preset(base_path, (*chain, resolved)), raw, Config)


# ---------------------------------------------------------------------------
# Public API


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build and check a :class:`Config` from a plain mapping (e.g. a checkpoint's)."""
    return _convert(data, Config, "")


def config_section(data: Mapping[str, Any], name: Literal["data", "model"]) -> Any:
    """One checked section of a saved config: what rebuilding a detector needs.

    A checkpoint is loaded through its ``data`` and ``model`` sections only, so
    that a change to the training or distillation settings never makes an
    older ``model.pt`` unloadable.
    """
    section = {"data": DataConfig, "model": ModelConfig}[name]
    if name not in data:
        raise ConfigError(f"the saved config has no {name!r} section", name)
    return _convert(data[name], section, name)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dicts/lists/scalars: safe for YAML, JSON and ``weights_only`` checkpoints."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


_KEY_RE = re.compile(r"[^\s.=]+(?:\.[^\s.=]+)*")


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``"train.lr=0.02"`` into ``("train.lr", 0.02)``; the value is YAML."""
    key, sep, raw_value = text.partition("=")
    key = key.strip()
    if not sep or not _KEY_RE.fullmatch(key):
        raise ConfigError(f"bad override {text!r}: expected KEY=VALUE, e.g. train.lr=0.02")
    try:
        value = _yaml_load(raw_value)
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"bad override {text!r}: invalid YAML value: {_yaml_error(exc)}", key
        ) from None
    glued = _glued_mapping_keys(value)
    if glued:
        raise ConfigError(
            f"bad override {text!r}: YAML needs a space after ':' in a mapping, "
            f"e.g. {{{glued[0].replace(':', ': ', 1)}}} instead of {{{glued[0]}}}",
            key,
        )
    return key, value


def _glued_mapping_keys(value: Any) -> list[str]:
    """Keys like ``"width:4"`` with no value: ``{width:4}`` typed for ``{width: 4}``."""
    if not isinstance(value, dict):
        return []
    return [k for k, v in value.items() if isinstance(k, str) and ":" in k and v is None]


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Return a new config with every ``KEY=VALUE`` applied (later ones win).

    All overrides are applied before checking, so their order does not matter
    for required keys (``distill.methods.rm=4`` may precede
    ``distill.teacher_checkpoint=...``).
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'KEY=VALUE' strings, not one string")
    if not overrides:
        return cfg
    data = config_to_dict(cfg)
    parsed = [(text, *parse_override(text)) for text in overrides]
    for text, key, value in parsed:
        node: dict[str, Any] = data
        tp: Any = Config
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            cls = _section_type(tp)
            tp = _field_types(cls).get(part, Any) if cls is not None else Any
            child = node.get(part)
            if child is None:  # e.g. `distill: null` in the preset: start from the defaults
                node[part] = child = _section_defaults(tp)
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override {text!r}: '{where}' is {_describe(child)}, "
                    f"not a section, so '{key}' cannot be set",
                    where,
                )
            node = child
        leaf = _section_type(tp)
        if leaf is not None and _is_text(_field_types(leaf).get(parts[-1])):
            value = _as_text(text.partition("=")[2], value)
        node[parts[-1]] = value
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        culprit = next((text for text, key, _ in reversed(parsed) if _related(key, exc.key)), None)
        where = f"override {culprit!r}" if culprit else "after overrides"
        raise ConfigError(f"{where}: {exc}", exc.key) from None


def _is_text(tp: Any) -> bool:
    """``str`` or ``str | None``: a path, a name, a device."""
    if get_origin(tp) in (Union, types.UnionType):
        return set(get_args(tp)) == {str, type(None)}
    return tp is str


def _as_text(raw: str, parsed: Any) -> Any:
    """A text key's value as typed: ``a #1``, ``yes`` and ``1e3`` are text, not YAML.

    YAML's ``null``/``~``/nothing (for ``str | None`` keys) and quoted strings
    keep their YAML meaning.
    """
    stripped = raw.strip()
    if stripped in ("", "null", "~") or stripped[:1] in ("'", '"'):
        return parsed
    return stripped


def _section_defaults(tp: Any) -> dict[str, Any]:
    """The defaulted fields of a section type, as plain values ({} for non-sections)."""
    cls = _section_type(tp)
    if cls is None:
        return {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = config_to_dict(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = config_to_dict(f.default_factory())
    return out


def _related(override_key: str, error_key: str) -> bool:
    """Whether an error at ``error_key`` can come from setting ``override_key``."""
    if not error_key:
        return False
    return any(
        a == b or a.startswith(b + ".") or a.startswith(b + "[")
        for a, b in ((override_key, error_key), (error_key, override_key))
    )


def load_config(path: str | Path, overrides: Sequence[str] | None = None) -> Config:
    """Load a YAML preset (following ``_base_``) and apply dotted overrides."""
    path = Path(path)
    raw = _read_preset(path)
    try:
        cfg = config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}", exc.key) from None
    return apply_overrides(cfg, overrides or [])


def dump_config(cfg: Config) -> str:
    """The config as YAML text, readable by :func:`load_config`."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML so a run can be reproduced from its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# Names: registries and the user's own modules


def registered(registry: Registry[T], name: str, key: str) -> T:
    """``registry.get(name)``, its unknown-name error turned into one naming the config ``key``.

    Every named thing in a config is looked up through here, so a typo reads
    ``train.optimizer: unknown optimizer 'adam'; registered optimizers: adamw, sgd ...``.
    """
    try:
        return registry.get(name)
    except UnknownNameError as exc:
        raise ConfigError(f"{key}: {exc}", key) from None


def import_modules(modules: Iterable[str], key: str = "imports") -> None:
    """Import each module by name, for what it registers (methods, detectors, data formats, ...).

    A module that cannot be imported, or that raises while it is imported, is a
    one-line :class:`ConfigError` naming ``key`` and the module (the original
    error is chained, for ``--debug``). Importing is idempotent, so every
    place that needs the names may call this.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # the user's module: any error it raises is reported
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise ConfigError(
                f"{key}: cannot import module {module!r}: {type(exc).__name__}: {reason}", key
            ) from exc
