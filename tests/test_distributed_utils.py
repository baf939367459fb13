"""Distributed helpers (single process and a real 2-process gloo group) and the
rank-aware metrics logger."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import torchrun_env
from detdistill.engine import distributed as ddist
from detdistill.engine.metrics_log import METRICS_FILE, MetricsLogger, read_metrics
from detdistill.errors import ConfigError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


# --- single process -------------------------------------------------------------------


def test_single_process_defaults(no_torchrun_env: None) -> None:
    info = ddist.init_distributed(device="cpu")
    assert info == ddist.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert not info.distributed and info.is_main
    assert not dist.is_initialized()
    assert ddist.is_main_process() and ddist.get_rank() == 0 and ddist.get_world_size() == 1
    assert not ddist.is_distributed()
    ddist.barrier()
    assert ddist.all_gather_objects({"a": 1}) == [{"a": 1}]
    x = torch.tensor(2.0, requires_grad=True)
    reduced = ddist.reduce_dict_mean({"loss": x * 3})
    assert reduced["loss"].item() == 6.0 and not reduced["loss"].requires_grad
    model = torch.nn.Linear(2, 2)
    assert ddist.unwrap_model(model) is model
    ddist.cleanup()


def test_world_size_one_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    info = ddist.init_distributed(device="cpu")
    assert info.world_size == 1 and not dist.is_initialized()


def test_device_resolution(no_torchrun_env: None) -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert ddist.resolve_device("auto").type == expected
    assert ddist.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        for device in ("cuda", "cuda:0"):  # a user's config, on a machine without a GPU
            with pytest.raises(ConfigError, match=f"device '{device}': CUDA is not available"):
                ddist.resolve_device(device)
    with pytest.raises(ConfigError, match="device 'gpu' is not a device"):
        ddist.resolve_device("gpu")


def test_bad_env_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(RuntimeError, match="WORLD_SIZE='two'"):
        ddist.init_distributed(device="cpu")


# --- two processes over gloo --------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(torchrun_env(rank, world_size, port))
    torch.set_num_threads(1)
    info = ddist.init_distributed(device="cpu", timeout_s=60)
    try:
        assert info == ddist.DistInfo(rank, world_size, rank, torch.device("cpu"))
        assert dist.get_backend() == "gloo"
        assert ddist.is_distributed() and ddist.get_world_size() == world_size
        assert ddist.is_main_process() == (rank == 0)
        assert ddist.init_distributed(device="cpu") == info  # idempotent

        gathered = ddist.all_gather_objects({"rank": rank, "boxes": [rank] * (rank + 1)})
        # Insertion order differs between ranks: reduction must still pair keys.
        values = {"loss": torch.tensor(float(rank)), "count": torch.tensor(2 * rank + 1)}
        if rank == 1:
            values = dict(reversed(values.items()))
        reduced = ddist.reduce_dict_mean(values)
        ddist.barrier()

        logger = MetricsLogger(out_dir, enabled=ddist.is_main_process(), tensorboard=False)
        with logger:
            logger.log(reduced, step=1, epoch=0)

        result = {
            "gathered": gathered,
            "reduced": {k: float(v) for k, v in reduced.items()},
            "keys": list(reduced),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        ddist.cleanup()


@pytest.mark.slow
def test_two_process_gloo_gather_and_reduce(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected_gather = [{"rank": 0, "boxes": [0]}, {"rank": 1, "boxes": [1, 1]}]
    for rank, result in enumerate(results):
        assert result["gathered"] == expected_gather
        assert result["reduced"] == {"loss": 0.5, "count": 2.0}
        assert result["keys"] == (["loss", "count"] if rank == 0 else ["count", "loss"])
    records = read_metrics(tmp_path)  # only rank 0 wrote
    assert len(records) == 1
    assert records[0]["loss"] == 0.5 and records[0]["count"] == 2.0


# --- metrics log ------------------------------------------------------------------------


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, enabled=True) as logger:
        logger.log({"loss": torch.tensor(1.5), "lr": 0.01, "note": "warmup"}, step=1, epoch=0)
        # Flushed per line: readable before the logger is closed.
        assert read_metrics(tmp_path)[0]["loss"] == 1.5
        logger.log({"loss/rm": 0.25}, step=2)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["epoch"] == 0 and records[0]["note"] == "warmup"
    assert "epoch" not in records[1] and records[1]["loss/rm"] == 0.25
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    logger.close()  # closing twice is fine
    logger.log({"loss": 1.0}, step=3)  # and logging after close is ignored
    assert len(read_metrics(tmp_path)) == 2


def test_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with MetricsLogger(run, enabled=False) as logger:
        logger.log({"loss": 1.0}, step=1)
    assert not run.exists()


def test_read_metrics_tolerates_a_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert [r["step"] for r in read_metrics(path)] == [1, 2]

    # A resumed run drops the cut-off line instead of gluing a record onto it.
    with MetricsLogger(tmp_path, enabled=True, tensorboard=False) as logger:
        logger.log({"loss": 0.25}, step=3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_read_metrics_rejects_corruption_in_the_middle(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "missing")
