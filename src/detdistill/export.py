"""ONNX export of a trained detector (the student alone: no teacher, no adapters).

What the graph holds, and why:

* **Input** ``images``: ``(N, 3, H, W)`` float32 RGB in ``[0, 1]`` (*not*
  normalised: the ImageNet mean/std normalisation is inside the graph, so every
  runtime feeds the same thing). ``N``, ``H`` and ``W`` are dynamic. The graph does
  **not** resize: feed images at the network's resolution (the longer side about
  ``image_size``, stored in the metadata; ``H`` and ``W`` ideally multiples of
  ``size_divisible``, which is what the PyTorch model pads to) and divide the
  boxes by your resize factor to get back to original pixels. Resizing stays
  with the caller so that the graph is a pure function of the pixels it gets
  (applications letterbox, crop or tile in their own ways).
* **Outputs** ``boxes`` ``(N, R, 4)``: every anchor's decoded box, xyxy in input
  pixels, clipped to the image; ``scores`` ``(N, R, K)``: per-class scores (sigmoid,
  or ``sqrt(sigmoid(cls) * sigmoid(quality))`` for FCOS/ATSS), exactly what the
  PyTorch post-processing ranks; ``level_sizes`` ``(L,)`` int64: how many of the
  ``R`` anchors belong to each pyramid level (level-major order), which the
  post-processing needs to keep PyTorch's per-level top-k. ``R`` depends on
  ``H`` and ``W``.
* **NMS is outside the graph**: :func:`postprocess_onnx_outputs` (numpy in, numpy
  out, class-wise NMS from torchvision) finishes the job and reproduces
  :meth:`OneStageDetector.postprocess`. ONNX's ``NonMaxSuppression`` is per class
  with a fixed ``max_output_boxes_per_class``, and the per-level top-k and the
  final cut to ``detections_per_img`` need data-dependent shapes; keeping them
  out keeps the graph simple, portable, and comparable to PyTorch to float
  precision (checked on every export).

The exporter is the TorchScript-based one (``dynamo=False``): torch 2.14's
default dynamo exporter needs ``onnxscript``, which is not a dependency here;
tracing records the shape arithmetic as ONNX ``Shape`` ops, which is what makes
the batch and image size dynamic (verified after every export on another batch
size and image size than the example's).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import boxes as box_ops

from detdistill.errors import DetDistillError
from detdistill.models.output import flatten_levels

__all__ = [
    "OnnxExportError",
    "OnnxOutputMismatchError",
    "export_detector",
    "export_module",
    "export_onnx",
    "postprocess_onnx_outputs",
    "read_metadata",
    "verify_onnx",
]

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "level_sizes")


class OnnxExportError(DetDistillError, RuntimeError):
    """The export could not be done (missing ``onnx``/``onnxruntime``, exporter failure)."""


class OnnxOutputMismatchError(OnnxExportError):
    """The exported graph runs but does not reproduce PyTorch's outputs."""


class _ExportedDetector(nn.Module):
    """The detector from a ``[0, 1]`` batch to decoded boxes and per-class scores.

    Built from the detector's own parts (``backbone``, ``head_forward``,
    ``make_anchors``, ``decode_boxes``, ``class_scores``), so the numbers are those
    of :meth:`OneStageDetector.postprocess` before thresholding and NMS.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        transform = detector.transform
        self.register_buffer("mean", torch.tensor(transform.image_mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(transform.image_std).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        det = self.detector
        k = det.num_classes
        x = (images - self.mean) / self.std
        features = det.backbone(x)
        cls_logits, bbox_regression, quality = det.head_forward(features)
        anchors = det.make_anchors(features, 1)[0]  # (R, 4), shared by the batch
        cls = flatten_levels(cls_logits, k)  # (N, R, K)
        code = det.box_code_size
        reg = flatten_levels(bbox_regression, code)  # (N, R, B)
        n = cls.shape[0]
        qual = None if quality is None else flatten_levels(quality, 1).reshape(-1)
        scores = det.class_scores(cls.reshape(-1, k), qual).reshape(n, -1, k)
        flat_anchors = anchors.unsqueeze(0).expand(n, -1, -1).reshape(-1, 4)
        boxes = det.decode_boxes(reg.reshape(-1, code), flat_anchors).reshape(n, -1, 4)
        height, width = images.shape[-2], images.shape[-1]
        boxes = box_ops.clip_boxes_to_image(boxes, (height, width))
        # H_l * W_l * A per level, computed from the tensors (not Python ints) so
        # that it stays dynamic in the traced graph.
        per_location = det.num_anchors_per_location
        level_sizes = torch.stack(
            [torch.ones_like(c[0, 0], dtype=torch.int64).sum() for c in cls_logits]
        )
        return boxes, scores, level_sizes * per_location


def export_module(detector: nn.Module) -> nn.Module:
    """The module that is exported (eval mode): useful as the PyTorch reference."""
    return _ExportedDetector(detector).eval()


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise OnnxExportError(
            f"ONNX export needs onnx and onnxruntime ({exc.name} is missing): "
            "pip install 'detdistill[onnx]'"
        ) from exc
    return onnx, onnxruntime


def _run_onnxruntime(path: Path, images: np.ndarray) -> list[np.ndarray]:
    _, ort = _require_onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})


def verify_onnx(
    path: str | Path,
    reference: nn.Module,
    images: Tensor,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> None:
    """Check the graph with ``onnx.checker`` and compare an onnxruntime run with PyTorch.

    Raises :class:`OnnxOutputMismatchError` naming the output and the worst error.
    """
    onnx, _ = _require_onnx()
    onnx.checker.check_model(str(path))
    with torch.no_grad():
        expected = [t.numpy() for t in reference(images)]
    got = _run_onnxruntime(Path(path), images.numpy())
    for name, exp, out in zip(OUTPUT_NAMES, expected, got, strict=True):
        if exp.shape != out.shape:
            raise OnnxOutputMismatchError(
                f"{path}: ONNX output '{name}' has shape {out.shape}, PyTorch {exp.shape}"
            )
        if not np.allclose(out, exp, rtol=rtol, atol=atol):
            worst = float(np.abs(out - exp).max())
            raise OnnxOutputMismatchError(
                f"{path}: ONNX output '{name}' differs from PyTorch by up to {worst:.3g} "
                f"(rtol={rtol}, atol={atol}) on an input of shape {tuple(images.shape)}"
            )


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = 17) -> Path:
    """Export ``checkpoint`` (a ``model.pt``) to ``out`` and verify it; returns ``out``.

    The class names, category ids, training image size and inference settings
    go into the ONNX metadata (see :func:`read_metadata`).
    """
    from detdistill.engine.builders import load_detector

    loaded = load_detector(checkpoint)
    if hasattr(loaded.model, "ultralytics_checkpoint"):
        raise OnnxExportError(
            f"{checkpoint} is a yolo model: export it with Ultralytics, from the ultralytics.pt "
            "written beside it: YOLO('.../ultralytics.pt').export(format='onnx') (docs/yolo.md)"
        )
    category_ids = loaded.payload.get("category_ids")
    return export_detector(
        loaded.model,
        out,
        image_size=loaded.image_size,
        opset=opset,
        class_names=loaded.class_names,
        category_ids=list(category_ids) if category_ids else None,
        source=str(checkpoint),
    )


def export_detector(
    detector: nn.Module,
    out: str | Path,
    *,
    image_size: int,
    opset: int = 17,
    class_names: Sequence[str] | None = None,
    category_ids: Sequence[int] | None = None,
    source: str = "detector",
) -> Path:
    """Export a built detector (eval mode is set) to ``out`` and verify it.

    The example input is one image at the training size; verification then runs
    a batch of two at another size, so a graph whose batch or image size got
    frozen into constants fails here rather than in the user's application.
    """
    onnx, _ = _require_onnx()
    out = Path(out)
    detector = detector.eval()
    module = export_module(detector)
    div = int(detector.transform.size_divisible)
    side = max(div, -(-image_size // div) * div)  # the training size, padded as PyTorch pads it
    example = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning)
            torch.onnx.export(
                module,
                (example,),
                str(out),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={
                    INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                    "boxes": {0: "batch", 1: "anchors"},
                    "scores": {0: "batch", 1: "anchors"},
                    "level_sizes": {0: "levels"},
                },
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter's errors do not say what was being exported
        raise OnnxExportError(f"exporting {source} to ONNX failed: {exc}") from exc
    num_classes = int(detector.num_classes)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    ids = list(category_ids) if category_ids is not None else list(range(1, num_classes + 1))
    metadata = {
        "producer": "detdistill",
        "detector": type(detector).__name__,
        "class_names": json.dumps(names),
        "category_ids": json.dumps([int(i) for i in ids]),
        "image_size": str(image_size),
        "size_divisible": str(div),
        "input": "images: float32 RGB in [0, 1], (N, 3, H, W); normalisation is inside the graph",
        "outputs": "boxes (N, R, 4) xyxy in input pixels; scores (N, R, K); "
        "level_sizes (L,) anchors per level; NMS not included",
        "score_thresh": str(detector.score_thresh),
        "nms_thresh": str(detector.nms_thresh),
        "detections_per_img": str(detector.detections_per_img),
        "topk_candidates": str(detector.topk_candidates),
    }
    model_proto = onnx.load(str(out))
    for key, value in metadata.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model_proto, str(out))
    check = torch.rand(2, 3, side + div, side + 2 * div, generator=torch.Generator().manual_seed(1))
    verify_onnx(out, module, check)
    log.info("exported %s (opset %d), verified with onnxruntime", out, opset)
    return out


def postprocess_onnx_outputs(
    boxes: np.ndarray,
    scores: np.ndarray,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
    level_sizes: np.ndarray | Sequence[int] | None = None,
    topk_candidates: int = 1000,
) -> list[dict[str, np.ndarray]]:
    """Threshold, per-level top-k and class-wise NMS on the ONNX outputs (copy it freely).

    ``boxes (N, R, 4)`` and ``scores (N, R, K)`` (or one image without ``N``) give
    per image ``{"boxes" (D, 4), "scores" (D,), "labels" (D,)}``, best first,
    labels in ``[0, K)``: :meth:`OneStageDetector.postprocess` step for step when
    ``level_sizes`` (the graph's third output) is given. Without it, the
    ``topk_candidates`` cap applies to all levels together instead of to each.
    The thresholds the model was trained with are in :func:`read_metadata`.
    """
    boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float32))
    scores_t = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    if boxes_t.dim() == 2:
        boxes_t, scores_t = boxes_t[None], scores_t[None]
    if boxes_t.dim() != 3 or boxes_t.shape[-1] != 4 or scores_t.shape[:2] != boxes_t.shape[:2]:
        raise ValueError(
            f"expected boxes (N, R, 4) and scores (N, R, K), got {tuple(boxes_t.shape)} "
            f"and {tuple(scores_t.shape)}"
        )
    num_anchors, k = scores_t.shape[1], scores_t.shape[2]
    sizes = [num_anchors] if level_sizes is None else [int(n) for n in level_sizes]
    if sum(sizes) != num_anchors:
        raise ValueError(f"level_sizes {sizes} do not add up to the {num_anchors} anchors")
    results = []
    for img_boxes, img_scores in zip(boxes_t, scores_t, strict=True):
        cand_boxes, cand_scores, cand_labels = [], [], []
        start = 0
        for size in sizes:
            flat = img_scores[start : start + size].flatten()
            keep = torch.where(flat > score_threshold)[0]
            top, order = flat[keep].topk(min(topk_candidates, keep.numel()))
            keep = keep[order]
            cand_boxes.append(img_boxes[start + keep // k])
            cand_scores.append(top)
            cand_labels.append(keep % k)
            start += size
        b, sc, lab = torch.cat(cand_boxes), torch.cat(cand_scores), torch.cat(cand_labels)
        kept = box_ops.batched_nms(b, sc, lab, iou_threshold)[:max_detections]
        results.append(
            {"boxes": b[kept].numpy(), "scores": sc[kept].numpy(), "labels": lab[kept].numpy()}
        )
    return results


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata :func:`export_onnx` stored, JSON values decoded."""
    onnx, _ = _require_onnx()
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    for key in ("class_names", "category_ids"):
        if key in props:
            props[key] = json.loads(props[key])
    return props
