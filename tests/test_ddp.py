"""Two CPU processes with gloo on loopback train exactly like one process with the same global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import torchrun_env
from detdistill.engine.checkpoint import load_checkpoint
from detdistill.engine.config import load_config
from detdistill.engine.presets import preset_path

pytestmark = pytest.mark.slow  # every test here trains or spawns processes

OVERRIDES = [
    "data.name=shapes",
    "data.num_train=16",
    "data.num_val=8",
    "data.image_size=64",
    "data.num_workers=0",
    "model.num_classes=6",
    "model.backbone_kwargs={width: 4, depth: 1}",
    # frozen BatchNorm: per-rank batch statistics would differ from one big batch's
    "model.kwargs={norm_layer: frozen_bn}",
    "train.epochs=1",
    "train.warmup_iters=1",
    "train.grad_clip=null",
    "train.optimizer=sgd",
    "train.log_interval=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, overrides: list[str], out: str, preset: str
) -> None:
    """One torchrun-like rank: trains, then saves its weights (and its distillation weights)."""
    os.environ.update(torchrun_env(rank, world_size, port))
    torch.set_num_threads(1)
    from detdistill.engine.distributed import cleanup
    from detdistill.engine.trainer import Trainer

    try:
        trainer = Trainer(load_config(preset_path(preset), overrides), show_progress=False)
        trainer.fit()
        torch.save(trainer.setup.model.state_dict(), Path(out) / f"rank{rank}.pt")
        if trainer.setup.distiller is not None:
            torch.save(dict(trainer.setup.distiller.weights), Path(out) / f"weights{rank}.pt")
    finally:
        cleanup()


def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path: Path):
    data = f"data.root={tmp_path / 'data'}"
    ddp = [*OVERRIDES, data, "data.batch_size=2", f"output_dir={tmp_path / 'ddp'}"]
    single = [*OVERRIDES, data, "data.batch_size=4", f"output_dir={tmp_path / 'single'}"]
    mp.spawn(
        _worker, args=(2, _free_port(), ddp, str(tmp_path), "digits_teacher"), nprocs=2, join=True
    )
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), f"ranks diverged at {key}"
    torch.set_num_threads(1)
    from detdistill.engine.trainer import run

    run(load_config(preset_path("digits_teacher"), single), show_progress=False)
    a = load_checkpoint(tmp_path / "ddp" / "model.pt")
    b = load_checkpoint(tmp_path / "single" / "model.pt")
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], rtol=1e-4, atol=1e-5, msg=key)
    # evaluation gathered over both ranks scores the same 8 images as one process
    assert a["metrics"]["mAP"] == pytest.approx(b["metrics"]["mAP"], abs=1e-6)


def test_auto_weights_are_measured_on_every_rank_and_agree(tmp_path: Path):
    """Each rank measures on its own batches; the averaged norms give every rank one weight."""
    from detdistill.engine.trainer import run

    torch.set_num_threads(1)
    data = f"data.root={tmp_path / 'data'}"
    run(load_config(preset_path("digits_teacher"),
                    [*OVERRIDES, data, "train.max_steps=1", f"output_dir={tmp_path / 't'}"]),
        show_progress=False)  # fmt: skip
    student = [*OVERRIDES, data, "data.batch_size=2", f"output_dir={tmp_path / 's'}",
               "model.backbone_kwargs={width: 2, depth: 1}", "train.max_steps=2",
               f"distill.teacher_checkpoint={tmp_path / 't' / 'model.pt'}",
               "distill.methods={rm: auto, pfi: auto}", "distill.auto_batches=1"]  # fmt: skip
    mp.spawn(
        _worker,
        args=(2, _free_port(), student, str(tmp_path), "digits_distill"),
        nprocs=2,
        join=True,
    )
    w0 = torch.load(tmp_path / "weights0.pt")
    w1 = torch.load(tmp_path / "weights1.pt")
    assert w0 == w1 and set(w0) == {"rm", "pfi"} and all(v > 0 for v in w0.values())
