"""Our detectors against torchvision's own, built from the same parts, on the same batch.

    python benchmarks/vs_torchvision.py --out benchmarks/results/vs_torchvision.json

For RetinaNet and FCOS on a ResNet-18 FPN with frozen BatchNorm (P3-P7, as
torchvision's ``*_resnet50_fpn`` builders make them): torchvision's detector is
built first, ours loads its state dict strictly (so the weights are identical),
and both run the same batch of 2 images in one process: a training step
(forward, backward, SGD step) and inference (eval forward with
post-processing), at 320 and 640 px (``--sizes``; ``1333x800`` is
COCO's resize: short side 800, long side 1333; ``--backbone resnet50``,
``--device cuda --amp`` for a GPU under float16 autocast, as
``benchmarks/gpu_check.py`` runs it). The four step functions take turns in
every round (``_common.call_times``), so a change in machine load falls on
both detectors alike. Times are medians of ``--repeats`` after one warm-up;
``ratio`` is ours / torchvision's (1.0 is parity, below 1 is faster), taken
within each turn and its median over the turns reported with the quartiles
(``_common.paired_ratios``: the machine's drift cancels within a turn).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torchvision
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from _common import call_times, emit, environment, paired_ratios
from detdistill.models import build_detector

NUM_CLASSES = 10


def parse_size(text: str) -> tuple[int, int]:
    """``640`` -> (640, 640); ``1333x800`` -> (1333, 800): width, height."""
    width, _, height = text.partition("x")
    return int(width), int(height or width)


def size_name(size: tuple[int, int]) -> int | str:
    return size[0] if size[0] == size[1] else f"{size[0]}x{size[1]}"


def torchvision_detector(
    name: str, size: tuple[int, int], backbone: str = "resnet18"
) -> torch.nn.Module:
    body = getattr(torchvision.models, backbone)(weights=None, norm_layer=FrozenBatchNorm2d)
    fpn = _resnet_fpn_extractor(
        body, 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )
    cls = RetinaNet if name == "retinanet" else FCOS
    return cls(fpn, NUM_CLASSES, min_size=min(size), max_size=max(size))


def our_detector(
    name: str, size: tuple[int, int], reference: torch.nn.Module, backbone: str = "resnet18"
) -> torch.nn.Module:
    model = build_detector(
        name, backbone=backbone, norm_layer="frozen_bn", num_classes=NUM_CLASSES,
        min_size=min(size), max_size=max(size),
        **({"anchor_scale": 4.0} if name == "retinanet" else {}),
    )  # fmt: skip
    model.load_state_dict(reference.state_dict(), strict=True)
    return model


def batch(size: tuple[int, int]) -> tuple[list[torch.Tensor], list[dict]]:
    g = torch.Generator().manual_seed(0)
    width, height = size
    images = [torch.rand(3, height, width, generator=g) for _ in range(2)]
    short = min(size)  # boxes inside the square of the short side, as at a square size
    targets = []
    for _ in images:
        xy = torch.rand(3, 2, generator=g) * short * 0.6
        wh = torch.rand(3, 2, generator=g) * short * 0.3 + short * 0.05
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(0, NUM_CLASSES, (3,), generator=g)})  # fmt: skip
    return images, targets


STEPS = ("train_step_s", "inference_s")


def step_functions(
    model: torch.nn.Module, images, targets, amp: bool = False
) -> dict[str, Callable[[], None]]:
    """A training step (forward, backward, SGD step) and inference (eval forward, post-processing).

    ``amp``: float16 autocast and a gradient scaler, as ``train.amp`` trains (CUDA).
    On CUDA each call ends with a synchronise, so that its time includes its kernels.
    """
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    device = images[0].device
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_step() -> None:
        model.train()
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            output = model(images, targets)
        losses = output.losses if hasattr(output, "losses") else output
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
        sync()

    @torch.no_grad()
    def inference() -> None:
        model.eval()
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            model(images)
        sync()

    return {"train_step_s": train_step, "inference_s": inference}


def timings(
    models: dict[str, torch.nn.Module], images, targets, repeats: int, amp: bool = False
) -> dict:
    """Each model's step functions, all interleaved (see ``call_times``): times and ratios."""
    fns = {
        f"{owner}/{kind}": fn
        for owner, model in models.items()
        for kind, fn in step_functions(model, images, targets, amp).items()
    }
    times = call_times(fns, repeats)
    result: dict[str, dict] = {
        owner: {kind: statistics.median(times[f"{owner}/{kind}"]) for kind in STEPS}
        for owner in models
    }
    for kind in STEPS:
        result[f"ratio_{kind.removesuffix('_s')}"] = paired_ratios(
            times, f"detdistill/{kind}", (f"torchvision/{kind}",)
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--detectors", nargs="+", default=["retinanet", "fcos"])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(320, 320), (640, 640)],
                        help="square side, or WIDTHxHEIGHT such as 1333x800 (default: 320 640)")  # fmt: skip
    parser.add_argument(
        "--backbone", default="resnet18", help="a torchvision ResNet (default: resnet18)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--amp", action="store_true",
                        help="float16 autocast and a gradient scaler (CUDA only, as train.amp)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    amp = args.amp and device.type == "cuda"
    results = []
    for name in args.detectors:
        for size in args.sizes:
            torch.manual_seed(0)
            reference = torchvision_detector(name, size, args.backbone).to(device)
            ours = our_detector(name, size, reference, args.backbone).to(device)
            images, targets = batch(size)
            images = [image.to(device) for image in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            measured = timings({"torchvision": reference, "detdistill": ours}, images, targets,
                               args.repeats, amp)  # fmt: skip
            train, inference = measured["ratio_train_step"], measured["ratio_inference"]
            results.append({
                "detector": name, "backbone": args.backbone, "image_size": size_name(size),
                "device": str(device), "amp": amp, "batch": len(images),
                "params_M": sum(p.numel() for p in ours.parameters()) / 1e6,
                "torchvision": measured["torchvision"], "detdistill": measured["detdistill"],
                "ratio_train_step": train["median"],
                "ratio_train_step_quartiles": [train["q1"], train["q3"]],
                "ratio_inference": inference["median"],
                "ratio_inference_quartiles": [inference["q1"], inference["q3"]],
            })  # fmt: skip
    emit({"benchmark": "vs_torchvision", **environment(), "repeats": args.repeats,
          "results": results}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
