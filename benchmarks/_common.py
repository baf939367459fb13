"""What every benchmark records next to its numbers: when, which code, which machine."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from detdistill import jsonio


def environment() -> dict[str, object]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], capture_output=True, text=True
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {
        "command": "python " + shlex.join(sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit + ("-dirty" if dirty else ""),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        # Other work on the machine when the benchmark started (0 on a quiet machine).
        "load_average_1min": os.getloadavg()[0],
    }


def call_times(
    fns: Mapping[str, Callable[[], object]], repeats: int = 5, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall times of ``repeats`` calls of each function, after ``warmup`` untimed ones.

    The functions take turns within each round, in reversed order every other
    round, so that a change in the machine's load (another job starting, the
    allocator warming up) falls on all of them alike. Timing one function's
    repeats after another's biases their ratio by whatever changed in between.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for _ in range(repeats):
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
        order.reverse()
    return times


def paired_ratios(
    times: Mapping[str, list[float]], numerator: str, denominator: tuple[str, ...]
) -> dict[str, object]:
    """``numerator / sum(denominator)`` per round of :func:`call_times`, and their quartiles.

    The calls of one round run back to back, within seconds, while this
    machine's speed drifts by +-15% over minutes: a ratio taken within a round
    cancels the drift, where a ratio of two separately chosen best or median
    times does not. The median of the per-round ratios is the estimate; the
    quartiles say how far to trust it.
    """
    ratios = [
        top / sum(parts)
        for top, *parts in zip(times[numerator], *(times[d] for d in denominator), strict=True)
    ]
    q1, _, q3 = (
        statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    )
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "ratios": ratios}


def best_times(
    fns: Mapping[str, Callable[[], object]], repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Best wall time of each function (interleaved, see :func:`call_times`): the least disturbed."""
    return {name: min(t) for name, t in call_times(fns, repeats, warmup).items()}


def best_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Best wall time of ``repeats`` calls of one function."""
    return best_times({"fn": fn}, repeats, warmup)["fn"]


def emit(result: dict, out: str | None) -> None:
    text = jsonio.dumps(result, indent=2)  # strict: NaN/inf as null
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
