"""The package's layers point one way (docs/architecture.md): checked on every import.

Each module imports only from its own layer or below, lazily imported ones
included, and no module inside the package imports the package root (which
would tie a low layer to everything the root exposes).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "detdistill"

# Lowest first. The same list, drawn, is in docs/architecture.md.
LAYERS = [
    {"errors", "registry", "jsonio", "version", "state_dicts"},
    {"data", "models"},
    {"evaluation", "losses", "slicing"},
    {"distill"},
    {"engine"},
    {"analysis", "export", "predict", "tables", "sweep"},
    {"demo", "cli", "__main__"},
]
LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path, root: Path = SOURCE.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = SOURCE.parent) -> list[tuple[int, str]]:
    """(line, absolute module) of every ``detdistill`` import in the file, lazy ones too."""
    package = _module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target == "detdistill":  # from detdistill import x: x may be a submodule
                found += [(node.lineno, f"detdistill.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "detdistill"]


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


MODULES = sorted(p for p in SOURCE.rglob("*.py") if p != SOURCE / "__init__.py")


def test_every_subpackage_has_a_layer():
    tops = {_top(_module_name(p)) for p in MODULES}
    assert tops <= set(LAYER_OF), f"give these a layer: {sorted(tops - set(LAYER_OF))}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_imports_point_down_and_never_at_the_package_root(path):
    here = _top(_module_name(path))
    problems = []
    for line, target in _imports(path):
        top = _top(target)
        if top is None or (target == f"detdistill.{top}" and top not in LAYER_OF):
            problems.append(f"line {line}: imports the package root ({target})")
        elif LAYER_OF[top] > LAYER_OF[here]:
            problems.append(f"line {line}: {here} (layer {LAYER_OF[here]}) imports {target} "
                            f"(layer {LAYER_OF[top]})")  # fmt: skip
    assert not problems, "\n".join(problems)


def test_the_checker_sees_lazy_relative_and_root_imports(tmp_path):
    """The rule itself: function-level, relative and package-root imports all count."""
    probe = tmp_path / "detdistill" / "models" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(
        "from ..engine import trainer\n"
        "def f():\n    import detdistill\n    from detdistill import __version__, jsonio\n"
    )
    assert _imports(probe, tmp_path) == [
        (1, "detdistill.engine"),
        (3, "detdistill"),
        (4, "detdistill.__version__"),
        (4, "detdistill.jsonio"),
    ]
    assert LAYER_OF["engine"] > LAYER_OF["models"] and "__version__" not in LAYER_OF
