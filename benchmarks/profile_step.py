"""Where one distillation step spends its time (torch.profiler), as JSON.

    python benchmarks/profile_step.py --pair demo_tiny_128 --out benchmarks/results/profile_step.json

Profiles a few distillation steps (after warm-up) of a pair from
``step_overhead.py`` and reports the operators with the most self CPU time and
the share of the step spent inside the distillation terms and adapters.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from _common import emit, environment
from step_overhead import NUM_CLASSES, PAIRS, build_pair, make_batch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pair", choices=list(PAIRS), default="demo_tiny_128")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    spec = PAIRS[args.pair]
    distiller = build_pair(spec, {"rm": 4.0, "pfi": 1.5})
    images, targets = make_batch(spec["size"], spec["batch"], NUM_CLASSES)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=1e-4)

    def step() -> None:
        losses = distiller(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            with record_function("step"):
                step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    by_label = {e.key: e.cpu_time_total for e in events if e.key.startswith(("step", "distill/"))}
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    emit(
        {
            "benchmark": "profile_step",
            **environment(),
            "pair": args.pair,
            "steps": args.steps,
            "share_of_step": {k: by_label[k] / by_label["step"] for k in by_label if k != "step"},
            "top_self_cpu": [
                {"op": e.key, "self_cpu_share": e.self_cpu_time_total / total, "calls": e.count}
                for e in top
            ],
        },
        args.out,
    )


if __name__ == "__main__":
    main()
