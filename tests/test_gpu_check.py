"""benchmarks/gpu_check.py without a GPU: its CPU-safe part runs, the CUDA sections say why not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow  # spawns the check, which spawns pytest
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the check takes minutes: run it")
def test_without_cuda_the_check_runs_the_cpu_tests_and_skips_the_rest(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The tests section collects only: the suite runs those tests itself.
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out),
                           "--pytest-arg=--collect-only"], capture_output=True,
                          text=True, env=env, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]

    def refuse(constant: str) -> None:
        raise ValueError(f"non-strict JSON constant {constant}")

    report = json.loads(out.read_text(), parse_constant=refuse)
    assert report["device"] == "cpu" and report["cuda"] is False
    sections = report["sections"]
    assert sections["tests"]["status"] == "ok"
    assert "tests collected" in sections["tests"]["output_tail"]
    skipped = [name for name, entry in sections.items() if name != "tests"]
    assert {"cuda_training", "demo_teacher_step", "sweep_on_gpu", "step_overhead",
            "vs_torchvision"} == set(skipped)  # fmt: skip
    for name in skipped:
        assert sections[name] == {"status": "skipped", "reason": "no CUDA device on this machine"}
        assert f"[gpu_check] {name}: skipped (no CUDA device on this machine)" in done.stderr
