"""The training loop behind ``detdistill train`` and ``detdistill distill``.

One loop for both: a plain run optimises the detector's own losses, a
distillation run the same plus the weighted distillation terms of a
:class:`~detdistill.distill.Distiller`. What the loop trains with is built by
:mod:`detdistill.engine.run_setup`; what it saves every epoch and on Ctrl-C,
and resumes from, is :mod:`detdistill.engine.run_state`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from detdistill import jsonio
from detdistill.distill import format_balance
from detdistill.engine.builders import DataSplits, build_eval_loader, evaluation_model
from detdistill.engine.checkpoint import STATE_FILE
from detdistill.engine.config import Config, save_config
from detdistill.engine.distributed import barrier, reduce_dict_mean
from detdistill.engine.metrics_log import MetricsLogger
from detdistill.engine.run_setup import build_run
from detdistill.engine.run_state import Progress, resume_run, save_run
from detdistill.errors import DetDistillError
from detdistill.evaluation import evaluate

log = logging.getLogger(__name__)


@contextmanager
def _whole_step() -> Iterator[None]:
    """Hold a Ctrl-C that arrives while a step is applied until the step is whole.

    Interrupted between the optimizer's update and the step counter, a run saved
    weights one step ahead of the position it would resume from. Only the main
    thread can catch signals; elsewhere (a Ray worker thread) nothing is held.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


class NonFiniteLossError(DetDistillError, RuntimeError):
    """A loss term became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float]
    epoch: int
    step: int
    status: str  # "completed", "interrupted" or "max_steps"
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """The loop of one run: its parts in :attr:`setup`, its position in :attr:`progress`."""

    def __init__(self, cfg: Config, data: DataSplits | None = None, show_progress: bool = True):
        self.cfg = cfg
        self.setup = build_run(cfg, data)
        self.progress = Progress()
        self.run_dir = Path(cfg.output_dir)
        self.show_progress = show_progress and self.setup.dist.is_main
        self.step_lr = 0.0  # the learning rate of the last step (logged as lr)

    def resume(self) -> None:
        """Continue from ``last_state.pt`` of the run directory."""
        self.progress = resume_run(self.setup, self.run_dir)

    def _save(self) -> None:
        save_run(self.setup, self.progress, self.run_dir)

    def choose_auto_weights(self, logger: MetricsLogger) -> None:
        """Measure on the run's first batches and fix every ``auto`` weight (once per run).

        The batches are the first ``distill.auto_batches`` of epoch 0, exactly
        those training starts with (and ``detdistill doctor`` shows); nothing
        is trained and the RNG state is kept, so the training curve does not
        depend on whether the weights were auto.
        """
        setup, distill_cfg = self.setup, self.cfg.distill
        assert setup.distiller is not None and distill_cfg is not None
        start = time.perf_counter()
        batches = setup.batches.first(distill_cfg.auto_batches)
        with torch.autocast(setup.device.type, enabled=setup.amp):
            chosen = setup.distiller.balance(batches, distill_cfg.auto_ratio)
        self.progress.balance = {name: b.as_dict() for name, b in chosen.items()}
        seconds = time.perf_counter() - start
        logger.log(
            {
                **{f"distill_weight/{n}": b.weight for n, b in chosen.items()},
                **{f"distill_grad_ratio/{n}": b.ratio for n, b in chosen.items()},
                "distill_weight/seconds": seconds,
            },
            step=self.progress.step,
            epoch=0,
        )
        if setup.dist.is_main:
            log.info(
                "auto weights from %d batches (%.1f s):\n%s",
                distill_cfg.auto_batches,
                seconds,
                format_balance(chosen),
            )

    def losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Named loss terms of one batch (weighted distillation terms included)."""
        setup = self.setup
        with torch.autocast(setup.device.type, enabled=setup.amp):
            distiller = setup.distiller
            if distiller is None:
                return setup.runner(images, targets).losses
            before = len(distiller.weight_changes)
            guarded = self.cfg.distill.auto_guard  # a distiller means a distill section
            losses = distiller(images, targets, step=self.progress.step if guarded else None)
            for change in distiller.weight_changes[before:]:
                if setup.dist.is_main:
                    log.warning(
                        "auto weight of %s lowered from %.4g to %.4g at step %d: its gradient "
                        "had grown to %.3gx the detection loss's (docs/weights.md, the guard)",
                        change["method"], change["from"], change["to"], change["step"],
                        change["grad_ratio"],
                    )  # fmt: skip
            return losses

    def train_step(
        self, images: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        setup, progress = self.setup, self.progress
        losses = self.losses(images, targets)
        total = sum(losses.values())
        if not torch.isfinite(total):
            bad = [name for name, value in losses.items() if not torch.isfinite(value)]
            raise NonFiniteLossError(
                f"loss term(s) {', '.join(bad)} became non-finite at step {progress.step} "
                f"(epoch {progress.epoch + 1}); the last good checkpoint in {self.run_dir} is "
                "kept. Lower train.lr or the method weights, or enable train.grad_clip."
            )
        setup.optimizer.zero_grad(set_to_none=True)
        setup.scaler.scale(total).backward()
        if self.cfg.train.grad_clip is not None:
            setup.scaler.unscale_(setup.optimizer)
            torch.nn.utils.clip_grad_norm_(setup.trainable.parameters(), self.cfg.train.grad_clip)
        with _whole_step():  # weights, schedule, EMA and position change together
            setup.scaler.step(setup.optimizer)
            setup.scaler.update()
            self.step_lr = setup.optimizer.param_groups[0]["lr"]  # the rate this step used
            setup.scheduler.step()
            if setup.ema is not None:
                setup.ema.update_parameters(setup.model)
            progress.step += 1
            progress.batch_in_epoch += 1
        losses["total"] = total
        return {k: v.detach() for k, v in losses.items()}

    def evaluate(self) -> dict[str, float]:
        setup = self.setup
        data_cfg = self.cfg.data
        loader = build_eval_loader(setup.data.val, data_cfg.batch_size, data_cfg.num_workers)
        model = evaluation_model(setup.eval_model(), data_cfg)
        result = evaluate(model, loader, setup.data.val, device=setup.device)
        return {k: float(v) for k, v in (result or {}).items() if isinstance(v, (int, float))}

    def fit(self) -> RunResult:
        """Train to the end (or ``max_steps``), evaluating and checkpointing every epoch."""
        cfg, setup, progress = self.cfg, self.setup, self.progress
        if setup.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        history: list[dict[str, Any]] = []
        status = "completed"
        evaluated = False  # at the step the run stopped
        fresh = progress.step == 0  # not resumed: start the run's logs anew
        with MetricsLogger(self.run_dir, enabled=setup.dist.is_main, fresh=fresh) as logger:
            if setup.distiller is not None and setup.distiller.needs_balance:
                self.choose_auto_weights(logger)
            try:
                while progress.epoch < cfg.train.epochs:
                    if self._train_epoch(logger):  # max_steps in the middle of an epoch
                        status, evaluated = "max_steps", False
                        break
                    progress.epoch += 1
                    progress.batch_in_epoch = 0
                    interval = cfg.train.eval_interval
                    evaluated = bool(interval and progress.epoch % interval == 0) or (
                        progress.epoch == cfg.train.epochs
                    )
                    if evaluated:
                        history.append(self._evaluate_epoch(logger))
                    self._save()
                    barrier()
                    if self._at_max_steps() and progress.epoch < cfg.train.epochs:
                        status = "max_steps"  # at an epoch's end: a resume starts the next one
                        break
            except KeyboardInterrupt:
                status = "interrupted"
                self._save()
                log.warning(
                    "interrupted at step %d; saved %s. Continue with --resume.",
                    progress.step,
                    self.run_dir / STATE_FILE,
                )
        if status == "max_steps" and not evaluated:
            progress.metrics = self.evaluate()
            self._save()
        if setup.dist.is_main:
            self._write_summary(status)
        return RunResult(
            self.run_dir, progress.metrics, progress.epoch, progress.step, status, history
        )

    def _evaluate_epoch(self, logger: MetricsLogger) -> dict[str, Any]:
        progress = self.progress
        progress.metrics = self.evaluate()
        record = {f"val/{k}": v for k, v in progress.metrics.items()}
        logger.log(record, step=progress.step, epoch=progress.epoch)
        if self.show_progress:
            shown = "  ".join(
                f"{k} {progress.metrics[k]:.4f}" for k in ("mAP", "AP50", "AP75")
                if k in progress.metrics
            )  # fmt: skip
            tqdm.write(f"epoch {progress.epoch}/{self.cfg.train.epochs}: {shown}")
        return {"epoch": progress.epoch, "step": progress.step, **record}

    def _write_summary(self, status: str) -> None:
        progress, distiller = self.progress, self.setup.distiller
        summary: dict[str, Any] = {
            "status": status,
            "epoch": progress.epoch,
            "step": progress.step,
            "metrics": progress.metrics,
        }
        if distiller is not None:
            summary["distill_weights"] = dict(distiller.weights)
            summary["weight_changes"] = list(distiller.weight_changes)
            summary["balance"] = progress.balance
        jsonio.write(self.run_dir / "summary.json", summary, indent=2)

    def _train_epoch(self, logger: MetricsLogger) -> bool:
        """One epoch from ``progress.batch_in_epoch``; True when ``max_steps`` was reached."""
        cfg, setup, progress = self.cfg, self.setup, self.progress
        setup.model.train()
        if hasattr(setup.model, "set_epoch"):  # a loss that changes by epoch (YOLO26)
            setup.model.set_epoch(progress.epoch, cfg.train.epochs)
        if setup.distiller is not None:
            setup.distiller.train()
        bar = tqdm(
            setup.batches.epoch(progress.epoch, progress.batch_in_epoch),
            total=len(setup.batches) - progress.batch_in_epoch,
            desc=f"epoch {progress.epoch + 1}/{cfg.train.epochs}",
            disable=not self.show_progress,
            dynamic_ncols=True,
            leave=False,
        )
        seen, start = 0, time.perf_counter()
        for images, targets in bar:
            losses = self.train_step(images, targets)
            seen += len(images) * setup.dist.world_size
            if progress.step % cfg.train.log_interval == 0 or progress.batch_in_epoch == len(
                setup.batches
            ):
                values = {k: float(v) for k, v in reduce_dict_mean(losses).items()}
                rate = seen / max(time.perf_counter() - start, 1e-9)
                weights = {} if setup.distiller is None else setup.distiller.weights
                logger.log(
                    {
                        "lr": self.step_lr,
                        "images_per_s": rate,
                        **{f"loss/{k}": v for k, v in values.items()},
                        **{f"distill_weight/{k}": w for k, w in weights.items()},
                    },
                    step=progress.step,
                    epoch=progress.epoch + 1,
                )
                bar.set_postfix(
                    {**{k: f"{v:.3f}" for k, v in values.items()}, "img/s": f"{rate:.0f}"}
                )
            if self._at_max_steps() and progress.batch_in_epoch < len(setup.batches):
                return True  # mid-epoch; at an epoch's end, the epoch finishes as every epoch
        return False

    def _at_max_steps(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return max_steps is not None and self.progress.step >= max_steps


def run(cfg: Config, resume: bool = False, show_progress: bool = True) -> RunResult:
    """Train (or distil, when ``cfg.distill`` is set) and return the final metrics."""
    trainer = Trainer(cfg, show_progress=show_progress)
    if resume:
        trainer.resume()
    return trainer.fit()
