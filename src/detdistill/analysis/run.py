"""``detdistill analyze``: measure the paper's two observations on a user's teacher and student.

Loads both ``model.pt`` files, checks that they can be compared (the same
check as the Distiller), picks the data exactly as ``detdistill eval`` does
(default: the student's own validation set from its saved config), runs both
networks on up to ``max_images`` images and writes ``analysis.json``, the
figures and ``report.md`` to ``out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from detdistill import jsonio
from detdistill.analysis.collect import Collected, collect
from detdistill.analysis.draw import plot_candidates
from detdistill.analysis.features import level_correlations
from detdistill.analysis.plots import plot_map_overlays, plot_rank_histograms
from detdistill.analysis.ranks import rank_statistics
from detdistill.analysis.report import render_report
from detdistill.analysis.summary import rank_summary
from detdistill.data import (
    ClassMismatchError,
    DataError,
)
from detdistill.distill import Distiller
from detdistill.engine.builders import LoadedModel, build_eval_loader, load_detector
from detdistill.engine.distributed import resolve_device
from detdistill.engine.evaluate_checkpoint import evaluation_data
from detdistill.errors import ConfigError

__all__ = ["run_analysis"]

FIGURE_GLOBS = ("candidates_*.png", "feature_vs_prediction_*.png")


def _check_classes(teacher: LoadedModel, student: LoadedModel, dataset: Dataset) -> None:
    """Label k must mean the same class for teacher, student and data, or scores are compared across classes."""
    if teacher.class_names != student.class_names:
        if set(teacher.class_names) != set(student.class_names):
            raise ClassMismatchError(teacher.class_names, student.class_names, "student's classes")
        raise DataError(
            f"teacher and student list their classes in different orders: "
            f"{teacher.class_names} vs {student.class_names}"
        )
    data_names = list(getattr(dataset, "class_names", student.class_names))
    if data_names != student.class_names:
        raise ClassMismatchError(student.class_names, data_names, "data set")


def _figures(
    collected: Collected, strides: list[int], class_names: list[str], out: Path
) -> tuple[list[str], list[str]]:
    for pattern in FIGURE_GLOBS:  # stale figures of an earlier run would be mistaken for these
        for old in out.glob(pattern):
            old.unlink()
    candidates, maps = [], []
    for k, case in enumerate(collected.visuals):
        title = f"image {case.image_id}"
        name = f"candidates_{k}_img{case.image_id}.png"
        plot_candidates(case.image, case.objects, class_names, out / name, title=title)
        candidates.append(name)
        name = f"feature_vs_prediction_{k}_img{case.image_id}.png"
        d, p = collected.d_maps[case.position], collected.p_maps[case.position]
        plot_map_overlays(case.image, d, p, strides, out / name, title=title)
        maps.append(name)
    return candidates, maps


def run_analysis(
    teacher_ckpt: str | Path,
    student_ckpt: str | Path,
    data: str | Path | None = None,
    images: str | Path | None = None,
    data_format: str = "coco",
    split: str = "val",
    out: str | Path = Path("analysis"),
    max_images: int = 200,
    num_visualize: int = 4,
    batch_size: int = 8,
    device: str = "auto",
) -> Path:
    """Rank agreement and feature-vs-prediction differences of a teacher/student pair.

    Args:
        teacher_ckpt, student_ckpt: ``model.pt`` files of the two detectors.
        data, images, data_format, split: as ``detdistill eval``; default the
            student's own validation set.
        out: output folder (created); earlier figures of this analysis there are replaced.
        max_images: analyse the first ``max_images`` images of the data set.
        num_visualize: images drawn (the first ones with an object that has candidates).
        batch_size, device: inference settings (``device="auto"`` picks CUDA when present).

    Returns:
        The path of ``report.md``. Raises :class:`~detdistill.distill.IncompatibleModelsError`
        when the two models cannot be compared, ``DataError`` (class lists that
        differ, no images), ``ConfigError`` (bad arguments), ``FileNotFoundError``
        and ``CheckpointError``: one-line errors the CLI prints without a traceback.
    """
    for name, value, low in (
        ("max_images", max_images, 1),
        ("num_visualize", num_visualize, 0),
        ("batch_size", batch_size, 1),
    ):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}", key=name)
    for who, path in (("teacher", teacher_ckpt), ("student", student_ckpt)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{who} checkpoint not found: {path}")
    torch_device = resolve_device(device)
    teacher = load_detector(teacher_ckpt, map_location=torch_device)
    student = load_detector(student_ckpt, map_location=torch_device)
    # No methods: the pair is only compared. Checks compatibility; layout left as loaded.
    pair = Distiller(student.model, teacher.model, {}, teacher_channels_last=False)
    dataset, description, _ = evaluation_data(student, data, images, data_format, split)
    _check_classes(teacher, student, dataset)
    if len(dataset) == 0:
        raise DataError(f"no images to analyse in {description}")
    subset = Subset(dataset, range(min(max_images, len(dataset))))
    loader = build_eval_loader(subset, batch_size, num_workers=0)

    collected = collect(pair.to(torch_device), loader, dataset, torch_device, num_visualize)
    s_model = pair.student

    strides = [int(s) for s in s_model.strides]
    teacher_scores, student_scores, ids = collected.flat_scores()
    ranks = rank_statistics(teacher_scores, student_scores, ids)
    rank_numbers, rows = rank_summary(ranks, collected.instances, student.class_names)
    levels = level_correlations(collected.d_maps, collected.p_maps, strides)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_rank_histograms(ranks, out / "rank_correlation_hist.png")
    candidate_pngs, map_pngs = _figures(collected, strides, student.class_names, out)
    result: dict[str, Any] = jsonio.json_safe(
        {
            "teacher": str(teacher_ckpt),
            "student": str(student_ckpt),
            "data": description,
            "images": len(collected.image_ids),
            "image_ids": collected.image_ids,
            "candidate_score": "each detector's inference score of the object's class "
            "(sigmoid, or sqrt(cls * quality) for heads with a quality branch)",
            "rank": rank_numbers,
            "features": {
                "adapter": collected.adapters[0] if collected.adapters else "identity",
                "levels": levels,
            },
            "figures": {
                "rank_histogram": "rank_correlation_hist.png",
                "candidates": candidate_pngs,
                "feature_vs_prediction": map_pngs,
            },
            "instances": rows,
        }
    )
    jsonio.write(out / "analysis.json", result, indent=2)
    report = out / "report.md"
    report.write_text(render_report(result, candidate_pngs, map_pngs))
    return report
