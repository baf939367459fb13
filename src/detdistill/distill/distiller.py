"""The Distiller: a frozen teacher, a trainable student, adapters and the chosen methods.

One forward pass gives every loss term by name (the detector's own terms and
each weighted distillation term), so logs always show what each method adds
and a term that is silently zero or missing cannot hide. :meth:`Distiller.run_pair`
is the one path of a batch through both detectors: training, ``auto`` weights,
``doctor`` and ``analyze`` all call it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from detdistill.distill.adapters import StudentWithTaps
from detdistill.distill.auto_weights import (
    GUARD_GROWTH,
    Batch,
    TermBalance,
    check_ratios,
    choose_weights,
    guard_due,
    guard_weights,
    measure_gradients,
    parse_weight,
    preserved_state,
)
from detdistill.distill.compat import check_compatible, check_taps
from detdistill.losses import DistillBatch, build_method
from detdistill.models.output import DetectorOutput

__all__ = ["Distiller", "trainable_parameters"]


_HALF = (torch.float16, torch.bfloat16)


def _float32(tensors: Any) -> Any:
    """A tap's tensors (a tensor, or lists and tuples of them) with half ones as float32."""
    if isinstance(tensors, Tensor):
        return tensors.float() if tensors.dtype in _HALF else tensors
    return type(tensors)(_float32(t) for t in tensors)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` that train (a frozen backbone stage's do not)."""
    return [p for p in module.parameters() if p.requires_grad]


class Distiller(nn.Module):
    """Teacher + student + adapters + weighted methods; ``forward`` returns named losses.

    Args:
        student: a detector from :mod:`detdistill.models`, trained.
        teacher: a detector of the same head type, frozen here (eval mode,
            ``requires_grad=False``, BatchNorm statistics untouched: it stays in
            eval mode through every ``train()`` call).
        methods: method name -> loss weight, e.g. ``{"rm": 4.0, "pfi": 1.5}``, or
            ``"auto"`` for a weight measured on the first batches by
            :meth:`balance` (see :mod:`detdistill.distill.auto_weights`).
            Empty for a pair that is only compared (``analyze``).
        method_options: method name -> keyword options of that method.
        teacher_half: run the teacher in float16 (CUDA only): it is never
            trained, so half precision only costs a little accuracy of targets.
        teacher_channels_last: keep the teacher's weights and its input in
            NHWC layout, which the CPU (oneDNN) and cuDNN convolutions run
            faster (``benchmarks/teacher_speed.py``, CPU: 0.81x-0.97x the
            teacher forward time). Outputs equal the NCHW ones to float
            rounding.
        teacher_compile: run the teacher through ``torch.compile``. It pays for
            long runs only: 0.73x-0.75x the teacher forward time on the tiny
            ``digits`` RetinaNet pair and 0.86x-0.89x on ResNet-50 (CPU), after a
            first call that compiles for 20-40 s on 2 cores (and again for
            every new input shape).

    The teacher runs under ``torch.inference_mode``: no autograd state at all
    is kept for it. Every registered method is tested to train with it; a new
    method that needs a teacher tensor saved for backward must ``clone()`` it.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        methods: Mapping[str, float | str],
        method_options: Mapping[str, Mapping[str, Any]] | None = None,
        teacher_half: bool = False,
        teacher_channels_last: bool = True,
        teacher_compile: bool = False,
        auto_ratio: Mapping[str, float] | None = None,
    ):
        super().__init__()
        check_compatible(teacher, student)
        method_options = dict(method_options or {})
        unused = sorted(set(method_options) - set(methods))
        if unused:
            raise ValueError(f"options given for method(s) not selected: {', '.join(unused)}")
        self.methods = nn.ModuleDict(
            {name: build_method(name, **method_options.get(name, {})) for name in methods}
        )
        for method in self.methods.values():
            method.check_models(student, teacher)
        taps = {tap for method in self.methods.values() for tap in method.taps}
        keep_tower = check_taps(self.methods, student, teacher)
        self.branch = StudentWithTaps(student, teacher, taps, keep_tower)
        self.teacher = teacher
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.teacher.eval()
        self.teacher_channels_last = teacher_channels_last
        if teacher_channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        self._teacher_forward = (
            torch.compile(self.teacher.forward_batch)
            if teacher_compile
            else self.teacher.forward_batch
        )
        # None marks an "auto" weight that balance() has not chosen yet.
        self.weights: dict[str, float | None] = {
            name: parse_weight(name, weight) for name, weight in methods.items()
        }
        self.auto_methods = [name for name, weight in self.weights.items() if weight is None]
        by_kind = check_ratios(auto_ratio or {})
        # The target ratio of each auto term (auto_weights.DEFAULT_RATIOS by what it imitates).
        self.auto_ratios = {n: by_kind[self.methods[n].imitates] for n in self.auto_methods}
        # Every weight the guard lowered during training: step, method, from, to, ratio.
        self.weight_changes: list[dict[str, Any]] = []
        # w L_m / L_det of each auto term at the guard's last check (saved with the run state).
        self.guard_reference: dict[str, float] = {}
        self.teacher_half = teacher_half
        # What runs the branch: itself, or its DDP wrapper (wrap_student). Kept out of the
        # module tree, so the branch's weights appear once in state_dict.
        object.__setattr__(self, "_runner", self.branch)

    @property
    def student(self) -> nn.Module:
        return self.branch.student

    @property
    def adapters(self) -> nn.ModuleDict:
        """Every declared tap's adapters, by tap key (``neck``, ``tower1``, ...)."""
        return self.branch.adapters

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()
        return self

    def to(self, *args: Any, **kwargs: Any) -> Distiller:
        super().to(*args, **kwargs)
        if self.teacher_half:
            if next(self.teacher.parameters()).device.type != "cuda":
                raise ValueError("teacher_half needs the teacher on a CUDA device")
            self.teacher.half()
        return self

    def wrap_student(self, wrapper: nn.Module) -> None:
        """Run the trainable branch through ``wrapper`` (a DDP of :attr:`branch`).

        The wrapper is kept out of the module tree, so state dicts keep their keys.
        """
        if getattr(wrapper, "module", None) is not self.branch:
            raise ValueError("the wrapper must wrap this Distiller's branch")
        object.__setattr__(self, "_runner", wrapper)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return trainable_parameters(self.branch)

    @property
    def needs_balance(self) -> bool:
        """True while an ``auto`` weight has not been chosen (call :meth:`balance`)."""
        return any(weight is None for weight in self.weights.values())

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Set chosen weights (e.g. the ones a resumed run saved); names must be selected methods."""
        unknown = sorted(set(weights) - set(self.weights))
        if unknown:
            raise ValueError(f"weights given for method(s) not selected: {', '.join(unknown)}")
        for name, weight in weights.items():
            self.weights[name] = parse_weight(name, weight)

    def balance(
        self, batches: Iterable[Batch], ratios: Mapping[str, float] | None = None
    ) -> dict[str, TermBalance]:
        """Choose every ``auto`` weight from gradients on ``batches``; report every term.

        ``w_m = r_m * ||grad L_det|| / ||grad L_m||`` on the student
        parameters that term ``m`` reaches, averaged over the batches, with
        ``r_m = ratios[kind]`` for the kind of term ``m`` (``"features"`` or
        ``"outputs"``; missing kinds take
        :data:`~detdistill.distill.auto_weights.DEFAULT_RATIOS`). The rule and why:
        :mod:`detdistill.distill.auto_weights`. Fixed weights are kept and reported
        with the gradient ratio they amount to. Nothing is trained: gradients
        come from ``torch.autograd.grad``, and the student's buffers and the
        RNG state are restored.
        """
        by_kind = check_ratios(ratios or {})
        names = list(self.methods)
        params = trainable_parameters(self.student)

        def terms() -> Iterable[tuple[Tensor, dict[str, Tensor]]]:
            for images, targets in batches:
                detection, distill = self.loss_terms(images, targets)
                yield sum(detection.values()), distill

        # The plain branch, not a DDP wrapper: DDP's reducer expects a backward
        # after each forward; the norms are averaged across ranks instead.
        with preserved_state(self.student), self._unwrapped():
            measured = measure_gradients(params, terms(), names)
        term_ratios = {name: by_kind[method.imitates] for name, method in self.methods.items()}
        self.auto_ratios = {name: term_ratios[name] for name in self.auto_methods}
        chosen = choose_weights(self.weights, measured, term_ratios)
        for name in self.auto_methods:
            self.weights[name] = chosen[name].weight
        return chosen

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]], step: int | None = None
    ) -> dict[str, Tensor]:
        """Named loss terms for one batch; distillation terms are already weighted.

        ``step`` (the number of training steps done) lets the guard re-check the
        ``auto`` weights at its steps (:func:`~detdistill.distill.auto_weights.guard_due`);
        what it lowered is in :attr:`weight_changes`. The trainer passes it.
        """
        if self.needs_balance:
            pending = ", ".join(n for n, w in self.weights.items() if w is None)
            raise RuntimeError(
                f"the 'auto' weight(s) of {pending} are not chosen yet: call "
                "Distiller.balance(batches) before training (the trainer does it)"
            )
        detection, distill = self.loss_terms(images, targets)
        if step is not None and self.auto_methods and self.training:
            detection_total = sum(detection.values())
            loss_ratios = self._loss_ratios(detection_total, distill)
            grown = any(
                loss_ratios[n] > GUARD_GROWTH * self.guard_reference.get(n, math.inf)
                for n in self.auto_methods
            )
            if guard_due(step) or grown or not self.guard_reference:
                if step > 0:
                    self._guard(step, detection_total, distill)
                self.guard_reference = self._loss_ratios(detection_total, distill)
        losses = dict(detection)
        for name, value in distill.items():
            losses[name] = self.weights[name] * value
        return losses

    def _loss_ratios(self, detection: Tensor, distill: dict[str, Tensor]) -> dict[str, float]:
        """``w L_m / L_det`` of every auto term: the guard's cheap per-step watch."""
        values = torch.stack([distill[n].detach().float() for n in self.auto_methods])
        ratios = (values / detection.detach().float().clamp_min(1e-12)).tolist()
        return {n: self.weights[n] * r for n, r in zip(self.auto_methods, ratios, strict=True)}

    def _guard(self, step: int, detection: Tensor, distill: dict[str, Tensor]) -> None:
        """Lower an ``auto`` weight whose term outgrew its target ratio (module docstring of
        :mod:`detdistill.distill.auto_weights`); measured on this batch's graph, nothing trained."""
        params = trainable_parameters(self.student)
        measured = measure_gradients(params, [(detection, distill)], self.auto_methods)
        current = {name: self.weights[name] for name in self.auto_methods}
        for name, weight in guard_weights(current, measured, self.auto_ratios).items():
            self.weight_changes.append(
                {"step": step, "method": name, "from": current[name], "to": weight,
                 "grad_ratio": current[name] * measured[name][0] / measured[name][1]}
            )  # fmt: skip
            self.weights[name] = weight

    def loss_terms(
        self, images: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The detector's own loss terms and the *unweighted* distillation terms, by name."""
        batch = self.run_pair(images, targets)
        detection = dict(batch.student.losses)
        distill = {}
        # The terms compute in float32 (run_pair's batch is float32): under float16
        # the small differences they are made of underflow, and softmax/log of large
        # logits overflow, the usual source of NaN in mixed-precision distillation.
        with torch.autocast(batch.images.device.type, enabled=False):
            for name, method in self.methods.items():
                if name in detection:
                    raise ValueError(
                        f"distillation method {name!r} clashes with a detection loss name"
                    )
                with record_function(f"distill/{name}"):  # named in profiler traces
                    distill[name] = method(batch)
        return detection, distill

    def run_pair(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> DistillBatch:
        """Both detectors on one batch of images (each ``(3, H, W)``) and their targets.

        The student's transform normalises, resizes and pads the images into
        one batched tensor and the teacher runs on *that* tensor: both networks
        see the same pixels, so their levels, locations and anchors correspond
        one to one, which is what RM's candidates and PFI's locations compare.
        The targets get the checks of plain training first. The student's
        output carries the assignment and the detection losses; the declared
        taps come adapted to the teacher's channels. Every tensor a method reads is
        float32: half outputs (autocast's, a half teacher's) are upcast here.
        """
        self.student.check_targets(images, targets)
        image_list, batch_targets = self.student.transform(images, targets)
        tensors, sizes = image_list.tensors, image_list.image_sizes
        # Teacher first: its activations are freed as it goes (inference mode), so it
        # runs on a quiet heap. After the student's forward, whose activations stay
        # alive for backward, the YOLO11n teacher's forward took 57 ms instead of 49
        # (CPU, 128 px, batch 16): the step is 6% faster this way, the RetinaNet pairs
        # are unchanged (0.996x, 0.997x), and the peak is lower.
        teacher_output = self.teacher_outputs(tensors, sizes)
        output, taps = self._runner(tensors, sizes, batch_targets)
        if teacher_output.cls_logits[0].dtype in _HALF:  # a half teacher, or autocast
            teacher_output.map_levels(Tensor.float)
        if output.cls_logits[0].dtype in _HALF:  # autocast: the taps are half too
            output.map_levels(Tensor.float)
            taps = {tap: _float32(tapped) for tap, tapped in taps.items()}
        return DistillBatch(
            student=output,
            teacher=teacher_output,
            gt_boxes=[t["boxes"] for t in batch_targets],
            gt_labels=[t["labels"] for t in batch_targets],
            images=tensors,
            taps=taps,
            teacher_model=self.teacher,
        )

    @contextmanager
    def _unwrapped(self) -> Iterator[None]:
        """Run the plain branch for a while, whatever :meth:`wrap_student` set."""
        runner = self._runner
        object.__setattr__(self, "_runner", self.branch)
        try:
            yield
        finally:
            object.__setattr__(self, "_runner", runner)

    @torch.inference_mode()
    def teacher_outputs(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> DetectorOutput:
        """The teacher's raw outputs on the student's batch, in NCHW layout."""
        if self.teacher_half:
            images = images.half()
        if self.teacher_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        output = self._teacher_forward(images, image_sizes)
        if self.teacher_channels_last:
            # Back to the student's NCHW layout: elementwise terms between an NHWC
            # teacher tensor and an NCHW student one run 1.5x slower (PFI, ``digits`` RetinaNet).
            output.map_levels(Tensor.contiguous)
        return output
