"""``detdistill demo``: the whole story on the embedded ``digits`` data, in one command.

Teacher (trained once, then reused), baseline student, RM+PFI student, and a
table of what distillation bought. Uses the bundled presets
``digits_gfl_teacher``, ``digits_gfl_student`` and ``digits_gfl_distill``: the
``digits`` models with a GFL head, which trains a teacher twice as accurate as
RetinaNet's in less time and students 1.5x faster (the RetinaNet presets,
``digits_teacher`` etc., are the paper's detector and the method tables').
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from detdistill.engine.checkpoint import WEIGHTS_FILE, load_checkpoint
from detdistill.engine.config import Config, config_to_dict
from detdistill.engine.presets import load_preset_or_file
from detdistill.engine.trainer import run
from detdistill.errors import CheckpointError
from detdistill.jsonio import dumps
from detdistill.tables import metrics_table

QUICK = [
    "data.num_train=256",
    "data.num_val=64",
    "train.epochs=2",
    "train.warmup_iters=10",
    "train.log_interval=5",
]
# The table needs final metrics only; skipping the per-epoch evaluations saves
# about two minutes.
FINAL_EVAL = ["train.eval_interval=0"]


def _config(preset: str, workdir: Path, run_name: str, quick: bool, extra: list[str]) -> Config:
    overrides = [f"output_dir={workdir / run_name}", f"data.root={workdir / 'data'}", *FINAL_EVAL]
    overrides += QUICK if quick else []
    return load_preset_or_file(preset, overrides + extra)


def _reusable(cfg: Config) -> dict[str, float] | None:
    """The metrics of a finished earlier run of exactly this config, if there is one."""
    weights = Path(cfg.output_dir) / WEIGHTS_FILE
    summary = Path(cfg.output_dir) / "summary.json"
    if not (weights.is_file() and summary.is_file()):
        return None
    try:
        payload = load_checkpoint(weights)
    except CheckpointError:
        return None
    done = json.loads(summary.read_text()).get("status") == "completed"
    return dict(payload["metrics"]) if done and payload["config"] == config_to_dict(cfg) else None


def _train_student(
    preset: str, workdir: Path, run_name: str, quick: bool, extra: list[str], threads: int
) -> tuple[dict[str, float], float]:
    """One student run in its own process (spawned): final metrics and minutes."""
    import torch

    torch.set_num_threads(threads)
    began = time.perf_counter()
    metrics = run(_config(preset, workdir, run_name, quick, extra), show_progress=False).metrics
    return metrics, (time.perf_counter() - began) / 60


def run_demo(
    workdir: Path, quick: bool = False, show_progress: bool = True
) -> dict[str, dict[str, float]]:
    """Train teacher (or reuse it), baseline and distilled student; print and save the table.

    The two students need only the teacher, not each other, so they train side
    by side, each in its own process with half the cores: small models use two
    threads poorly (the timings, side by side and one after the other, are in
    ``benchmarks/results/demo.json``).
    """
    start = time.perf_counter()
    phase_minutes: dict[str, float] = {}

    teacher_cfg = _config("digits_gfl_teacher", workdir, "teacher", quick, [])
    teacher_metrics = _reusable(teacher_cfg)
    if teacher_metrics is None:
        print(f"[1/2] training the teacher -> {teacher_cfg.output_dir}")
        began = time.perf_counter()
        teacher_metrics = run(teacher_cfg, show_progress=show_progress).metrics
        phase_minutes["teacher"] = (time.perf_counter() - began) / 60
        print(f"      teacher done in {phase_minutes['teacher']:.1f} min")
    else:
        print(f"[1/2] reusing the teacher in {teacher_cfg.output_dir}")
    teacher_ckpt = Path(teacher_cfg.output_dir) / WEIGHTS_FILE

    students = {
        "student": ("digits_gfl_student", "student_baseline", []),
        "student + RM + PFI": (
            "digits_gfl_distill",
            "student_rm_pfi",
            [f"distill.teacher_checkpoint={teacher_ckpt}"],
        ),
    }
    threads = max(1, (os.cpu_count() or 2) // 2)
    print(
        "[2/2] training the student baseline (no distillation) and the student with Rank "
        f"Mimicking + Prediction-guided Feature Imitation, side by side ({threads} thread(s) each)"
    )
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {
            phase: pool.submit(_train_student, preset, workdir, name, quick, extra, threads)
            for phase, (preset, name, extra) in students.items()
        }
        results = {phase: future.result() for phase, future in futures.items()}
    for phase, (_, minutes) in results.items():
        phase_minutes[phase] = minutes
        print(f"      {phase} done in {minutes:.1f} min")
    baseline, distilled = (results[phase][0] for phase in students)

    rows = {"teacher": teacher_metrics, "student": baseline, "student + RM + PFI": distilled}
    table = metrics_table(rows, baseline="student")
    gap = teacher_metrics.get("mAP", 0.0) - baseline.get("mAP", 0.0)
    gain = distilled.get("mAP", 0.0) - baseline.get("mAP", 0.0)
    closed = (
        f"{100 * gain / gap:.0f}% of the teacher-student gap closed"
        if gap > 0
        else "no gap to close"
    )
    minutes = (time.perf_counter() - start) / 60
    text = f"{table}\n\nRM+PFI gain: {100 * gain:+.1f} mAP ({closed}); {minutes:.1f} min"
    print("\n" + text)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.json").write_text(
        dumps(
            {
                "rows": rows,
                "gain_mAP": gain,
                "gap_mAP": gap,
                "minutes": minutes,
                "phase_minutes": phase_minutes,
                "quick": quick,
            },
            indent=2,
        )
        + "\n"
    )
    (workdir / "results.txt").write_text(text + "\n")
    return rows
