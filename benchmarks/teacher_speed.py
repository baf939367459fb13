"""What the frozen teacher costs in a distillation step, and what makes it cheaper.

    python benchmarks/teacher_speed.py --out benchmarks/results/teacher_speed.json

For each teacher/student pair of ``step_overhead.py``, on one fixed batch and
in one process, the teacher's forward pass on the student's batched tensor in
each execution mode, interleaved with a whole distillation step (RM + PFI by
default) so that the teacher's share of the step is measured on the same
machine state:

- ``no_grad``: ``torch.no_grad``, float32, NCHW (the Distiller before the
  teacher modes);
- ``inference_mode``: ``torch.inference_mode`` instead (no version counters or
  view tracking either);
- ``channels_last``: the teacher's weights and the input in NHWC layout;
- ``default``: what the Distiller runs now (``Distiller.teacher_outputs``:
  inference mode, NHWC);
- ``compile``: ``torch.compile`` (inductor) of the NHWC teacher's
  ``forward_batch``; its first call, the compilation, is reported apart;
- ``float16`` (CUDA only): half precision, NHWC.

Each time is the median of ``--repeats``; ``ratio`` is the mode's time over
``no_grad``'s (below 1 is faster), taken within each turn of the interleaved
calls and its median reported (``_common.paired_ratios``), and
``teacher_share`` the teacher forward's part of a distillation step that runs
the teacher in that mode.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from _common import call_times, emit, environment, paired_ratios
from step_overhead import NUM_CLASSES, PAIRS, build_pair, make_batch, pair_parser


def teacher_modes(distiller, images: torch.Tensor, sizes, compile_: bool) -> dict:
    """Name -> (no-argument teacher forward in that mode, seconds spent preparing it)."""
    plain = copy.deepcopy(distiller.teacher).to(memory_format=torch.contiguous_format)
    nhwc_images = images.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def no_grad() -> None:
        plain.forward_batch(images, sizes)

    @torch.inference_mode()
    def inference_mode() -> None:
        plain.forward_batch(images, sizes)

    @torch.no_grad()
    def channels_last() -> None:
        distiller.teacher.forward_batch(nhwc_images, sizes)

    def default() -> None:
        distiller.teacher_outputs(images, sizes)

    modes = {"no_grad": (no_grad, 0.0), "inference_mode": (inference_mode, 0.0),
             "channels_last": (channels_last, 0.0), "default": (default, 0.0)}  # fmt: skip
    if images.is_cuda:
        half = copy.deepcopy(distiller.teacher).half()
        half_images = nhwc_images.half()

        @torch.inference_mode()
        def float16() -> None:
            half.forward_batch(half_images, sizes)

        modes["float16"] = (float16, 0.0)
    if compile_:
        compiled_forward = torch.compile(copy.deepcopy(distiller.teacher).forward_batch)

        @torch.inference_mode()
        def compiled() -> None:
            compiled_forward(nhwc_images, sizes)

        start = time.perf_counter()
        compiled()
        modes["compile"] = (compiled, time.perf_counter() - start)
    return modes


def measure(name: str, spec: dict, methods: dict[str, float], repeats: int, compile_: bool) -> dict:
    distiller = build_pair(spec, methods)
    images, targets = make_batch(spec["size"], spec["batch"], NUM_CLASSES)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=1e-4, momentum=0.9)
    image_list, _ = distiller.student.transform(images, [dict(t) for t in targets])
    tensors, sizes = image_list.tensors, image_list.image_sizes

    def distill_step() -> None:
        losses = distiller(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    modes = teacher_modes(distiller, tensors, sizes, compile_)
    times = call_times({"distill_step": distill_step} | {m: fn for m, (fn, _) in modes.items()},
                       repeats)  # fmt: skip
    step_s = statistics.median(times["distill_step"])
    median = {m: statistics.median(times[m]) for m in modes}
    # The step runs the default mode; with another mode it would take the difference longer.
    return {
        "pair": name,
        "image_size": spec["size"],
        "batch": spec["batch"],
        "methods": methods,
        "distill_step_s": step_s,
        "teacher_forward_s": median,
        "ratio": {m: paired_ratios(times, m, ("no_grad",))["median"] for m in modes},
        "teacher_share": {m: t / (step_s - median["default"] + t) for m, t in median.items()},
        "compile_first_call_s": modes["compile"][1] if "compile" in modes else None,
    }


def main() -> None:
    parser = pair_parser(__doc__)
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip torch.compile (its compilation takes minutes on 2 cores)")  # fmt: skip
    args = parser.parse_args()
    results = [measure(n, PAIRS[n], args.methods, args.repeats, args.compile) for n in args.pairs]
    emit({"benchmark": "teacher_speed", **environment(), "results": results}, args.out)


if __name__ == "__main__":
    main()
