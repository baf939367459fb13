"""Kill a training with SIGKILL at several points, resume each time: the run always resumes,
no checkpoint is ever half-written, and the final metrics equal an uninterrupted run's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_OVERRIDES

pytestmark = pytest.mark.slow

# Runs one CLI training in this process, after arranging its own SIGKILL:
#   write:N  -> in the N-th checkpoint write, after half the bytes are on disk
#   step:N   -> right after the N-th training step
DRIVER = r"""
import os, signal, sys
import torch
import detdistill.engine.checkpoint as checkpoint
import detdistill.engine.trainer as trainer
from detdistill.cli import main

kind, n = sys.argv[1].split(":")
n = int(n)
calls = {"count": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if kind == "write":
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == n:
            import io
            buffer = io.BytesIO()
            real_save(obj, buffer)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()
        return real_save(obj, f, *args, **kwargs)
    checkpoint.torch.save = save
elif kind == "step":
    real_step = trainer.Trainer.train_step
    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["count"] += 1
        if calls["count"] == n:
            die()
        return out
    trainer.Trainer.train_step = step
sys.exit(main(sys.argv[2:]))
"""


def train(tmp_path: Path, name: str, kill: str = "none:0", resume: bool = False) -> int:
    overrides = [*TINY_OVERRIDES, "train.epochs=3", f"data.root={tmp_path / 'data'}",
                 f"output_dir={tmp_path / name}"]  # fmt: skip
    args = [
        "train",
        "digits_teacher",
        "--no-progress",
        *(a for o in overrides for a in ("--set", o)),
    ]
    if resume:
        args.append("--resume")
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, kill, *args], capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    return done.returncode


def checkpoints_load(run_dir: Path) -> None:
    for name in ("model.pt", "last_state.pt"):
        path = run_dir / name
        if path.exists():  # whole, or not there at all
            torch.load(path, map_location="cpu", weights_only=True)


def test_sigkill_anywhere_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    assert train(tmp_path, "whole") == 0
    expected = json.loads((tmp_path / "whole" / "summary.json").read_text())["metrics"]

    # 4 steps per epoch, 2 checkpoint files per save (model.pt, then last_state.pt): kill
    # mid-epoch, then in the middle of writing model.pt (write 3: epoch 2's first file), then
    # in the middle of last_state.pt (write 2).
    kills = ["step:6", "write:3", "write:2"]
    run = tmp_path / "killed"
    for i, kill in enumerate(kills):
        code = train(tmp_path, "killed", kill, resume=i > 0)
        assert code == -9, f"{kill}: expected SIGKILL, got exit {code}"
        checkpoints_load(run)
    assert train(tmp_path, "killed", resume=True) == 0
    checkpoints_load(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["metrics"] == expected
    assert not list(run.glob(".*.tmp")), "temp files of the killed writes are cleaned up"
    weights = torch.load(run / "model.pt", weights_only=True)["model"]
    for key, value in torch.load(tmp_path / "whole" / "model.pt", weights_only=True)[
        "model"
    ].items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0, msg=key)
