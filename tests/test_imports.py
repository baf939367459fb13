"""A user's own module: `imports:` in a config, `--import` on the CLI, `detdistill.plugins` entry points."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

import detdistill.registry as registry_module
from conftest import TINY_OVERRIDES
from detdistill.cli import main
from detdistill.data import EMBEDDED_DATASETS, make_embedded
from detdistill.engine.builders import build_model, load_detector
from detdistill.engine.checkpoint import make_weights_payload, save_checkpoint
from detdistill.engine.config import Config, apply_overrides, config_to_dict
from detdistill.engine.optim import OPTIMIZERS
from detdistill.engine.presets import preset_path
from detdistill.engine.validate import validate_config
from detdistill.errors import ConfigError
from detdistill.losses.methods import METHODS
from detdistill.models.registry import DETECTORS
from detdistill.registry import PLUGIN_GROUP, PluginError

# What a user writes by following docs/adding-a-method.md, with the simplest forward.
MY_METHODS = '''
from torch import Tensor

from detdistill.losses import DistillBatch, DistillMethod, register_method


@register_method("my_l1")
class MyL1(DistillMethod):
    """L1 between the student's and the teacher's class logits, level by level."""

    imitates = "outputs"

    def forward(self, batch: DistillBatch) -> Tensor:
        pairs = zip(batch.student.cls_logits, batch.teacher.cls_logits, strict=True)
        return sum((s - t).abs().mean() for s, t in pairs)
'''


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """A folder on sys.path for the test's modules; what they register and import is undone after."""
    folder = tmp_path / "user"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    for registry in (METHODS, DETECTORS, OPTIMIZERS, EMBEDDED_DATASETS):
        monkeypatch.setattr(registry, "_items", dict(registry._items))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        if name.startswith("user_"):
            del sys.modules[name]


def write_module(folder: Path, name: str, text: str) -> str:
    (folder / f"{name}.py").write_text(textwrap.dedent(text))
    return name


def test_config_imports_come_before_the_names_are_checked(user_modules):
    module = write_module(user_modules, "user_optim", """
        import torch
        from detdistill.engine.optim import register_optimizer

        @register_optimizer("plain_sgd")
        def plain_sgd(groups, cfg):
            return torch.optim.SGD(groups, lr=cfg.lr)
    """)  # fmt: skip
    cfg = apply_overrides(Config(), ["train.optimizer=plain_sgd"])
    with pytest.raises(ConfigError, match="^train.optimizer: unknown optimizer 'plain_sgd'"):
        validate_config(cfg)
    validate_config(apply_overrides(cfg, [f"imports=[{module}]"]))
    assert "plain_sgd" in OPTIMIZERS.names()


def test_a_module_that_cannot_be_imported_is_one_line_naming_imports(user_modules):
    write_module(user_modules, "user_broken", "raise RuntimeError('no GPU here\\nsecond line')\n")
    for module, reason in [
        ("user_missing", "ModuleNotFoundError: No module named 'user_missing'"),
        ("user_broken", "RuntimeError: no GPU here"),
    ]:
        with pytest.raises(ConfigError) as info:
            validate_config(apply_overrides(Config(), [f"imports=[{module}]"]))
        message = str(info.value)
        assert message == f"imports: cannot import module {module!r}: {reason}"
        assert info.value.key == "imports"


def test_cli_imports_errors_are_one_line(user_modules, capsys):
    assert main(["train", "digits_teacher", "--set", "imports=[user_missing]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "detdistill train: error: imports: cannot import module 'user_missing': "
        "ModuleNotFoundError: No module named 'user_missing'"
    )
    assert main(["--import", "user_missing", "presets"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("detdistill: error: --import: ")


def test_cli_import_comes_before_the_parser_lists_choices(user_modules, tmp_path, capsys):
    module = write_module(user_modules, "user_sets", """
        from detdistill.data import register_embedded
        from detdistill.data.embedded import shapes

        register_embedded("user_shapes", shapes)
    """)  # fmt: skip
    out = tmp_path / "made"
    argv = ["data", "make", "user_shapes", "--out", str(out), "--num-train", "1", "--num-val", "1",
            "--image-size", "32"]  # fmt: skip
    assert main(["--import", module, *argv]) == 0
    assert (out / "train.json").is_file() and "user_shapes" in EMBEDDED_DATASETS


def test_a_checkpoint_imports_its_runs_modules(user_modules, tmp_path):
    """A model of a user's detector is rebuilt by eval/predict/export (and as a teacher)."""
    module = write_module(user_modules, "user_detectors", """
        from detdistill.models.registry import DETECTORS, register_detector

        register_detector("user_retinanet")(DETECTORS.get("retinanet"))
    """)  # fmt: skip
    overrides = [*TINY_OVERRIDES, f"imports=[{module}]", "model.name=user_retinanet"]
    cfg = apply_overrides(Config(), overrides)
    model = build_model(apply_overrides(cfg, ["model.name=retinanet"]).model, 64, pretrained=False)
    names = [str(i) for i in range(6)]
    payload = make_weights_payload(model.state_dict(), config_to_dict(cfg), names, 1, 1)
    path = save_checkpoint(tmp_path / "model.pt", payload)
    assert "user_retinanet" not in DETECTORS.names()
    loaded = load_detector(path)
    assert module in sys.modules and loaded.class_names == names
    for ours, theirs in zip(
        loaded.model.state_dict().values(), model.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs)

    payload["config"]["imports"] = ["user_gone"]
    save_checkpoint(tmp_path / "gone.pt", payload)
    with pytest.raises(ConfigError, match=r"gone.pt: imports: cannot import module 'user_gone'"):
        load_detector(tmp_path / "gone.pt")


def test_entry_point_plugins_load_once_when_a_name_is_missing(user_modules, monkeypatch):
    module = write_module(user_modules, "user_plugin", """
        import torch
        from detdistill.engine.optim import register_optimizer

        LOADS = []
        LOADS.append(1)

        @register_optimizer("plugin_sgd")
        def plugin_sgd(groups, cfg):
            return torch.optim.SGD(groups, lr=cfg.lr)
    """)  # fmt: skip
    asked = []

    def entry_points(group):
        asked.append(group)
        return [EntryPoint(name="mine", value=module, group=group)]

    monkeypatch.setattr(registry_module.metadata, "entry_points", entry_points)
    monkeypatch.setattr(registry_module, "_plugins_loaded", False)
    assert module not in sys.modules
    assert callable(OPTIMIZERS.get("plugin_sgd"))  # a miss loads the plug-ins
    assert OPTIMIZERS.names() == ["adamw", "plugin_sgd", "sgd"]
    assert asked == [PLUGIN_GROUP] and sys.modules[module].LOADS == [1]

    def broken(group):
        return [EntryPoint(name="bad", value="user_not_there", group=group)]

    monkeypatch.setattr(registry_module.metadata, "entry_points", broken)
    monkeypatch.setattr(registry_module, "_plugins_loaded", False)
    with pytest.raises(PluginError, match=r"plug-in 'bad' \(user_not_there, entry point group "):
        OPTIMIZERS.names()


@pytest.fixture(scope="module")
def overfit_teacher(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny teacher that passes the doctor: trained and evaluated on the same 8 images."""
    from detdistill.engine.config import load_config
    from detdistill.engine.trainer import run

    root = tmp_path_factory.mktemp("teacher")
    paths = make_embedded("shapes", root / "shapes", 8, 1, image_size=64)
    data = ["data.format=coco",
            f"data.train_images={paths['train_images']}", f"data.train_annotations={paths['train_annotations']}",
            f"data.val_images={paths['train_images']}", f"data.val_annotations={paths['train_annotations']}"]  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(preset_path("digits_teacher"), [*TINY_OVERRIDES, *data, "train.epochs=20",
                          "train.lr=0.05", "train.eval_interval=0", f"output_dir={root / 'run'}"])  # fmt: skip
        run(cfg, show_progress=False)
    finally:
        torch.set_num_threads(before)
    return root / "run" / "model.pt", data


def _guide_method() -> str:
    """docs/adding-a-method.md's worked method (``boxl1``, reading the NECK tap), as written there."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md").read_text()
    code = guide.split("```python\n", 1)[1].split("```", 1)[0]
    return code.split("\ndef tiny(", 1)[0]  # the imports and the class, not the example's run


@pytest.mark.slow  # trains a teacher and spawns `python -m detdistill` (about 10 s)
def test_the_guides_method_outside_the_package_works_from_the_command_line(
    overfit_teacher, tmp_path
):
    """docs/adding-a-method.md, "Using it from the command line": its module on PYTHONPATH."""
    teacher, data = overfit_teacher
    (tmp_path / "my_methods.py").write_text(_guide_method())
    overrides = [*TINY_OVERRIDES, *data, "imports=[my_methods]", "distill.methods={boxl1: auto}",
                 "train.max_steps=2", f"distill.teacher_checkpoint={teacher}",
                 f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "detdistill", "distill", "digits_distill", "--no-progress",
         *(arg for item in overrides for arg in ("--set", item))],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "[OK  ] boxl1:" in done.stdout, done.stdout
    # 8 images, batch 4, one epoch: max_steps=2 is the run's end, so it completes
    assert "completed: weights in" in done.stdout and (tmp_path / "run" / "model.pt").is_file()
