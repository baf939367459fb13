"""Cost of each distillation loss, and vectorised RM against a per-instance loop.

python benchmarks/loss_speed.py --out benchmarks/results/loss_speed.json
"""

from __future__ import annotations

import argparse

import torch

from _common import best_time, emit, environment
from detdistill.losses import (
    feature_imitation_loss,
    pfi_loss,
    rank_mimicking_loss,
    score_weighted_imitation,
    soft_label_kd_loss,
)


def rm_loop(student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The obvious implementation: one softmax pair per instance."""
    total = student.new_zeros(())
    instances = torch.unique(ids)
    for instance in instances:
        sel = ids == instance
        log_q_t = torch.log_softmax(teacher[sel], 0)
        log_q_s = torch.log_softmax(student[sel], 0)
        total = total + (log_q_t.exp() * (log_q_t - log_q_s)).sum()
    return total / len(instances)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--instances", type=int, default=100, help="instances per image")
    parser.add_argument("--candidates", type=int, default=20, help="candidates per instance")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)

    num_instances = args.images * args.instances
    ids = torch.arange(num_instances).repeat_interleave(args.candidates)
    ids = ids[torch.randperm(ids.numel())]
    student = torch.randn(ids.numel(), requires_grad=True)
    teacher = torch.randn(ids.numel())

    def fwd_bwd(fn):
        def run():
            student.grad = None
            fn(student, teacher, ids).backward()

        return run

    vectorised = best_time(fwd_bwd(rank_mimicking_loss), repeats=5)
    loop = best_time(fwd_bwd(rm_loop), repeats=1, warmup=0)
    torch.testing.assert_close(
        rank_mimicking_loss(student, teacher, ids),
        rm_loop(student, teacher, ids),
        rtol=1e-4,
        atol=1e-5,
    )

    # dense losses on RetinaNet-like maps: batch 16, 128 px, levels P3-P5, C=64, A*K = 9*10
    shapes = [(16, 16), (8, 8), (4, 4)]
    fs = [torch.randn(16, 64, h, w, requires_grad=True) for h, w in shapes]
    ft = [torch.randn(16, 64, h, w) for h, w in shapes]
    zs = [torch.randn(16, 90, h, w, requires_grad=True) for h, w in shapes]
    zt = [torch.randn(16, 90, h, w) for h, w in shapes]
    flat_s = torch.randn(16, 3024, 10, requires_grad=True)
    flat_t = torch.randn(16, 3024, 10)
    dense = {
        "pfi": lambda: pfi_loss(fs, ft, zs, zt).backward(),
        "fitnet": lambda: feature_imitation_loss(fs, ft).backward(),
        "scorel2": lambda: score_weighted_imitation(fs, ft, zt).backward(),
        "kd": lambda: soft_label_kd_loss(flat_s, flat_t).backward(),
    }
    emit(
        {
            "benchmark": "loss_speed",
            **environment(),
            "rm": {
                "candidates": ids.numel(),
                "instances": num_instances,
                "vectorised_s": vectorised,
                "loop_s": loop,
                "speedup": loop / vectorised,
            },
            "dense_fwd_bwd_s": {name: best_time(fn) for name, fn in dense.items()},
        },
        args.out,
    )


if __name__ == "__main__":
    main()
