"""Where a distillation step's extra time goes: its phases against the plain student step's.

    python benchmarks/step_phases.py --out benchmarks/results/step_phases.json

For a pair of ``step_overhead.py``, on one fixed batch and in one process,
interleaved turn by turn: the plain student step timed as forward (with its
loss), backward and optimizer step, followed by the teacher's forward; and the
distillation step timed as the pair's forward (``Distiller.run_pair``,
student with adapters and teacher), the distillation terms' forward, the
backward of everything, and the optimizer step. Medians in milliseconds;
``extra_ms`` is each distillation phase minus its plain counterpart, which
says whether the terms' forward, their backward or the bookkeeping costs the
overhead that ``step_overhead.py`` reports as one ratio.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch

from step_overhead import NUM_CLASSES, build_pair, make_batch, run_over_pairs


def measure(name: str, spec: dict, methods: dict[str, float], repeats: int) -> dict:
    distiller = build_pair(spec, methods)
    student = distiller.student
    images, targets = make_batch(spec["size"], spec["batch"], NUM_CLASSES)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=1e-4, momentum=0.9)
    image_list, _ = student.transform(images, [dict(t) for t in targets])
    times: dict[str, list[float]] = defaultdict(list)

    def backward_and_step(losses: dict, prefix: str, start: float) -> float:
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        backward_end = time.perf_counter()
        optimizer.step()
        end = time.perf_counter()
        times[f"{prefix}/backward"].append(backward_end - start)
        times[f"{prefix}/optimizer"].append(end - backward_end)
        return end

    def plain() -> None:
        start = time.perf_counter()
        losses = student(images, targets).losses
        forward_end = time.perf_counter()
        end = backward_and_step(losses, "plain", forward_end)
        distiller.teacher_outputs(image_list.tensors, image_list.image_sizes)
        teacher_end = time.perf_counter()
        times["plain/student_forward"].append(forward_end - start)
        times["plain/teacher_forward"].append(teacher_end - end)

    def distill() -> None:
        start = time.perf_counter()
        batch = distiller.run_pair(images, targets)
        pair_end = time.perf_counter()
        losses = dict(batch.student.losses)
        for method_name, method in distiller.methods.items():
            losses[method_name] = distiller.weights[method_name] * method(batch)
        del batch  # as in Distiller.forward: only what backward saved stays alive
        terms_end = time.perf_counter()
        backward_and_step(losses, "distill", terms_end)
        times["distill/pair_forward"].append(pair_end - start)
        times["distill/terms_forward"].append(terms_end - pair_end)

    for _ in range(2):
        plain()
        distill()
    for turn in range(repeats):
        for fn in (plain, distill) if turn % 2 == 0 else (distill, plain):
            fn()
    ms = {phase: 1e3 * statistics.median(t) for phase, t in sorted(times.items())}
    extra = {
        "forward": ms["distill/pair_forward"]
        - ms["plain/student_forward"]
        - ms["plain/teacher_forward"],
        "terms_forward": ms["distill/terms_forward"],
        "backward": ms["distill/backward"] - ms["plain/backward"],
        "optimizer": ms["distill/optimizer"] - ms["plain/optimizer"],
    }
    plain_total = sum(v for k, v in ms.items() if k.startswith("plain/"))
    return {
        "pair": name,
        "image_size": spec["size"],
        "batch": spec["batch"],
        "methods": methods,
        "phases_ms": ms,
        "extra_ms": extra,
        "plain_step_and_teacher_ms": plain_total,
        "extra_share": {k: v / plain_total for k, v in extra.items()},
    }


def main() -> None:
    run_over_pairs("step_phases", __doc__, measure)


if __name__ == "__main__":
    main()
