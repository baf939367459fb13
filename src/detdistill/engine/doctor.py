"""Checks before a long run: the failures that otherwise show up hours later.

Run by ``detdistill doctor CONFIG`` and at the start of every ``distill``:
weights load strictly, the teacher actually detects (its validation mAP), the
teacher and student are compatible, every level's shapes, each method's weight
(the one ``auto`` will choose, measured on the same first batches training
uses) with the gradient ratio it amounts to, and each loss term's size at
step 0 next to the detection loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Subset

from detdistill.distill import Distiller, IncompatibleModelsError
from detdistill.distill.auto_weights import format_balance
from detdistill.engine.builders import (
    build_datasets,
    build_eval_loader,
    build_model,
    evaluation_model,
    load_detector,
)
from detdistill.engine.config import Config
from detdistill.engine.distributed import resolve_device
from detdistill.engine.sampling import TrainingBatches
from detdistill.engine.validate import validate_config
from detdistill.errors import CheckpointError, ConfigError
from detdistill.evaluation import evaluate

MIN_TEACHER_MAP = 0.02
LOSS_RATIO_LIMIT = 100.0
TEACHER_EVAL_IMAGES = 500


@dataclass
class DoctorReport:
    lines: list[tuple[str, str]] = field(default_factory=list)  # (status, message)

    def add(self, status: str, message: str) -> None:
        self.lines.append((status, message))

    @property
    def ok(self) -> bool:
        return all(status != "FAIL" for status, _ in self.lines)

    def render(self) -> str:
        body = "\n".join(f"[{status:4s}] {message}" for status, message in self.lines)
        verdict = "all checks passed" if self.ok else "some checks FAILED: fix them before training"
        return f"detdistill doctor\n{body}\n{verdict}"


def run_doctor(cfg: Config, max_eval_images: int = TEACHER_EVAL_IMAGES) -> DoctorReport:
    """Run every check that applies to ``cfg`` and collect the findings (never raises for them)."""
    report = DoctorReport()
    try:
        validate_config(cfg)
    except ConfigError as exc:
        report.add("FAIL", str(exc))
        return report
    device = resolve_device(cfg.device)
    data = build_datasets(cfg.data)
    report.add(
        "OK",
        f"data: {len(data.train)} train / {len(data.val)} val images, {len(data.class_names)} classes",
    )
    try:  # the batches training starts with, made as the trainer makes them
        batches = TrainingBatches(data.train, cfg.data.batch_size, cfg.seed, device=device)
    except ConfigError as exc:
        report.add("FAIL", str(exc))
        return report
    torch.manual_seed(cfg.seed)  # the initial student the trainer builds
    student = build_model(cfg.model, cfg.data.model_input_size).to(device)
    n_params = sum(p.numel() for p in student.parameters())
    report.add(
        "OK", f"student {cfg.model.name}/{cfg.model.backbone}: {n_params / 1e6:.2f} M parameters"
    )
    if cfg.model.num_classes != len(data.class_names):
        report.add(
            "FAIL",
            f"model.num_classes={cfg.model.num_classes} but the data has {len(data.class_names)} classes",
        )
        return report

    teacher = None
    if cfg.distill is not None:
        try:
            loaded = load_detector(
                cfg.distill.teacher_checkpoint, cfg.distill.teacher_model, device
            )
        except CheckpointError as exc:
            report.add("FAIL", f"teacher checkpoint: {exc}")
            return report
        teacher = loaded.model.to(device).eval()
        report.add("OK", f"teacher weights load strictly from {cfg.distill.teacher_checkpoint}")
        if loaded.class_names != data.class_names:
            report.add(
                "FAIL",
                f"teacher classes {loaded.class_names} differ from the data's {data.class_names}",
            )
            return report
        subset = Subset(data.val, range(min(max_eval_images, len(data.val))))
        loader = build_eval_loader(subset, cfg.data.batch_size, 0)
        # A DataLoader draws its base seed from the global RNG: keep the stream the trainer
        # sees, so the adapters (and the auto weights) match those of a real run.
        with torch.random.fork_rng(devices=[]):
            model = evaluation_model(teacher, cfg.data)
            metrics = evaluate(model, loader, data.val, device=device, progress=False) or {}
        teacher_map = float(metrics.get("mAP", 0.0))
        status = "OK" if teacher_map >= MIN_TEACHER_MAP else "FAIL"
        report.add(
            status,
            f"teacher mAP {100 * teacher_map:.1f} on {len(subset)} validation images"
            + (
                ""
                if status == "OK"
                else f" (below {100 * MIN_TEACHER_MAP:.0f}: wrong or untrained weights?)"
            ),
        )
        try:
            distiller = Distiller(
                student, teacher, cfg.distill.methods, cfg.distill.method_options
            ).to(device)
        except (IncompatibleModelsError, ValueError) as exc:
            report.add("FAIL", str(exc))
            return report
        report.add(
            "OK", "teacher and student are compatible (levels, strides, anchors, classes, input)"
        )
        _check_weights(report, cfg, batches, distiller)
    _check_step_zero(
        report, cfg, batches, student, teacher, distiller if teacher is not None else None
    )
    return report


def _check_weights(report, cfg, batches, distiller) -> None:
    """Each term's weight (auto ones chosen as training will) and its gradient ratio."""
    batches = batches.first(cfg.distill.auto_batches)
    distiller.train()
    try:
        chosen = distiller.balance(batches, cfg.distill.auto_ratio)
    except ValueError as exc:
        report.add("FAIL", str(exc))
        return
    for line in format_balance(chosen).splitlines():
        report.add("OK", line)
    for name, b in chosen.items():
        if b.auto and b.detection_grad_norm > 0 and b.grad_norm < NEAR_ZERO * b.detection_grad_norm:
            report.add(
                "WARN",
                f"{name}: its gradient is {b.grad_norm / b.detection_grad_norm:.2g}x the detection "
                f"loss's at the start, so auto gives it weight {b.weight:.3g}: the student already "
                "agrees with the teacher (a copy, fine-tuned or pruned?). The guard lowers the "
                "weight as the student drifts (docs/weights.md); the scale-free form "
                "(weight_norm: mean, feature_norm: channel) does not depend on the agreement",
            )


# A term whose gradient at the start is under this fraction of the detection loss's has
# almost nothing to imitate (normal from-scratch runs: PFI 3e-4 on `digits`; a perturbed copy
# of the teacher: 1e-6).
NEAR_ZERO = 1e-5


def _check_step_zero(report, cfg, batches, student, teacher, distiller) -> None:
    """Shapes per level and every loss term's size on the run's first batch, without a step."""
    images, targets = next(batches.first(1))
    torch.manual_seed(cfg.seed)
    student.train()
    with torch.no_grad():
        if teacher is None:
            s_out, t_out = student(images, targets), None
        else:
            pair = distiller.run_pair(images, targets)
            s_out, t_out = pair.student, pair.teacher
        for level, stride in enumerate(student.strides):
            line = (
                f"level {level} (stride {stride}): student features {tuple(s_out.features[level].shape)}, "
                f"logits {tuple(s_out.cls_logits[level].shape)}"
            )
            if t_out is not None:
                line += (
                    f"; teacher features {tuple(t_out.features[level].shape)}, "
                    f"logits {tuple(t_out.cls_logits[level].shape)}"
                )
            report.add("OK", line)
        positives = sum(int((m >= 0).sum()) for m in s_out.matched_idxs)
        report.add(
            "OK" if positives else "WARN", f"{positives} positive anchors in the first batch"
        )
        if distiller is None or distiller.needs_balance:
            return
        losses = distiller(images, targets)
    detection = sum(float(losses[k]) for k in s_out.losses)
    report.add("OK", f"detection loss at step 0: {detection:.4f}")
    for name in distiller.methods:
        value = float(losses[name])
        ratio = value / detection if detection > 0 else float("inf")
        if value == 0.0:
            report.add("WARN", f"{name}: exactly 0 at step 0 (no candidates? identical networks?)")
        elif ratio > LOSS_RATIO_LIMIT or ratio < 1 / LOSS_RATIO_LIMIT:
            report.add(
                "WARN",
                f"{name}: {value:.4g} weighted, {ratio:.3g}x the detection loss: check its weight",
            )
        else:
            report.add("OK", f"{name}: {value:.4g} weighted, {ratio:.3g}x the detection loss")
