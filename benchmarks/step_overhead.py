"""What distillation costs per step, beyond running the teacher.

    python benchmarks/step_overhead.py --out benchmarks/results/step_overhead.json

For each teacher/student pair, on one fixed batch and in one process: a
student-only training step, a teacher forward pass (no grad), and a
distillation step with the chosen methods, plus
``overhead_ratio = distill_step / (student_step + teacher_forward)``: 1.0 means
the distillation terms, adapters and bookkeeping cost nothing extra. The three
calls take turns, and the ratio is taken within each turn and its median over
``--repeats`` turns reported, with the quartiles (``_common.paired_ratios``):
this machine's speed drifts by +-15% over minutes, which a ratio of separately
chosen best times does not cancel. The times are the medians.

``--device cuda --amp`` measures on a GPU under float16 autocast (as
``train.amp``), with the peak memory of the distillation step; the pairs
``r101_r50_640`` and ``r101_r50_1333x800`` (the COCO presets' ResNet-101 ->
ResNet-50 RetinaNet) are for that (``benchmarks/gpu_check.py`` runs them):

    python benchmarks/step_overhead.py --pairs r101_r50_640 r101_r50_1333x800 --device cuda --amp
"""

from __future__ import annotations

import argparse
import statistics

import torch

from _common import call_times, emit, environment, paired_ratios
from detdistill.distill import Distiller
from detdistill.engine.presets import load_preset_or_file
from detdistill.models import build_detector


def demo_pair() -> dict:
    """The ``digits`` RetinaNet teacher and student as their presets build them (no drift)."""
    teacher, student = (
        load_preset_or_file(p, []).model for p in ("digits_teacher", "digits_student")
    )

    def arguments(model) -> dict:
        return {
            "backbone": model.backbone,
            "backbone_kwargs": model.backbone_kwargs,
            **model.kwargs,
        }

    return {
        "size": 128,
        "batch": 16,
        "teacher": arguments(teacher),
        "student": arguments(student),
        "levels": tuple(student.levels),
    }


PAIRS = {
    "demo_tiny_128": demo_pair(),
    "r50_r18_320": {
        "size": 320,
        "batch": 2,
        "teacher": {"backbone": "resnet50"},
        "student": {"backbone": "resnet18"},
        "levels": (3, 4, 5, 6, 7),
    },
    # The digits_yolo presets: YOLO11n (2.6 M) -> YOLO11 at depth 0.25 / width 0.0625 (0.33 M).
    "yolo11n_128": {
        "detector": "yolo",
        "size": 128,
        "batch": 16,
        "teacher": {"cfg": "yolo11n.yaml"},
        "student": {"cfg": "yolo11n.yaml", "depth": 0.25, "width": 0.0625},
    },
}
# The COCO pair (coco_retinanet_r101_r50) at GPU sizes: benchmarks/gpu_check.py runs these
# with --device cuda --amp; they are not in the default --pairs (hours on a CPU).
PAIRS |= {
    "r101_r50_640": {
        "size": 640,
        "batch": 2,
        "teacher": {"backbone": "resnet101"},
        "student": {"backbone": "resnet50"},
        "levels": (3, 4, 5, 6, 7),
    },
    # COCO's usual resize: the short side 800, the long side 1333
    "r101_r50_1333x800": {
        "size": 800,
        "width": 1333,
        "batch": 2,
        "teacher": {"backbone": "resnet101"},
        "student": {"backbone": "resnet50"},
        "levels": (3, 4, 5, 6, 7),
    },
}
DEFAULT_PAIRS = ["demo_tiny_128", "r50_r18_320", "yolo11n_128"]


def make_batch(
    size: int, batch: int, num_classes: int, width: int | None = None
) -> tuple[list, list]:
    """``batch`` random images of ``size`` x ``size`` (``width`` wide if given), 4 boxes each."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, width or size, generator=g) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=g) * size * 0.6
        wh = torch.rand(4, 2, generator=g) * size * 0.3 + size * 0.08
        targets.append(
            {
                "boxes": torch.cat([xy, xy + wh], dim=1),
                "labels": torch.randint(0, num_classes, (4,), generator=g),
            }
        )
    return images, targets


NUM_CLASSES = 10


def build_pair(spec: dict, methods: dict[str, float]) -> Distiller:
    """The pair's teacher and student (RetinaNet unless the spec names a detector) in a
    Distiller, in training mode."""
    detector = spec.get("detector", "retinanet")
    if detector == "yolo":  # its YAML sets the levels; the letterbox side is the size
        common = {"num_classes": NUM_CLASSES, "image_size": spec["size"]}
    else:
        common = {
            "num_classes": NUM_CLASSES,
            "levels": spec["levels"],
            "min_size": spec["size"],
            "max_size": spec.get("width", spec["size"]),
        }
    torch.manual_seed(0)
    teacher = build_detector(detector, **common, **spec["teacher"])
    student = build_detector(detector, **common, **spec["student"])
    return Distiller(student, teacher, methods).train()


def measure(
    name: str,
    spec: dict,
    methods: dict[str, float],
    repeats: int,
    device: str = "cpu",
    amp: bool = False,
) -> dict:
    """The pair's step times and overhead ratio on ``device`` (float16 autocast with ``amp``).

    On CUDA every timed call ends with a synchronise (the kernels run
    asynchronously), and the peak memory of the distillation step is reported.
    """
    dev = torch.device(device)
    distiller = build_pair(spec, methods).to(dev)
    teacher, student = distiller.teacher, distiller.student
    images, targets = make_batch(spec["size"], spec["batch"], NUM_CLASSES, spec.get("width"))
    images = [image.to(dev) for image in images]
    targets = [{k: v.to(dev) for k, v in t.items()} for t in targets]
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=1e-4, momentum=0.9)
    amp = amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    cuda = dev.type == "cuda"

    def step(loss_fn) -> None:
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            losses = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()

    def student_step() -> None:
        step(lambda: student(images, targets).losses)

    image_list, _ = student.transform(images, [dict(t) for t in targets])

    def teacher_forward() -> None:  # as the Distiller runs it (inference mode, its layout)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            distiller.teacher_outputs(image_list.tensors, image_list.image_sizes)

    @torch.no_grad()
    def student_forward() -> None:
        was_training = student.training
        student.eval()
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            student.forward_batch(image_list.tensors, image_list.image_sizes)
        student.train(was_training)

    def distill_step() -> None:
        step(lambda: distiller(images, targets))

    functions = {"student": student_step, "teacher": teacher_forward, "distill": distill_step,
                 "student_forward": student_forward}  # fmt: skip
    if cuda:
        functions = {k: synchronised(fn) for k, fn in functions.items()}
    times = call_times(functions, repeats)
    peak = None
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        functions["distill"]()
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    ratio = paired_ratios(times, "distill", ("student", "teacher"))
    student_s, teacher_s, distill_s, student_forward_s = (
        statistics.median(times[k]) for k in ("student", "teacher", "distill", "student_forward")
    )
    return {
        "pair": name,
        "image_size": spec["size"],
        "batch": spec["batch"],
        "methods": methods,
        "teacher_params_M": sum(p.numel() for p in teacher.parameters()) / 1e6,
        "student_params_M": sum(p.numel() for p in student.parameters()) / 1e6,
        "student_step_s": student_s,
        "teacher_forward_s": teacher_s,
        "distill_step_s": distill_s,
        "overhead_ratio": ratio["median"],
        "overhead_ratio_quartiles": [ratio["q1"], ratio["q3"]],
        "overhead_ratio_per_turn": ratio["ratios"],
        "student_train_images_per_s": spec["batch"] / student_s,
        "distill_train_images_per_s": spec["batch"] / distill_s,
        # The network alone in eval mode (no resize, decoding or NMS): inference_speed.py
        # measures the whole predict path of the `digits` models.
        "teacher_forward_images_per_s": spec["batch"] / teacher_s,
        "student_forward_images_per_s": spec["batch"] / student_forward_s,
        "device": str(dev),
        "amp": amp,
        "distill_step_peak_memory_mib": peak,  # CUDA only
    }


def synchronised(fn):
    """``fn`` followed by a CUDA synchronise: a timed call must include its kernels."""

    def call() -> None:
        fn()
        torch.cuda.synchronize()

    return call


def pair_parser(description: str) -> argparse.ArgumentParser:
    """The options of every benchmark over :data:`PAIRS`: pairs, methods, repeats, output."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS, choices=list(PAIRS),
                        help="default: %(default)s")  # fmt: skip
    parser.add_argument("--methods", default="rm=4.0,pfi=1.5", type=parse_methods,
                        help="comma-separated name=weight")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    return parser


def parse_methods(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in (item.split("=") for item in text.split(","))}


def run_over_pairs(benchmark: str, description: str, measure_pair) -> None:
    """Parse :func:`pair_parser`'s options, ``measure_pair`` each chosen pair, emit the JSON."""
    args = pair_parser(description).parse_args()
    results = [measure_pair(n, PAIRS[n], args.methods, args.repeats) for n in args.pairs]
    emit({"benchmark": benchmark, **environment(), "results": results}, args.out)


def main() -> None:
    parser = pair_parser(__doc__)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--amp", action="store_true",
                        help="float16 autocast and a gradient scaler (CUDA only, as train.amp)")  # fmt: skip
    args = parser.parse_args()
    results = [measure(n, PAIRS[n], args.methods, args.repeats, args.device, args.amp)
               for n in args.pairs]  # fmt: skip
    emit({"benchmark": "step_overhead", **environment(), "results": results}, args.out)


if __name__ == "__main__":
    main()
