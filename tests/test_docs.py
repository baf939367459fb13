"""The how-to guides in docs/ are executed, so they cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(path: Path) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))


@pytest.mark.slow
@pytest.mark.parametrize("guide", ["adding-a-method.md", "adding-a-detector.md"])
def test_guide_runs(guide):
    code = python_blocks(DOCS / guide)
    assert code.strip(), f"{guide} has no python block"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_docs_link_each_other_and_exist():
    readme = (DOCS.parent / "README.md").read_text()
    for name in ("methods.md", "weights.md", "architecture.md", "adding-a-method.md",
                 "adding-a-detector.md", "large-images.md", "yolo.md"):  # fmt: skip
        assert (DOCS / name).is_file(), name
        assert f"docs/{name}" in readme, f"README does not link docs/{name}"
