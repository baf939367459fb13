"""The training loop behind ``detdistill train`` and ``detdistill distill``.

One loop for both: a plain run optimises the detector's own losses, a
distillation run the same plus the weighted distillation terms of a
:class:`~detdistill.distill.Distiller`. Everything a resumed run needs is saved
every epoch and on Ctrl-C, so a resumed run continues the same curve.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from detdistill.data import collate_fn
from detdistill.data.errors import DataError
from detdistill.data.loader import batch_to_device
from detdistill.distill import Distiller
from detdistill.distill.auto_weights import format_balance
from detdistill.engine.builders import (
    DataSplits,
    build_datasets,
    build_eval_loader,
    build_model,
    evaluation_model,
    load_detector,
)
from detdistill.engine.checkpoint import (
    STATE_FILE,
    ULTRALYTICS_FILE,
    WEIGHTS_FILE,
    capture_rng_state,
    file_sha256,
    load_checkpoint,
    make_weights_payload,
    restore_rng_state,
    save_checkpoint,
)
from detdistill.engine.config import Config, ConfigError, TrainConfig, config_to_dict, save_config
from detdistill.engine.distributed import DistInfo, barrier, init_distributed, reduce_dict_mean
from detdistill.engine.metrics_log import MetricsLogger
from detdistill.engine.sampling import (
    ResumableBatchSampler,
    SeededAugmentation,
    first_training_batches,
)
from detdistill.engine.schedule import build_scheduler, lr_factor
from detdistill.engine.validate import validate_config
from detdistill.errors import CheckpointError, DetDistillError
from detdistill.evaluation import evaluate
from detdistill.jsonio import dumps

log = logging.getLogger(__name__)


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


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on norms and biases (1-D tensors), as is usual for detectors."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def load_teacher(cfg: Config, device: torch.device) -> tuple[nn.Module, dict[str, str]]:
    """The teacher, loaded strictly from its checkpoint; returns it with its path and hash."""
    assert cfg.distill is not None
    path = Path(cfg.distill.teacher_checkpoint)
    loaded = load_detector(path, cfg.distill.teacher_model)
    return loaded.model.to(device), {"path": str(path.resolve()), "sha256": file_sha256(path)}


def check_has_boxes(train: Dataset) -> None:
    """A training split without a single box has nothing to teach: say so before training.

    Images without objects are legitimate negatives next to positives, but a
    split of negatives only would train to the end and report mAP 0.
    """
    base = train
    while hasattr(base, "dataset"):  # tiles and seeded augmentation wrap the data set
        base = base.dataset
    problems = getattr(base, "problems", None)
    if problems is not None and problems.info.get("annotations", 1) == 0:
        raise DataError(
            f"{problems.source}: the training split has {len(base)} images and no boxes at all "
            "(every annotation missing or dropped): there is nothing to learn"
        )


class Trainer:
    """Owns the model(s), optimiser state and run directory of one run."""

    def __init__(self, cfg: Config, data: DataSplits | None = None, show_progress: bool = True):
        validate_config(cfg)  # names and method options, before any data or model work
        self.cfg = cfg
        self.dist: DistInfo = init_distributed(cfg.device)
        self.device = self.dist.device
        self.run_dir = Path(cfg.output_dir)
        self.show_progress = show_progress and self.dist.is_main
        torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts)

        self.data = data or self._build_data()
        if cfg.model.num_classes != len(self.data.class_names):
            raise ConfigError(
                f"model.num_classes is {cfg.model.num_classes} but the data has "
                f"{len(self.data.class_names)} classes: {', '.join(self.data.class_names)}",
                "model.num_classes",
            )
        check_has_boxes(self.data.train)
        self.model = build_model(cfg.model, cfg.data.model_input_size).to(self.device)
        self.distiller: Distiller | None = None
        self.teacher_info: dict[str, str] | None = None
        if cfg.distill is not None:
            teacher, self.teacher_info = load_teacher(cfg, self.device)
            self.distiller = Distiller(
                self.model,
                teacher,
                cfg.distill.methods,
                cfg.distill.method_options,
                teacher_half=cfg.distill.teacher_half,
                teacher_channels_last=cfg.distill.teacher_channels_last,
                teacher_compile=cfg.distill.teacher_compile,
                auto_ratio=cfg.distill.auto_ratio,
            ).to(self.device)
            trainable: nn.Module = self.distiller.branch
        else:
            trainable = self.model
        self.trainable = trainable
        self.runner: nn.Module = trainable
        if self.dist.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.runner = DistributedDataParallel(trainable, device_ids=device_ids)
            if self.distiller is not None:
                self.distiller.wrap_student(self.runner)

        params = [p for p in trainable.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, cfg.train)
        self.train_set = SeededAugmentation(self.data.train, cfg.seed)
        self.sampler = ResumableBatchSampler(
            len(self.train_set),
            cfg.data.batch_size,
            shuffle=True,
            seed=cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.iters_per_epoch = self.sampler.batches_per_epoch()
        total = cfg.train.epochs * self.iters_per_epoch
        self.scheduler = build_scheduler(
            self.optimizer,
            lr_factor(
                cfg.train.schedule,
                total,
                self.iters_per_epoch,
                min(cfg.train.warmup_iters, total),
                cfg.train.warmup_factor,
                cfg.train.milestones,
                cfg.train.gamma,
            ),
        )
        self.amp = cfg.train.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.ema = (
            AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True
            )
            if cfg.train.ema
            else None
        )
        self.epoch = 0
        self.batch_in_epoch = 0
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.balance: dict[str, dict[str, Any]] = {}  # what auto weighting measured and chose

    def _build_data(self) -> DataSplits:
        """Rank 0 first: embedded data is generated once, then every rank reads it."""
        if not self.dist.is_main:
            barrier()
        data = build_datasets(self.cfg.data)
        if self.dist.is_main:
            barrier()
        return data

    # ------------------------------------------------------------------ state

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _save(self) -> None:
        if not self.dist.is_main:
            return
        config = config_to_dict(self.cfg)
        weights = make_weights_payload(
            self.eval_model().state_dict(),
            config,
            self.data.class_names,
            self.epoch,
            self.step,
            self.metrics,
        )
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": capture_rng_state(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "metrics": self.metrics,
            "config": config,
        }
        if self.distiller is not None:
            state["adapters"] = self.distiller.adapters.state_dict()
            state["teacher"] = self.teacher_info
            state["distill_weights"] = dict(self.distiller.weights)
            state["weight_changes"] = list(self.distiller.weight_changes)
            state["guard_reference"] = dict(self.distiller.guard_reference)
            state["balance"] = self.balance
        # The weights first, the resumable state last: the state is the commit point. A
        # process killed in between resumes from the previous state and writes both again,
        # so model.pt never lags behind last_state.pt.
        save_checkpoint(self.run_dir / WEIGHTS_FILE, weights)
        model = self.eval_model()
        if hasattr(model, "ultralytics_checkpoint"):  # the student in its users' own format too
            payload = model.ultralytics_checkpoint(self.data.class_names)
            save_checkpoint(self.run_dir / ULTRALYTICS_FILE, payload)
        save_checkpoint(self.run_dir / STATE_FILE, state)

    def resume(self) -> None:
        """Continue from ``last_state.pt`` of the run directory."""
        path = self.run_dir / STATE_FILE
        if not path.exists():
            raise CheckpointError(f"nothing to resume: {path} does not exist")
        state = load_checkpoint(path, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.distiller is not None:
            self.distiller.adapters.load_state_dict(state["adapters"])
            # The weights as they were: chosen at the start, lowered by the guard since.
            saved_weights = state.get("distill_weights") or {}
            self.distiller.set_weights(
                {k: v for k, v in saved_weights.items() if k in self.distiller.auto_methods}
            )
            self.balance = dict(state.get("balance") or {})
            self.distiller.weight_changes = list(state.get("weight_changes") or [])
            self.distiller.guard_reference = dict(state.get("guard_reference") or {})
            saved = state.get("teacher") or {}
            if saved.get("sha256") != self.teacher_info["sha256"]:
                raise CheckpointError(
                    f"the teacher changed since this run started: it was {saved.get('path')} "
                    f"(sha256 {str(saved.get('sha256'))[:12]}), now {self.teacher_info['path']} "
                    f"(sha256 {self.teacher_info['sha256'][:12]})"
                )
        restore_rng_state(state["rng"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.step = int(state["step"])
        self.metrics = dict(state.get("metrics") or {})
        if self.batch_in_epoch >= self.iters_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    # ------------------------------------------------------------------ loop

    def _loader(self) -> DataLoader:
        self.train_set.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        return DataLoader(
            self.train_set,
            batch_sampler=self.sampler,
            collate_fn=collate_fn,
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def choose_auto_weights(self, logger: MetricsLogger) -> None:
        """Measure on the run's first batches and fix every ``auto`` weight (once per run).

        The batches are the first ``distill.auto_batches`` of epoch 0, exactly
        those training starts with (and ``detdistill doctor`` shows); nothing
        is trained and the RNG state is kept, so the training curve does not
        depend on whether the weights were auto.
        """
        assert self.distiller is not None and self.cfg.distill is not None
        start = time.perf_counter()
        batches = (
            batch_to_device(images, targets, self.device)
            for images, targets in first_training_batches(
                self.data.train,
                self.cfg.data.batch_size,
                self.cfg.seed,
                self.cfg.distill.auto_batches,
                self.dist.rank,
                self.dist.world_size,
            )
        )
        with torch.autocast(self.device.type, enabled=self.amp):
            chosen = self.distiller.balance(batches, self.cfg.distill.auto_ratio)
        self.balance = {name: b.as_dict() for name, b in chosen.items()}
        seconds = time.perf_counter() - start
        logger.log(
            {
                **{f"distill_weight/{n}": b.weight for n, b in chosen.items()},
                **{f"distill_grad_ratio/{n}": b.ratio for n, b in chosen.items()},
                "distill_weight/seconds": seconds,
            },
            step=self.step,
            epoch=0,
        )
        if self.dist.is_main:
            log.info(
                "auto weights from %d batches (%.1f s):\n%s",
                self.cfg.distill.auto_batches,
                seconds,
                format_balance(chosen),
            )

    def losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Named loss terms of one batch (weighted distillation terms included)."""
        with torch.autocast(self.device.type, enabled=self.amp):
            if self.distiller is not None:
                before = len(self.distiller.weight_changes)
                guarded = self.cfg.distill.auto_guard  # a distiller means a distill section
                losses = self.distiller(images, targets, step=self.step if guarded else None)
                for change in self.distiller.weight_changes[before:]:
                    if self.dist.is_main:
                        log.warning(
                            "auto weight of %s lowered from %.4g to %.4g at step %d: its gradient "
                            "had grown to %.3gx the detection loss's (docs/weights.md, the guard)",
                            change["method"], change["from"], change["to"], change["step"],
                            change["grad_ratio"],
                        )  # fmt: skip
                return losses
            return self.runner(images, targets).losses

    def train_step(
        self, images: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        images, targets = batch_to_device(images, targets, self.device)
        losses = self.losses(images, targets)
        total = sum(losses.values())
        if not torch.isfinite(total):
            bad = [name for name, value in losses.items() if not torch.isfinite(value)]
            raise NonFiniteLossError(
                f"loss term(s) {', '.join(bad)} became non-finite at step {self.step} "
                f"(epoch {self.epoch + 1}); the last good checkpoint in {self.run_dir} is kept. "
                "Lower train.lr or the method weights, or enable train.grad_clip."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.cfg.train.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        losses["total"] = total
        return {k: v.detach() for k, v in losses.items()}

    def evaluate(self) -> dict[str, float]:
        loader = build_eval_loader(
            self.data.val, self.cfg.data.batch_size, self.cfg.data.num_workers
        )
        model = evaluation_model(self.eval_model(), self.cfg.data)
        result = evaluate(model, loader, self.data.val, device=self.device)
        return {k: float(v) for k, v in (result or {}).items() if isinstance(v, (int, float))}

    def fit(self) -> RunResult:
        """Train to the end (or ``max_steps``), evaluating and checkpointing every epoch."""
        cfg = self.cfg
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        history: list[dict[str, Any]] = []
        status = "completed"
        with MetricsLogger(self.run_dir, enabled=self.dist.is_main) as logger:
            if self.distiller is not None and self.distiller.needs_balance:
                self.choose_auto_weights(logger)
            try:
                while self.epoch < cfg.train.epochs:
                    if self._train_epoch(logger):
                        status = "max_steps"
                        break
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    interval = cfg.train.eval_interval
                    if (interval and self.epoch % interval == 0) or self.epoch == cfg.train.epochs:
                        self.metrics = self.evaluate()
                        record = {f"val/{k}": v for k, v in self.metrics.items()}
                        logger.log(record, step=self.step, epoch=self.epoch)
                        history.append({"epoch": self.epoch, "step": self.step, **record})
                        if self.show_progress:
                            tqdm.write(
                                f"epoch {self.epoch}/{cfg.train.epochs}: "
                                + "  ".join(
                                    f"{k} {self.metrics[k]:.4f}"
                                    for k in ("mAP", "AP50", "AP75")
                                    if k in self.metrics
                                )
                            )
                    self._save()
                    barrier()
            except KeyboardInterrupt:
                status = "interrupted"
                self._save()
                log.warning(
                    "interrupted at step %d; saved %s. Continue with --resume.",
                    self.step,
                    self.run_dir / STATE_FILE,
                )
        if status == "max_steps":
            self.metrics = self.evaluate()
            self._save()
        if self.dist.is_main:
            summary: dict[str, Any] = {
                "status": status,
                "epoch": self.epoch,
                "step": self.step,
                "metrics": self.metrics,
            }
            if self.distiller is not None:
                summary["distill_weights"] = dict(self.distiller.weights)
                summary["weight_changes"] = list(self.distiller.weight_changes)
                summary["balance"] = self.balance
            (self.run_dir / "summary.json").write_text(dumps(summary, indent=2) + "\n")
        return RunResult(self.run_dir, self.metrics, self.epoch, self.step, status, history)

    def _train_epoch(self, logger: MetricsLogger) -> bool:
        """One epoch from ``batch_in_epoch``; True when ``max_steps`` was reached."""
        cfg = self.cfg
        self.model.train()
        if hasattr(self.model, "set_epoch"):  # a loss that changes by epoch (YOLO26)
            self.model.set_epoch(self.epoch, cfg.train.epochs)
        if self.distiller is not None:
            self.distiller.train()
        loader = self._loader()
        bar = tqdm(
            loader,
            total=len(loader),
            desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}",
            disable=not self.show_progress,
            dynamic_ncols=True,
            leave=False,
        )
        seen, start = 0, time.perf_counter()
        for images, targets in bar:
            losses = self.train_step(images, targets)
            self.step += 1
            self.batch_in_epoch += 1
            seen += len(images) * self.dist.world_size
            if (
                self.step % cfg.train.log_interval == 0
                or self.batch_in_epoch == self.iters_per_epoch
            ):
                values = {k: float(v) for k, v in reduce_dict_mean(losses).items()}
                rate = seen / max(time.perf_counter() - start, 1e-9)
                logger.log(
                    {
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "images_per_s": rate,
                        **{f"loss/{k}": v for k, v in values.items()},
                        **(
                            {}
                            if self.distiller is None
                            else {
                                f"distill_weight/{k}": w for k, w in self.distiller.weights.items()
                            }
                        ),
                    },
                    step=self.step,
                    epoch=self.epoch + 1,
                )
                bar.set_postfix(
                    {**{k: f"{v:.3f}" for k, v in values.items()}, "img/s": f"{rate:.0f}"}
                )
            if cfg.train.max_steps is not None and self.step >= cfg.train.max_steps:
                return True
        return False


def run(cfg: Config, resume: bool = False, show_progress: bool = True) -> RunResult:
    """Train (or distil, when ``cfg.distill`` is set) and return the final metrics."""
    trainer = Trainer(cfg, show_progress=show_progress)
    if resume:
        trainer.resume()
    return trainer.fit()
