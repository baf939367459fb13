"""Everything this project can only check on a GPU, in one script of at most 8 minutes.

    python benchmarks/gpu_check.py            # writes benchmarks/results/gpu_check_<device>.json

Sections, each in its own process (a CUDA failure in one leaves the others'
results) and each cut off at its own timeout within ``--budget-s`` in all:

* ``tests``: the test files that mention ``cuda`` (on a GPU their CUDA branches
  run; on a CPU their CPU branches, fast lane only);
* ``cuda_training``: a tiny teacher, then a tiny RM+PFI student with
  ``train.amp``, ``distill.teacher_half`` and ``auto`` weights, on the GPU:
  finished, finite, and the peak memory;
* ``demo_teacher_step``: the demo's teacher (``digits_gfl_teacher``, 128 px,
  batch 16) training step: images/s in float32 and with AMP, peak memory;
* ``sweep_on_gpu``: a tiny ``detdistill sweep`` through the local backend,
  one GPU per run (``CUDA_VISIBLE_DEVICES``);
* ``step_overhead``: ``step_overhead.py`` for RetinaNet ResNet-101 -> ResNet-50
  at 640 px and at 1333x800 with AMP: training images/s of the student alone
  and distilled, the overhead ratio, the distillation step's peak memory;
* ``vs_torchvision``: ``vs_torchvision.py`` for RetinaNet ResNet-50 at 640 px
  and 1333x800 with AMP: our step and inference times against torchvision's.

Without CUDA only ``tests`` runs; every other section is recorded as skipped
with the reason, so the same command is a quick dry run on a laptop.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from _common import emit, environment
from detdistill import jsonio

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUDGET_S = 480  # the 8 minutes a GPU check may take
# test_gpu_check.py mentions cuda because it runs this script: collecting it here would recurse.
NOT_CUDA_TESTS = {"test_gpu_check.py"}

# The conftest's tiny RetinaNet on 16 `shapes` images at 64 px: seconds per run.
TINY = [
    "data.name=shapes",
    "data.num_train=16",
    "data.num_val=8",
    "data.image_size=64",
    "data.batch_size=4",
    "data.num_workers=0",
    "model.num_classes=6",
    "model.backbone_kwargs={width: 4, depth: 1}",
    "train.epochs=2",
    "train.warmup_iters=1",
    "device=cuda",
]


def device_name() -> str:
    """``cpu``, or the first GPU's name as a file-name slug (``nvidia_h100_80gb_hbm3``)."""
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(0).lower()).strip("_")


def cuda_test_files() -> list[str]:
    """The test files whose code mentions CUDA: the ones with a CUDA-only branch."""
    return sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").glob("test_*.py")
        if "cuda" in p.read_text() and p.name not in NOT_CUDA_TESTS
    )


def peak_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20


# --- sections that run in this script (in a child process: --section NAME) -------------------


def cuda_training(work: Path) -> dict[str, Any]:
    """A tiny teacher, then a tiny RM+PFI student with AMP, a float16 teacher and auto weights."""
    from detdistill.engine.presets import load_preset_or_file
    from detdistill.engine.trainer import run

    data = f"data.root={work / 'data'}"
    teacher = run(
        load_preset_or_file("digits_teacher", [*TINY, data, f"output_dir={work / 'teacher'}"]),
        show_progress=False,
    )
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    student_cfg = load_preset_or_file(
        "digits_distill",
        [*TINY, data, f"output_dir={work / 'student'}", "train.amp=true",
         "distill.teacher_half=true", "distill.methods={rm: auto, pfi: auto}",
         f"distill.teacher_checkpoint={work / 'teacher' / 'model.pt'}"],
    )  # fmt: skip
    student = run(student_cfg, show_progress=False)
    summary = json.loads((work / "student" / "summary.json").read_text())
    weights = summary.get("distill_weights") or {}
    finite = all(w is not None and math.isfinite(w) and w > 0 for w in weights.values())
    return {
        "ok": teacher.status == student.status == "completed" and finite,
        "teacher_status": teacher.status,
        "student_status": student.status,
        "student_metrics": student.metrics,
        "auto_weights": weights,
        "student_seconds": time.perf_counter() - start,
        "student_peak_memory_mib": peak_mib(),
    }


def demo_teacher_step(work: Path, steps: int = 20) -> dict[str, Any]:
    """The demo teacher's training step on a fixed batch: images/s in float32 and with AMP."""
    from detdistill.engine.builders import build_model
    from detdistill.engine.presets import load_preset_or_file
    from step_overhead import make_batch

    cfg = load_preset_or_file("digits_gfl_teacher", [])
    size, batch = cfg.data.image_size, cfg.data.batch_size
    images, targets = make_batch(size, batch, cfg.model.num_classes)
    images = [image.cuda() for image in images]
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    result: dict[str, Any] = {"preset": "digits_gfl_teacher", "image_size": size, "batch": batch}
    for amp in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model, size, pretrained=False).cuda().train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)

        def step(model=model, optimizer=optimizer, scaler=scaler, amp=amp) -> None:
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                losses = model(images, targets).losses
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(sum(losses.values())).backward()
            scaler.step(optimizer)
            scaler.update()

        for _ in range(3):  # warm-up: cuDNN picks its algorithms
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
        key = "amp" if amp else "float32"
        result[key] = {
            "step_s": seconds,
            "images_per_s": batch / seconds,
            "peak_memory_mib": peak_mib(),
        }
    return result


def sweep_on_gpu(work: Path) -> dict[str, Any]:
    """A tiny sweep, local backend: each run in a worker process given one GPU."""
    from detdistill.sweep import parse_row, plan_sweep, run_sweep
    from detdistill.sweep.table import write_report

    data = f"data.root={work / 'data'}"
    teacher_sets = [s for s in TINY if s.startswith(("model.", "train."))]
    plan = plan_sweep("digits_distill", [*TINY, data], [parse_row("rm")], [0], work / "sweep",
                      teacher="digits_teacher", teacher_overrides=teacher_sets)  # fmt: skip
    start = time.perf_counter()
    teacher, runs = run_sweep(plan, backend="local", say=lambda line: print(line, file=sys.stderr))
    report = write_report(plan, teacher, runs, work / "sweep" / "sweep.json")
    return {
        "ok": sorted(r["name"] for r in runs) == ["none_s0", "rm_s0"],
        "seconds": time.perf_counter() - start,
        "rows": [{k: r[k] for k in ("row", "mAP_mean", "chosen_weights")} for r in report["rows"]],
    }


IN_PROCESS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "cuda_training": cuda_training,
    "demo_teacher_step": demo_teacher_step,
    "sweep_on_gpu": sweep_on_gpu,
}


# --- the sections, in order: (name, needs CUDA, timeout s, command) ----------------------------


def sections(
    cuda: bool, json_out: Path, pytest_args: list[str]
) -> list[tuple[str, bool, int, list[str]]]:
    tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *cuda_test_files()]
    if not cuda:
        tests += ["-m", "not slow"]  # the CPU branches, quickly
    tests += pytest_args
    me = [sys.executable, str(Path(__file__).resolve())]
    return [
        ("tests", False, 150, tests),
        *((name, True, 90, [*me, "--section", name, "--out", str(json_out)]) for name in IN_PROCESS),
        ("step_overhead", True, 150,
         [sys.executable, str(HERE / "step_overhead.py"), "--pairs", "r101_r50_640",
          "r101_r50_1333x800", "--device", "cuda", "--amp", "--repeats", "5", "--out",
          str(json_out)]),
        ("vs_torchvision", True, 120,
         [sys.executable, str(HERE / "vs_torchvision.py"), "--detectors", "retinanet",
          "--backbone", "resnet50", "--sizes", "640", "1333x800", "--device", "cuda", "--amp",
          "--repeats", "5", "--out", str(json_out)]),
    ]  # fmt: skip


def run_section(command: list[str], timeout: float, json_out: Path) -> dict[str, Any]:
    """Run one section's process; its JSON result (if it wrote one) and the end of its output."""
    json_out.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-2000:]
        return {"status": "timeout", "seconds": timeout,
                "output_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}  # fmt: skip
    result = json.loads(json_out.read_text()) if json_out.is_file() else None
    ok = done.returncode == 0 and (result is None or result.get("ok", True))
    entry: dict[str, Any] = {
        "status": "ok" if ok else "failed",
        "seconds": time.perf_counter() - start,
        "returncode": done.returncode,
    }
    if result is not None:
        entry["result"] = result
    if not ok or result is None:  # pytest's summary, or what went wrong
        entry["output_tail"] = (done.stdout + done.stderr)[-2000:]
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=None,
                        help="default: benchmarks/results/gpu_check_<device>.json")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help="all sections together stop by then (default: %(default)s)")  # fmt: skip
    parser.add_argument("--pytest-arg", dest="pytest_args", action="append", default=[],
                        help="extra argument of the tests section (e.g. --collect-only)")  # fmt: skip
    parser.add_argument("--section", choices=list(IN_PROCESS), default=None,
                        help="run one in-process section and write its JSON to --out (internal)")  # fmt: skip
    args = parser.parse_args()
    if args.section:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
            result = IN_PROCESS[args.section](Path(work))
        Path(args.out).write_text(jsonio.dumps(result) + "\n")
        return

    cuda = torch.cuda.is_available()
    device = device_name()
    out = args.out or str(HERE / "results" / f"gpu_check_{device}.json")
    deadline = time.monotonic() + args.budget_s
    report: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        json_out = Path(tmp) / "section.json"
        for name, needs_cuda, timeout, command in sections(cuda, json_out, args.pytest_args):
            left = deadline - time.monotonic()
            if needs_cuda and not cuda:
                report[name] = {"status": "skipped", "reason": "no CUDA device on this machine"}
            elif left < 10:
                report[name] = {
                    "status": "skipped",
                    "reason": f"the {args.budget_s:.0f} s budget is spent",
                }
            else:
                report[name] = run_section(command, min(timeout, left), json_out)
            line = f"[gpu_check] {name}: {report[name]['status']}"
            print(line + (f" ({report[name]['reason']})" if "reason" in report[name] else ""),
                  file=sys.stderr)  # fmt: skip
    emit({"benchmark": "gpu_check", **environment(), "device": device, "cuda": cuda,
          "gpu": torch.cuda.get_device_name(0) if cuda else None, "sections": report}, out)  # fmt: skip
    failed = [name for name, entry in report.items() if entry["status"] in ("failed", "timeout")]
    if failed:
        sys.exit(f"gpu_check: {', '.join(failed)} did not pass; see {out}")


if __name__ == "__main__":
    main()
