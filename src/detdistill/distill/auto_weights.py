"""``auto`` loss weights: each distillation term pulls the student a set amount relative to detection.

A weight given as ``"auto"`` is set once, before the first optimiser step, by
measuring gradients on the first few training batches::

    theta_m = the student parameters that term m reaches (its gradient is defined there)
    G_det   = mean over batches of || d L_det / d theta_m ||_2
    G_m     = mean over batches of || d L_m   / d theta_m ||_2
    w_m     = r_m * G_det / G_m

so that, at the start of training, the weighted term's gradient on the
parameters it shares with the detection loss is ``r_m`` times the detection
loss's gradient there. ``r_m`` depends on what the term imitates
(:data:`DEFAULT_RATIOS`):

* ``features`` (PFI, FitNet, FGFI, DeFeat, scorel2, PKD, CrossKD): 10. These
  terms never reach the student's predictors (PFI's weight is detached;
  CrossKD's gradient comes back through the teacher's head into the
  student's features), so the predictors keep learning from the labels alone
  while the backbone and neck are led by the teacher, a representation that
  is known to be good for detection.
* ``outputs`` (RM, KD, LD): 0.3. These terms share the predictors with the
  detection loss, and RM carries no absolute signal at all (only the order of
  an object's candidates); pulling harder than the labels there trades the
  labels' information for the teacher's mistakes.

Both numbers were chosen on ``digits`` only (seed 0, 6-epoch students; the
runs are in ``benchmarks/results/digits_auto_*.json`` and ``docs/weights.md``)
and then checked, unchanged, on ``shapes``. The same rule with the same two
numbers serves every registered method, so methods are compared on equal
terms.

Why gradients and not loss values: a loss value says nothing about how hard
it pulls. PFI's value is a product of two small numbers (about 1e-4 of the
detection loss on the ``digits`` models), RM's is a KL divergence, FitNet's
the square of the teacher's activation scale; equal values give wildly
different pulls. What a term does to the student is its gradient, and the
detection gradient on the same parameters is the natural unit: it is what the
student would learn without a teacher. This is GradNorm's measure (Chen et
al., ICML 2018), taken once at the start rather than learned during training,
so the weight is a fixed, logged number and training stays the plain
weighted sum. Measuring only on ``theta_m`` matters: PFI never reaches the
head (its weight ``P`` is detached), so comparing it with the head's share of
the detection gradient would measure the wrong thing.

The measurement uses ``torch.autograd.grad`` (no ``.grad`` is touched, no
optimiser step is taken), restores the student's buffers (BatchNorm
statistics) and the random-number state afterwards, and averages across
processes under DDP, so every rank chooses the same weights.

**The guard: a weight may only fall.** Measured once, the rule fails where a
term has almost nothing to imitate at the start: a student that begins as a
copy (or a fine-tuned or pruned version) of its teacher. PFI's gradient is
then near zero, so ``w = r G_det / G_m`` is enormous (1e5 and more); as the
student drifts the term's gradient grows with a fixed huge weight, the pull
feeds itself and the loss diverges within ten steps. So during training the
ratio is measured again on the training batch itself, at steps 1, 2, 4, 8,
..., 512 and then every :data:`GUARD_EVERY` steps (:func:`guard_due`); where
a term's weighted gradient has grown past :data:`GUARD_TOLERANCE` times its
target ratio, its weight is lowered to meet the target again
(:func:`guard_weights`) and the change is logged. The runaway is
exponential (a perturbed copy of a teacher diverged within 20 steps of a
check), so a cheap watch runs at every step as well: the weighted loss over
the detection loss, ``w L_m / L_det``, a number the step has anyway; when it
has grown :data:`GUARD_GROWTH` times since the last check, the gradients are
checked at once. Weights never rise above
the starting choice, so a run where no term outgrows its target trains
exactly as before (the checks touch no ``.grad``, buffer or random state),
and a resumed run repeats the same checks at the same steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from detdistill.errors import DetDistillError

AUTO = "auto"
# What each kind of term's gradient should be, relative to detection's, at the start.
DEFAULT_RATIOS: dict[str, float] = {"features": 10.0, "outputs": 0.3}
DEFAULT_BATCHES = 4
# The guard (see the module docstring): a term whose weighted gradient grew past this many
# times its target ratio has its weight lowered back to the target; checked at steps
# 1, 2, 4, ..., 512, then every GUARD_EVERY steps.
GUARD_TOLERANCE = 2.0
GUARD_EVERY = 500
# ... and at once when a term's weighted loss over the detection loss grew this many times
# since the last check (a cheap watch at every step).
GUARD_GROWTH = 4.0

Batch = tuple[list[Tensor], list[dict[str, Tensor]]]


class WeightError(DetDistillError, ValueError):
    """A method weight that is neither a number >= 0 nor ``"auto"``."""


def parse_weight(name: str, weight: Any) -> float | None:
    """A method's weight as a float, or ``None`` for ``"auto"``; anything else is a one-line error."""
    if isinstance(weight, str) and weight.strip().lower() == AUTO:
        return None
    number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
    if not (number and math.isfinite(weight) and weight >= 0):
        raise WeightError(
            f"weight of method {name!r} must be a number >= 0 or 'auto', got {weight!r}"
        )
    return float(weight)


@dataclass
class TermBalance:
    """What was measured for one distillation term, and the weight it got.

    ``ratio`` is the weighted term's gradient over the detection gradient on the
    shared parameters: exactly the target ratio for ``auto`` terms, and for a
    fixed weight what that weight amounts to (``detdistill doctor`` prints it).
    """

    weight: float
    auto: bool
    grad_norm: float
    detection_grad_norm: float
    shared_parameters: int

    @property
    def ratio(self) -> float:
        if self.detection_grad_norm == 0:
            return math.inf
        return self.weight * self.grad_norm / self.detection_grad_norm

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def _mean_across_processes(values: Tensor) -> Tensor:
    """Mean over ranks (``values`` on the model's device, which NCCL needs); as is without DDP."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        values = values.clone()
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
    return values


def measure_gradients(
    student_params: list[nn.Parameter],
    terms_per_batch: Iterable[tuple[Tensor, Mapping[str, Tensor]]],
    names: list[str],
) -> dict[str, tuple[float, float, int]]:
    """Per term: (mean ||grad L_m||, mean ||grad L_det||, number of shared scalars).

    ``terms_per_batch`` yields, per batch, the detection loss and the
    unweighted distillation terms, all with their graphs.
    """
    device = student_params[0].device if student_params else torch.device("cpu")
    sums = torch.zeros(2 * len(names), dtype=torch.float64, device=device)
    shared = dict.fromkeys(names, 0)
    batches = 0
    for detection, terms in terms_per_batch:
        for i, name in enumerate(names):
            term_grads = torch.autograd.grad(
                terms[name], student_params, retain_graph=True, allow_unused=True
            )
            reached = [k for k, g in enumerate(term_grads) if g is not None]
            if not reached:
                continue
            params = [student_params[k] for k in reached]
            det_grads = torch.autograd.grad(detection, params, retain_graph=True, allow_unused=True)
            sums[2 * i] += _norm([term_grads[k] for k in reached])
            sums[2 * i + 1] += _norm([g for g in det_grads if g is not None])
            shared[name] = max(shared[name], sum(p.numel() for p in params))
        batches += 1
    if batches == 0:
        raise ValueError("auto weights need at least one batch to measure on")
    means = _mean_across_processes(sums / batches)
    return {
        name: (float(means[2 * i]), float(means[2 * i + 1]), shared[name])
        for i, name in enumerate(names)
    }


def _norm(grads: list[Tensor]) -> float:
    if not grads:
        return 0.0
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )


def check_ratios(ratios: Mapping[str, float]) -> dict[str, float]:
    """The defaults updated with ``ratios``; unknown kinds or values <= 0 are one-line errors."""
    unknown = sorted(set(ratios) - set(DEFAULT_RATIOS))
    if unknown:
        raise WeightError(
            f"auto_ratio has no kind(s) {', '.join(unknown)}; kinds are: "
            + ", ".join(DEFAULT_RATIOS)
        )
    for kind, ratio in ratios.items():
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise WeightError(f"auto_ratio.{kind} must be a number > 0, got {ratio!r}")
        if not (ratio > 0 and math.isfinite(ratio)):
            raise WeightError(f"auto_ratio.{kind} must be a finite number > 0, got {ratio!r}")
    return {**DEFAULT_RATIOS, **{k: float(v) for k, v in ratios.items()}}


def choose_weights(
    weights: Mapping[str, float | None],
    measured: Mapping[str, tuple[float, float, int]],
    ratios: Mapping[str, float],
) -> dict[str, TermBalance]:
    """Apply ``w_m = r_m * G_det / G_m`` to the ``auto`` (``None``) weights; keep the others.

    ``ratios`` gives ``r_m`` for every term by name.
    """
    out = {}
    for name, weight in weights.items():
        ratio = ratios[name]
        if not (ratio > 0 and math.isfinite(ratio)):
            raise WeightError(f"auto ratio of {name!r} must be a finite number > 0, got {ratio!r}")
        grad_norm, detection_norm, shared = measured[name]
        if weight is None:
            if grad_norm == 0 or not math.isfinite(grad_norm):
                raise WeightError(
                    f"cannot choose an auto weight for {name!r}: its gradient on the student is "
                    f"{grad_norm} on the measured batches (no candidates? identical networks?); "
                    "give it a number"
                )
            weight = ratio * detection_norm / grad_norm
        out[name] = TermBalance(
            weight=float(weight),
            auto=weights[name] is None,
            grad_norm=grad_norm,
            detection_grad_norm=detection_norm,
            shared_parameters=shared,
        )
    return out


def guard_due(step: int) -> bool:
    """Whether training step ``step`` (steps done before it) re-checks the ``auto`` weights."""
    if step < 1:
        return False
    if step <= 512:
        return step & (step - 1) == 0  # a power of two
    return step % GUARD_EVERY == 0


def guard_weights(
    weights: Mapping[str, float],
    measured: Mapping[str, tuple[float, float, int]],
    ratios: Mapping[str, float],
) -> dict[str, float]:
    """The ``auto`` weights to lower: ``{name: new weight}`` where ``w G_m > tol * r G_det``.

    ``measured`` is :func:`measure_gradients` of the current batch. A term
    lowered goes back to exactly its target ratio; one below the tolerance is
    left alone (the weight never rises).
    """
    lowered = {}
    for name, weight in weights.items():
        grad_norm, detection_norm, _ = measured[name]
        if grad_norm > 0 and weight * grad_norm > GUARD_TOLERANCE * ratios[name] * detection_norm:
            lowered[name] = ratios[name] * detection_norm / grad_norm
    return lowered


@contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """The module's buffers (BatchNorm statistics) and the CPU RNG state are as before on exit."""
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, buffer in module.named_buffers():
                    buffer.copy_(buffers[name])


def format_balance(balance: Mapping[str, TermBalance]) -> str:
    """One line per term, as printed at the start of training and by ``doctor``."""
    lines = []
    for name, b in balance.items():
        how = "auto" if b.auto else "fixed"
        lines.append(
            f"{name}: weight {b.weight:.4g} ({how}); its gradient on the {b.shared_parameters:,} "
            f"student parameters it reaches is {b.ratio:.3g}x the detection loss's"
        )
    return "\n".join(lines)
