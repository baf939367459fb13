"""The walk of one training batch (docs/architecture.md), traced call by call.

From the batch the loader yields to ``rank_mimicking_loss``: the files it
passes through are the ones the architecture page lists, in that order, at
most 8 of them with the trainer that calls the step, and no
package calls back into one that called it (calls go down: distill -> models,
distill -> losses -> models; never models -> distill).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from detdistill.data.loader import batch_to_device
from detdistill.distill import Distiller
from test_distill import batch, tiny

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _trace_one_step() -> list[tuple[str, str]]:
    """(file under src/detdistill, caller's file) of every call until rank_mimicking_loss."""
    distiller = Distiller(tiny(width=8), tiny(width=16), {"rm": 1.0}).train()
    images, targets = batch_to_device(*batch(), "cpu")  # as TrainingBatches yields it
    calls: list[tuple[str, str]] = []

    def ours(frame) -> str | None:
        name = frame.f_code.co_filename
        return name.split("/src/detdistill/")[1] if "/src/detdistill/" in name else None

    def tracer(frame, event, arg):
        if event == "call" and ours(frame):
            caller = frame.f_back  # through torch's Module.__call__ to our calling frame
            while caller is not None and ours(caller) is None:
                caller = caller.f_back
            calls.append((ours(frame), ours(caller) if caller else "test"))
            if frame.f_code.co_name == "rank_mimicking_loss":
                sys.settrace(None)

    sys.settrace(tracer)
    try:  # what Trainer.train_step does with a batch from the loader
        distiller(images, targets)
    finally:
        sys.settrace(None)
    return calls


def _package(file: str) -> str:
    return file.split("/")[0] if "/" in file else file.removesuffix(".py")


def test_the_walk_is_the_documented_one_without_call_backs():
    calls = _trace_one_step()
    assert calls[-1][0] == "losses/rank_mimicking.py"
    visited = list(dict.fromkeys(here for here, _ in calls))
    section = ARCHITECTURE.read_text().split("## One batch, from the loader to Rank Mimicking")[1]
    documented = re.findall(r"^\d+\. `([\w/]+\.py)`", section, flags=re.MULTILINE)
    assert documented[0] == "engine/trainer.py"  # the caller of the traced step
    assert visited == documented[1:], "docs/architecture.md's walk is out of date"
    assert len(documented) <= 8, f"one batch crosses {len(documented)} files (at most 8)"
    edges = {
        (_package(caller), _package(here))
        for here, caller in calls
        if caller != "test" and _package(caller) != _package(here)
    }
    call_backs = {(a, b) for a, b in edges if (b, a) in edges}
    assert not call_backs, f"packages calling back into their caller: {sorted(call_backs)}"
