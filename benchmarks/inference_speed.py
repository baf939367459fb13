"""Inference throughput: teacher vs student in PyTorch, and the student in ONNX Runtime.

python benchmarks/inference_speed.py [--teacher T.pt --student S.pt] \
    --out benchmarks/results/inference_speed.json

Without checkpoints the ``digits_teacher``/``digits_student`` presets are built
with random weights (speed does not depend on the weights). Three numbers per
model and batch size, in images per second:

* ``torch_eval``: ``model(list_of_images)`` in eval mode, what ``detdistill.load``
  runs: resize/normalise, network, decoding, NMS;
* ``torch_network``: the module that is exported (normalise, network, decoding;
  no resize, no NMS) on a ready batch tensor;
* ``onnx`` (student): the same graph in ONNX Runtime (CPUExecutionProvider), so
  ``onnx / torch_network`` compares runtimes on identical work.

Threads default to 1 for PyTorch and ONNX Runtime alike: on a shared machine,
spinning OpenMP threads measure the neighbours more than the model.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

from _common import best_time, emit, environment
from detdistill.engine.builders import build_model, load_detector
from detdistill.engine.config import load_config
from detdistill.engine.presets import preset_path
from detdistill.export import INPUT_NAME, export_detector, export_module


def _model(checkpoint: str | None, preset: str) -> tuple[nn.Module, int, str]:
    if checkpoint:
        loaded = load_detector(checkpoint)
        return loaded.model.eval(), loaded.image_size, str(checkpoint)
    cfg = load_config(preset_path(preset))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.image_size).eval()
    return model, cfg.data.image_size, f"preset {preset} (random weights)"


def _torch_speeds(model: nn.Module, size: int, batches: list[int], repeats: int) -> dict:
    network = export_module(model)
    eval_ips, net_ips = {}, {}
    for batch in batches:
        images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        as_list = list(images.unbind(0))
        with torch.inference_mode():
            eval_ips[f"batch{batch}"] = batch / best_time(
                lambda batch_list=as_list: model(batch_list), repeats
            )
            net_ips[f"batch{batch}"] = batch / best_time(lambda x=images: network(x), repeats)
    return {"torch_eval": eval_ips, "torch_network": net_ips}


def _onnx_speeds(
    model: nn.Module, size: int, batches: list[int], repeats: int, threads: int
) -> dict[str, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        path = export_detector(model, Path(tmp) / "student.onnx", image_size=size)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    speeds = {}
    for batch in batches:
        images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        feed = {INPUT_NAME: images.numpy()}
        speeds[f"batch{batch}"] = batch / best_time(lambda f=feed: session.run(None, f), repeats)
    return speeds


def _ratio(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {key: round(a[key] / b[key], 2) for key in a}


def _rounded(d: dict) -> dict:
    return {k: _rounded(v) if isinstance(v, dict) else round(v, 1) for k, v in d.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", default=None, help="teacher model.pt (default: preset)")
    parser.add_argument("--student", default=None, help="student model.pt (default: preset)")
    parser.add_argument("--batch", type=int, default=16, help="large batch size (default 16)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="PyTorch and ORT threads")
    parser.add_argument("--out", default="benchmarks/results/inference_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [args.batch, 1]

    teacher, t_size, t_source = _model(args.teacher, "digits_teacher")
    student, s_size, s_source = _model(args.student, "digits_student")
    result: dict = {"benchmark": "inference_speed", **environment(), "unit": "images/s"}
    models = {}
    for name, model, size, source in (
        ("teacher", teacher, t_size, t_source),
        ("student", student, s_size, s_source),
    ):
        models[name] = {
            "source": source,
            "type": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "image_size": size,
            **_rounded(_torch_speeds(model, size, batches, args.repeats)),
        }
    models["student"]["onnx"] = _rounded(
        _onnx_speeds(student, s_size, batches, args.repeats, args.threads)
    )
    result["models"] = models
    t, s = models["teacher"], models["student"]
    result["speedup"] = {
        "student_over_teacher_torch_eval": _ratio(s["torch_eval"], t["torch_eval"]),
        "student_over_teacher_torch_network": _ratio(s["torch_network"], t["torch_network"]),
        "onnx_over_torch_network_student": _ratio(s["onnx"], s["torch_network"]),
        "onnx_over_torch_eval_student": _ratio(s["onnx"], s["torch_eval"]),
    }
    result["notes"] = (
        "ratios are throughput ratios (>1: the first is faster); onnx excludes NMS and "
        "resizing, so compare it with torch_network; torch_eval includes both"
    )
    emit(result, args.out)


if __name__ == "__main__":
    main()
