"""``auto`` weights from any starting point: every method, a student that starts as a
(perturbed) copy of its teacher, and two random copies of one architecture.

    python benchmarks/auto_guard.py --out benchmarks/results/auto_guard.json
    python benchmarks/auto_guard.py --teacher runs/demo/teacher/model.pt --methods pfi rm

For each method and start, the student trains ``--steps`` steps on ``digits``
(SGD lr 0.01, momentum 0.9, batch 8; weights ``auto`` from 4 batches), once with
the guard (``docs/weights.md``) and once without it, and the JSON says whether
every loss stayed finite, the weights chosen at the start and at the end, and
what the guard lowered when. Without ``--teacher`` the teacher is the preset's
architecture at random initialisation.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.utils.data import DataLoader

from _common import emit, environment
from detdistill.data import collate_fn
from detdistill.distill import Distiller
from detdistill.engine.builders import build_datasets, build_model, load_detector
from detdistill.engine.presets import load_preset_or_file
from detdistill.losses import IncompatibleModelsError, list_methods


def starts(teacher: torch.nn.Module, cfg, seed: int) -> dict[str, tuple]:
    """The two starting points: a copy plus 0.1% noise, and a second random copy."""
    torch.manual_seed(seed)
    perturbed = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(1e-3 * p.abs().mean() * torch.randn_like(p))
    torch.manual_seed(seed + 1)
    return {
        "perturbed_copy": (teacher, perturbed),
        "random_copies": (teacher, build_model(cfg.model, cfg.data.image_size)),
    }


def train(teacher, student, method: str, data, steps: int, guard: bool, seed: int) -> dict:
    distiller = Distiller(copy.deepcopy(student), teacher, {method: "auto"}).train()
    loader = DataLoader(data, batch_size=8, shuffle=True, collate_fn=collate_fn,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    batches = iter(loader)
    distiller.balance([next(batches) for _ in range(4)])
    start = dict(distiller.weights)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01, momentum=0.9)
    finite, last_step = True, steps
    for step in range(steps):
        try:
            images, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, targets = next(batches)
        losses = distiller(images, targets, step=step if guard else None)
        total = sum(losses.values())
        if not torch.isfinite(total):
            finite, last_step = False, step
            break
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    return {"method": method, "guard": guard, "finite": finite, "steps": last_step,
            "start_weight": start[method], "end_weight": distiller.weights[method],
            "weight_changes": distiller.weight_changes,
            "final_losses": {k: float(v) for k, v in losses.items()} if finite else None}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="digits_gfl_student", help="the architecture of both")
    parser.add_argument("--teacher", default=None, help="a trained model.pt of that architecture")
    parser.add_argument("--methods", nargs="+", default=list_methods())
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the runs without the guard"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_preset_or_file(args.preset, [])
    data = build_datasets(cfg.data).train
    torch.manual_seed(args.seed)
    teacher = (
        load_detector(args.teacher).model
        if args.teacher
        else build_model(cfg.model, cfg.data.image_size)
    )
    results = []
    for start, (t, s) in starts(teacher, cfg, args.seed).items():
        for method in args.methods:
            for guard in (True,) if args.no_baseline else (True, False):
                try:
                    row = train(t, s, method, data, args.steps, guard, args.seed)
                except IncompatibleModelsError as exc:
                    row = {"method": method, "guard": guard, "skipped": str(exc)}
                row["start"] = start
                results.append(row)
                print(row, flush=True)
    emit({"benchmark": "auto_guard", **environment(), "preset": args.preset,
          "teacher": args.teacher, "steps": args.steps, "results": results}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
