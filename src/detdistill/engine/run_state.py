"""Saving and resuming a run: where it is (:class:`Progress`) and what it has learnt.

Every epoch (and on Ctrl-C) the run writes ``model.pt`` (the student alone, or
its EMA), ``ultralytics.pt`` for a YOLO student, and last ``last_state.pt``:
optimizer, schedule, scaler, EMA, RNG, position, the adapters and the
distillation weights as the guard left them. ``last_state.pt`` is the commit
point: a process killed between the writes resumes from the previous state and
writes both again, so ``model.pt`` never lags behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detdistill.engine.checkpoint import (
    STATE_FILE,
    ULTRALYTICS_FILE,
    WEIGHTS_FILE,
    capture_rng_state,
    load_checkpoint,
    make_weights_payload,
    restore_rng_state,
    save_checkpoint,
)
from detdistill.engine.config import config_to_dict
from detdistill.engine.run_setup import RunSetup
from detdistill.errors import CheckpointError
from detdistill.state_dicts import load_state_dict_strict

__all__ = ["Progress", "resume_run", "save_run"]


@dataclass
class Progress:
    """Where a run is: the epoch, the batch within it, steps done, the last metrics."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    # What auto weighting measured and chose at the start (method -> TermBalance.as_dict()).
    balance: dict[str, dict[str, Any]] = field(default_factory=dict)


def save_run(setup: RunSetup, progress: Progress, run_dir: Path) -> None:
    """Write the run's weights, then its resumable state (main process only)."""
    if not setup.dist.is_main:
        return
    config = config_to_dict(setup.cfg)
    model = setup.eval_model()
    class_names = setup.data.class_names
    weights = make_weights_payload(
        model.state_dict(),
        config,
        class_names,
        progress.epoch,
        progress.step,
        progress.metrics,
        category_ids=getattr(setup.data.val, "category_ids", None),
    )
    state: dict[str, Any] = {
        "model": setup.model.state_dict(),
        "optimizer": setup.optimizer.state_dict(),
        "scheduler": setup.scheduler.state_dict(),
        "scaler": setup.scaler.state_dict(),
        "ema": setup.ema.state_dict() if setup.ema is not None else None,
        "rng": capture_rng_state(),
        "epoch": progress.epoch,
        "batch_in_epoch": progress.batch_in_epoch,
        "step": progress.step,
        "metrics": progress.metrics,
        "config": config,
    }
    distiller = setup.distiller
    if distiller is not None:
        state["adapters"] = distiller.adapters.state_dict()
        state["teacher"] = setup.teacher_info
        state["distill_weights"] = dict(distiller.weights)
        state["weight_changes"] = list(distiller.weight_changes)
        state["guard_reference"] = dict(distiller.guard_reference)
        state["balance"] = progress.balance
    save_checkpoint(run_dir / WEIGHTS_FILE, weights)
    if hasattr(model, "ultralytics_checkpoint"):  # the student in its users' own format too
        save_checkpoint(run_dir / ULTRALYTICS_FILE, model.ultralytics_checkpoint(class_names))
    save_checkpoint(run_dir / STATE_FILE, state)


def resume_run(setup: RunSetup, run_dir: Path) -> Progress:
    """Load ``last_state.pt`` of ``run_dir`` into ``setup``; the position to continue from."""
    path = run_dir / STATE_FILE
    if not path.exists():
        raise CheckpointError(f"nothing to resume: {path} does not exist")
    state = load_checkpoint(path, map_location=setup.device)
    load_state_dict_strict(setup.model, state["model"], f"{path}: the model")
    try:
        setup.optimizer.load_state_dict(state["optimizer"])
    except ValueError as error:  # another parameter layout: another model or method set
        raise CheckpointError(
            f"{path}: the optimizer state does not fit this run ({error}); "
            "resume with the config the run started with"
        ) from None
    setup.scheduler.load_state_dict(state["scheduler"])
    setup.scaler.load_state_dict(state["scaler"])
    if setup.ema is not None and state.get("ema") is not None:
        setup.ema.load_state_dict(state["ema"])
    progress = Progress(
        epoch=int(state["epoch"]),
        batch_in_epoch=int(state["batch_in_epoch"]),
        step=int(state["step"]),
        metrics=dict(state.get("metrics") or {}),
    )
    distiller = setup.distiller
    if distiller is not None:
        saved = state.get("teacher") or {}
        if saved.get("sha256") != setup.teacher_info["sha256"]:
            raise CheckpointError(
                f"the teacher changed since this run started: it was {saved.get('path')} "
                f"(sha256 {str(saved.get('sha256'))[:12]}), now {setup.teacher_info['path']} "
                f"(sha256 {setup.teacher_info['sha256'][:12]})"
            )
        adapters = _adapters_by_tap(state.get("adapters") or {})
        load_state_dict_strict(distiller.adapters, adapters, f"{path}: the adapters")
        # The weights as they were: chosen at the start, lowered by the guard since.
        saved_weights = state.get("distill_weights") or {}
        distiller.set_weights(
            {k: v for k, v in saved_weights.items() if k in distiller.auto_methods}
        )
        distiller.weight_changes = list(state.get("weight_changes") or [])
        distiller.guard_reference = dict(state.get("guard_reference") or {})
        progress.balance = dict(state.get("balance") or {})
    restore_rng_state(state["rng"])
    if progress.batch_in_epoch >= len(setup.batches):
        progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
    return progress


def _adapters_by_tap(saved: dict[str, Any]) -> dict[str, Any]:
    """The saved adapters keyed by tap (``neck.0.weight``).

    Runs saved before methods declared taps kept one list of adapters, keyed
    by level alone (``0.weight``): those were the neck's, the only tap then.
    """
    if saved and all(key.split(".", 1)[0].isdigit() for key in saved):
        return {f"neck.{key}": value for key, value in saved.items()}
    return saved
