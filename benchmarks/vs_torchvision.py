"""Our detectors against torchvision's own, built from the same parts, on the same batch.

    python benchmarks/vs_torchvision.py --out benchmarks/results/vs_torchvision.json

For RetinaNet and FCOS on a ResNet-18 FPN with frozen BatchNorm (P3-P7, as
torchvision's ``*_resnet50_fpn`` builders make them): torchvision's detector is
built first, ours loads its state dict strictly (so the weights are identical),
and both run the same batch of 2 images in one process: a training step
(forward, backward, SGD step) and inference (eval forward with
post-processing), at 320 and 640 px. The four step functions take turns in
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


def torchvision_detector(name: str, size: int) -> torch.nn.Module:
    body = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(
        body, 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )
    cls = RetinaNet if name == "retinanet" else FCOS
    return cls(backbone, NUM_CLASSES, min_size=size, max_size=size)


def our_detector(name: str, size: int, reference: torch.nn.Module) -> torch.nn.Module:
    model = build_detector(
        name, backbone="resnet18", norm_layer="frozen_bn", num_classes=NUM_CLASSES,
        min_size=size, max_size=size, **({"anchor_scale": 4.0} if name == "retinanet" else {}),
    )  # fmt: skip
    model.load_state_dict(reference.state_dict(), strict=True)
    return model


def batch(size: int) -> tuple[list[torch.Tensor], list[dict]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(2)]
    targets = []
    for _ in images:
        xy = torch.rand(3, 2, generator=g) * size * 0.6
        wh = torch.rand(3, 2, generator=g) * size * 0.3 + size * 0.05
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(0, NUM_CLASSES, (3,), generator=g)})  # fmt: skip
    return images, targets


STEPS = ("train_step_s", "inference_s")


def step_functions(model: torch.nn.Module, images, targets) -> dict[str, Callable[[], None]]:
    """A training step (forward, backward, SGD step) and inference (eval forward, post-processing)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def train_step() -> None:
        model.train()
        output = model(images, targets)
        losses = output.losses if hasattr(output, "losses") else output
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    @torch.no_grad()
    def inference() -> None:
        model.eval()
        model(images)

    return {"train_step_s": train_step, "inference_s": inference}


def timings(models: dict[str, torch.nn.Module], images, targets, repeats: int) -> dict:
    """Each model's step functions, all interleaved (see ``call_times``): times and ratios."""
    fns = {
        f"{owner}/{kind}": fn
        for owner, model in models.items()
        for kind, fn in step_functions(model, images, targets).items()
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
    parser.add_argument("--sizes", nargs="+", type=int, default=[320, 640])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    for name in args.detectors:
        for size in args.sizes:
            torch.manual_seed(0)
            reference = torchvision_detector(name, size)
            ours = our_detector(name, size, reference)
            images, targets = batch(size)
            measured = timings({"torchvision": reference, "detdistill": ours}, images, targets,
                               args.repeats)  # fmt: skip
            train, inference = measured["ratio_train_step"], measured["ratio_inference"]
            results.append({
                "detector": name, "image_size": size, "batch": len(images),
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
