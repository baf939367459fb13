"""Run metrics as JSON lines (``metrics.jsonl``) mirrored to TensorBoard (``tb/``).

JSON lines are the record that scripts (``detdistill compare``, benchmarks)
read back; each line is flushed as it is written so a crash loses at most the
line being written, and :func:`read_metrics` skips such a truncated last line.
TensorBoard is the live view. Only the main process writes: construct the
logger with ``enabled=is_main_process()`` and call it on every rank.
"""

from __future__ import annotations

import json
import numbers
import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import torch

from detdistill.jsonio import dumps

__all__ = ["METRICS_FILE", "TENSORBOARD_DIR", "MetricsLogger", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"


def _plain(value: Any) -> Any:
    """Tensors and NumPy scalars → Python numbers, so they serialise as JSON."""
    if isinstance(value, torch.Tensor):
        return value.detach().item() if value.numel() == 1 else value.detach().tolist()
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


class MetricsLogger:
    """Append metric records to ``run_dir/metrics.jsonl`` and TensorBoard.

    ``enabled=False`` (non-main ranks) turns every method into a no-op, so
    callers need no rank checks. ``fresh=True`` (a run that is not resumed)
    first removes an earlier run's records from the folder.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        enabled: bool = True,
        tensorboard: bool = True,
        fresh: bool = False,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._file: IO[str] | None = None
        self._writer: Any = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        if fresh:  # a new run in an old run's folder: its curves must not mix with the old ones
            path.unlink(missing_ok=True)
            for old in (self.run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"):
                old.unlink()
        _drop_partial_last_line(path)  # a resumed run must not glue onto a cut-off line
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import, only when used

            self._writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR))

    def log(self, values: Mapping[str, Any], step: int, epoch: int | None = None) -> None:
        """Write one record ``{"step", "epoch", "time", **values}``; scalars also go to TB."""
        if not self.enabled or self._file is None:
            return
        record: dict[str, Any] = {"step": int(step)}
        if epoch is not None:
            record["epoch"] = int(epoch)
        record["time"] = round(time.time(), 3)
        for key, value in values.items():
            record[key] = _plain(value)
        self._file.write(dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key in ("step", "time"):
                    continue
                if isinstance(value, numbers.Real) and not isinstance(value, bool):
                    self._writer.add_scalar(key, float(value), int(step))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close both sinks; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _drop_partial_last_line(path: Path) -> None:
    """Cut a line that a crash left without its newline (it is unreadable anyway)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of ``run_dir/metrics.jsonl`` (or of that file given directly), in order.

    A last line cut off by a crash is skipped; a bad line elsewhere is an error
    naming the file and line, since that is not something a crash produces.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file: {path}")
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            is_last = all(not rest.strip() for rest in lines[number:])
            if is_last:
                break
            raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
        if isinstance(record, dict):
            records.append(record)
    return records
