"""The Distiller: a frozen teacher, a trainable student, adapters and the chosen methods.

One forward pass gives every loss term by name (the detector's own terms and
each weighted distillation term), so logs always show what each method adds
and a term that is silently zero or missing cannot hide.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from detdistill.auto_weights import (
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
from detdistill.losses import IncompatibleModelsError, build_method
from detdistill.models.output import DetectorOutput
from detdistill.pair import TowerFeatures, run_pair


def check_compatible(teacher: nn.Module, student: nn.Module) -> None:
    """Raise :class:`IncompatibleModelsError` naming every disagreement.

    RM compares the same candidate boxes and PFI the same feature-map locations
    in both networks, so they must share levels, strides, anchors per location,
    anchor shapes, classes, head type and input preprocessing (the teacher runs
    on the student's batched tensor). Backbones and channel widths may differ:
    adapters bridge the channels.
    """
    problems = []
    checks = {
        "head type": ("head_type", None),
        "number of classes": ("num_classes", None),
        "number of FPN levels": ("strides", len),
        "FPN strides": ("strides", tuple),
        "anchors per location": ("num_anchors_per_location", None),
    }
    for label, (attr, convert) in checks.items():
        t_value, s_value = getattr(teacher, attr, None), getattr(student, attr, None)
        if convert is not None and t_value is not None and s_value is not None:
            t_value, s_value = convert(t_value), convert(s_value)
        if t_value != s_value:
            problems.append(f"{label}: teacher {t_value!r} vs student {s_value!r}")
    for label, attr in (("anchor sizes", "sizes"), ("anchor aspect ratios", "aspect_ratios")):
        t_value = getattr(getattr(teacher, "anchor_generator", None), attr, None)
        s_value = getattr(getattr(student, "anchor_generator", None), attr, None)
        if t_value != s_value:
            problems.append(f"{label}: teacher {t_value!r} vs student {s_value!r}")
    t_input, s_input = teacher.input_settings(), student.input_settings()
    for key in sorted(set(t_input) | set(s_input)):
        if t_input.get(key) != s_input.get(key):
            problems.append(
                f"input {key}: teacher {t_input.get(key)!r} vs student {s_input.get(key)!r}"
            )
    if problems:
        raise IncompatibleModelsError(
            "teacher and student cannot be distilled together: " + "; ".join(problems)
        )


class PointwiseAdapter(nn.Conv2d):
    """A 1x1 convolution computed as one batched matrix product (``baddbmm``) over the batch.

    Same parameters, initialisation and ``state_dict`` as ``nn.Conv2d(c_in,
    c_out, 1)`` (checkpoints load either way) and the same values to float
    rounding. Why: on CPU, oneDNN's 1x1 convolution forward and backward cost
    three times the ``baddbmm`` form's for the ``digits`` pair's adapters (32 -> 96 channels,
    128 px, batch 16: 6.2 ms against 2.1 ms forward and backward at 2 threads;
    at 1 thread and ResNet-sized maps the matmul is 5-15% faster), and the
    adapters are most of what distillation adds to a small student's step.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        weight = self.weight.view(1, self.out_channels, self.in_channels)
        out = torch.baddbmm(self.bias.view(1, -1, 1), weight.expand(n, -1, -1), x.flatten(2))
        return out.view(n, self.out_channels, h, w)


def build_adapters(
    student_channels: Sequence[int], teacher_channels: Sequence[int]
) -> nn.ModuleList:
    """One 1x1 conv per level (student -> teacher channels of that level), identity where they match.

    Channels are per level: a YOLO neck is 64/128/256 wide where an FPN is the
    same width at every level.
    """
    if len(student_channels) != len(teacher_channels):
        raise IncompatibleModelsError(
            f"feature levels: teacher {len(teacher_channels)} vs student {len(student_channels)}"
        )
    return nn.ModuleList(
        nn.Identity() if s == t else PointwiseAdapter(s, t)
        for s, t in zip(student_channels, teacher_channels, strict=True)
    )


def build_tower_adapters(student: nn.Module, teacher: nn.Module, convs: int) -> nn.ModuleList:
    """Adapters of the head tower features after ``convs`` convs: ``[cls, reg]``, each per level.

    A tower shared over levels (torchvision's heads) gets one adapter shared
    over levels, as the tower itself is; per-level towers (YOLO) get one each.
    """
    shared = student.towers_shared and teacher.towers_shared
    adapters = []
    for s_widths, t_widths in zip(
        student.tower_channels(convs), teacher.tower_channels(convs), strict=True
    ):
        branch = build_adapters(s_widths[:1], t_widths[:1]) if shared else build_adapters(
            s_widths, t_widths
        )  # fmt: skip
        adapters.append(branch)
    return nn.ModuleList(adapters)


class StudentWithAdapters(nn.Module):
    """Everything trainable, in one module so DDP wraps exactly this (no unused parameters).

    ``adapters`` map the neck features to the teacher's channels. With
    ``keep_tower=k`` the student's head tower features after ``k`` convs are
    kept too and mapped by ``tower_adapters`` (classification, regression).
    """

    def __init__(
        self,
        student: nn.Module,
        adapters: nn.ModuleList,
        keep_tower: int | None = None,
        tower_adapters: nn.ModuleList | None = None,
    ):
        super().__init__()
        if (keep_tower is None) != (tower_adapters is None):
            raise ValueError("keep_tower and tower_adapters go together")
        self.student = student
        self.adapters = adapters
        self.keep_tower = keep_tower
        self.tower_adapters = tower_adapters

    def forward(
        self,
        images: Tensor,
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> tuple[DetectorOutput, list[Tensor], TowerFeatures | None]:
        output = self.student.forward_batch(images, image_sizes, targets, self.keep_tower)
        adapted = [adapter(f) for adapter, f in zip(self.adapters, output.features, strict=True)]
        if self.tower_adapters is None or output.tower_features is None:
            return output, adapted, None
        tower = tuple(
            [adapters[min(i, len(adapters) - 1)](f) for i, f in enumerate(feats)]
            for adapters, feats in zip(self.tower_adapters, output.tower_features, strict=True)
        )
        return output, adapted, tower


def _tower_cut(
    methods: Mapping[str, nn.Module], student: nn.Module, teacher: nn.Module
) -> int | None:
    """The student tower depth whose features the methods need (see ``teacher_tower_convs``)."""
    wanted = {name: m.teacher_tower_convs() for name, m in methods.items()}
    wanted = {name: j for name, j in wanted.items() if j is not None}
    if not wanted:
        return None
    if len(set(wanted.values())) > 1:
        raise ValueError(f"methods disagree on the teacher tower convs they reuse: {wanted}")
    name, convs = next(iter(wanted.items()))
    depths = {"student": student.tower_depth, "teacher": teacher.tower_depth}
    if any(convs > depth for depth in depths.values()):
        raise IncompatibleModelsError(
            f"{name} reuses the teacher's last {convs} tower conv(s), but the head towers have "
            f"{depths['student']} (student) and {depths['teacher']} (teacher)"
        )
    return depths["student"] - convs


class Distiller(nn.Module):
    """Teacher + student + adapters + weighted methods; ``forward`` returns named losses.

    Args:
        student: a detector from :mod:`detdistill.models`, trained.
        teacher: a detector of the same head type, frozen here (eval mode,
            ``requires_grad=False``, BatchNorm statistics untouched: it stays in
            eval mode through every ``train()`` call).
        methods: method name -> loss weight, e.g. ``{"rm": 4.0, "pfi": 1.5}``, or
            ``"auto"`` for a weight measured on the first batches by
            :meth:`balance` (see :mod:`detdistill.auto_weights`).
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
        if not methods:
            raise ValueError(
                "a Distiller needs at least one method; a student without one is plain "
                "training (detdistill train <student config>)"
            )
        method_options = dict(method_options or {})
        unused = sorted(set(method_options) - set(methods))
        if unused:
            raise ValueError(f"options given for method(s) not selected: {', '.join(unused)}")
        self.methods = nn.ModuleDict(
            {name: build_method(name, **method_options.get(name, {})) for name in methods}
        )
        for method in self.methods.values():
            method.check_models(student, teacher)
        keep_tower = _tower_cut(self.methods, student, teacher)
        self.branch = StudentWithAdapters(
            student,
            build_adapters(student.feature_channels, teacher.feature_channels),
            keep_tower,
            None if keep_tower is None else build_tower_adapters(student, teacher, keep_tower),
        )
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
        self._runner: nn.Module = self.branch

    @property
    def student(self) -> nn.Module:
        return self.branch.student

    @property
    def adapters(self) -> nn.ModuleList:
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
        return [p for p in self.branch.parameters() if p.requires_grad]

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
        :data:`~detdistill.auto_weights.DEFAULT_RATIOS`). The rule and why:
        :mod:`detdistill.auto_weights`. Fixed weights are kept and reported
        with the gradient ratio they amount to. Nothing is trained: gradients
        come from ``torch.autograd.grad``, and the student's buffers and the
        RNG state are restored.
        """
        by_kind = check_ratios(ratios or {})
        names = list(self.methods)
        params = [p for p in self.student.parameters() if p.requires_grad]

        def terms() -> Iterable[tuple[Tensor, dict[str, Tensor]]]:
            for images, targets in batches:
                # The plain branch, not a DDP wrapper: DDP's reducer expects a backward
                # after each forward; the norms are averaged across ranks instead.
                detection, distill = self._loss_terms(images, targets, self.branch)
                yield sum(detection.values()), distill

        with preserved_state(self.student):
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
        ``auto`` weights at its steps (:func:`~detdistill.auto_weights.guard_due`);
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
        :mod:`detdistill.auto_weights`); measured on this batch's graph, nothing trained."""
        params = [p for p in self.student.parameters() if p.requires_grad]
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
        return self._loss_terms(images, targets, self._runner)

    def _loss_terms(
        self, images: list[Tensor], targets: list[dict[str, Tensor]], runner: nn.Module
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        batch = run_pair(
            self.student, self.teacher, images, targets,
            student_forward=runner, teacher_forward=self.teacher_outputs,
        )  # fmt: skip
        detection = dict(batch.student.losses)
        distill = {}
        for name, method in self.methods.items():
            if name in detection:
                raise ValueError(f"distillation method {name!r} clashes with a detection loss name")
            with record_function(f"distill/{name}"):  # named in profiler traces
                distill[name] = method(batch)
        return detection, distill

    @torch.inference_mode()
    def teacher_outputs(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> DetectorOutput:
        """The teacher's raw outputs on the student's batch, in float32 and NCHW layout."""
        if self.teacher_half:
            images = images.half()
        if self.teacher_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        output = self._teacher_forward(images, image_sizes)
        if self.teacher_half:
            output.map_levels(lambda x: x.float())
        if self.teacher_channels_last:
            # Back to the student's NCHW layout: elementwise terms between an NHWC
            # teacher tensor and an NCHW student one run 1.5x slower (PFI, ``digits`` RetinaNet).
            output.map_levels(lambda x: x.contiguous())
        return output
