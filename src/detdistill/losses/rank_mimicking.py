"""Rank Mimicking (RM), Li et al., AAAI 2022: the loss, each object's candidate boxes, the method.

Formulas in docs/methods.md.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from detdistill.losses.batch import DistillBatch, IncompatibleModelsError
from detdistill.losses.methods import DistillMethod, check_choice, register_method
from detdistill.models.output import DetectorOutput

__all__ = [
    "Candidates",
    "RankMimicking",
    "positive_candidates",
    "rank_mimicking_loss",
    "top_iou_candidates",
]


def _segment_log_softmax(values: Tensor, segments: Tensor, num_segments: int) -> Tensor:
    """log softmax of ``values`` within each segment, all segments at once."""
    seg_max = torch.full((num_segments,), float("-inf"), dtype=values.dtype, device=values.device)
    seg_max = seg_max.scatter_reduce(0, segments, values, reduce="amax", include_self=True)
    shifted = values - seg_max.detach()[segments]
    seg_sum = torch.zeros(num_segments, dtype=values.dtype, device=values.device)
    seg_sum = seg_sum.index_add(0, segments, shifted.exp())
    return shifted - seg_sum.log()[segments]


def rank_mimicking_loss(
    student_scores: Tensor,
    teacher_scores: Tensor,
    instance_ids: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    r"""KL divergence between teacher and student rankings of each object's candidates.

    For ground-truth instance ``j`` with candidate boxes ``i = 1..N_j`` (the
    method's bag: by default the ``topk`` anchors of highest IoU with its box,
    or the anchors its assigner made positive) and scores ``z`` of its class::

        q^t_{j,i} = softmax_i(z^t_{j,i} / T),   q^s_{j,i} = softmax_i(z^s_{j,i} / T)
        L_RM = (1/M) * sum_j sum_i q^t_{j,i} * (log q^t_{j,i} - log q^s_{j,i})

    Source: Li et al., "Knowledge Distillation for Object Detection via Rank
    Mimicking and Prediction-guided Feature Imitation", AAAI 2022, eq. for L_RM
    No ``T**2`` factor is applied, as in the paper.

    The softmax is a segment softmax over ``instance_ids`` (one pass for the
    whole batch, no loop over instances), so only the relative order of an
    object's candidates matters, not their absolute scores.

    Args:
        student_scores: (P,) score of the instance's class for every candidate.
        teacher_scores: (P,) the same for the teacher; it receives no gradient.
        instance_ids: (P,) integer id of each candidate's instance; ids need not
            be contiguous or sorted.
        temperature: softmax temperature ``T`` (> 0).

    Returns:
        Scalar loss. ``M`` counts instances with at least one candidate.
        With no candidates the result is an exact 0 that is still connected to
        ``student_scores`` (so backward works). A one-candidate instance has
        ``q = 1`` for both networks and contributes exactly 0 (but counts in M).
        Logits of +-100 stay finite: the softmax is max-shifted per instance.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not (student_scores.shape == teacher_scores.shape == instance_ids.shape):
        raise ValueError(
            "student_scores, teacher_scores and instance_ids must share one shape (P,), got "
            f"{tuple(student_scores.shape)}, {tuple(teacher_scores.shape)}, {tuple(instance_ids.shape)}"
        )
    if student_scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (P,), got shape {tuple(student_scores.shape)}")
    if student_scores.numel() == 0:
        return student_scores.sum() * 0.0

    segments, num_instances = _dense_ids(instance_ids)
    log_q_s = _segment_log_softmax(student_scores / temperature, segments, num_instances)
    log_q_t = _segment_log_softmax(teacher_scores.detach() / temperature, segments, num_instances)
    kl_terms = log_q_t.exp() * (log_q_t - log_q_s)
    return kl_terms.sum() / num_instances


def _dense_ids(instance_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary ids to 0..M-1; returns the mapped ids and M."""
    unique, dense = torch.unique(instance_ids, return_inverse=True)
    return dense, int(unique.numel())


class Candidates(NamedTuple):
    """Candidate boxes of the ground-truth objects, one entry per (object, anchor) pair."""

    images: Tensor  # (P,) image index in the batch
    anchors: Tensor  # (P,) anchor index in the image's flat anchor order
    classes: Tensor  # (P,) the object's class
    instances: Tensor  # (P,) object id, unique over the batch


def positive_candidates(batch: DistillBatch) -> Candidates:
    """Each object's positive anchors, as the student's own assigner chose them."""
    if batch.student.matched_idxs is None:
        raise ValueError("the student's output has no assignment: run it with targets")
    images, anchors, classes, instances = [], [], [], []
    offset = 0
    for n, (matched, labels) in enumerate(
        zip(batch.student.matched_idxs, batch.gt_labels, strict=True)
    ):
        pos = torch.nonzero(matched >= 0).squeeze(1)
        gt_index = matched[pos]
        images.append(torch.full_like(pos, n))
        anchors.append(pos)
        classes.append(labels[gt_index].to(pos.dtype))
        instances.append(gt_index + offset)
        offset += labels.numel()
    return Candidates(*(torch.cat(x) for x in (images, anchors, classes, instances)))


def top_iou_candidates(batch: DistillBatch, k: int) -> Candidates:
    """Each object's ``k`` anchors of highest IoU with its box (IoU > 0), over all levels.

    A bag as ATSS draws before thresholding: larger than the assigner's
    positives (3.8 per object for the ``digits`` student), and the same
    size for every object, so there is an order worth mimicking. The
    overlaps are the student's assigner's (``student.gt_ious``) where it
    computed them: computing them again took most of RM's time. The top-k
    runs on all objects of the batch at once.
    """
    counts = torch.tensor([b.shape[0] for b in batch.gt_boxes])
    if int(counts.sum()) == 0:
        return positive_candidates(batch)
    ious = batch.student.gt_ious
    if ious is None:  # an assigner that never compares boxes with anchors (FCOS)
        ious = [
            box_iou(boxes.to(anchors.dtype), anchors)
            for boxes, anchors in zip(batch.gt_boxes, batch.student.anchors, strict=True)
        ]
    iou = torch.cat(ious)  # (objects, anchors): one batched tensor, one anchor count
    values, index = iou.topk(min(k, iou.shape[1]), dim=1)
    instances, rank = torch.nonzero(values > 0, as_tuple=True)
    chosen = index[instances, rank]
    image_of = torch.repeat_interleave(torch.arange(len(counts)), counts).to(chosen.device)
    classes = torch.cat(batch.gt_labels)[instances].to(chosen.dtype)
    return Candidates(image_of[instances], chosen, classes, instances)


@register_method("rm")
class RankMimicking(DistillMethod):
    """Rank Mimicking over each ground truth's candidate boxes (Li et al., AAAI 2022).

    ``score``: "logit" (default, the paper), "prob" (sigmoid, as the MMRazor
    port), or "quality": classification and localisation quality together,
    ``log(sigmoid(z_cls) * sigmoid(z_quality))``, for heads with a quality branch.
    ``candidates``: "topk" (default: each object's ``topk`` anchors of highest
    IoU with its box, see :func:`top_iou_candidates`) or
    "positives" (the assigner's positive anchors, the paper's choice). On
    ``digits`` the assigner gives 3.8 positives per object, too few to rank:
    RM over them lost 0.4 mAP at the auto weight, over the top-16 bag it
    gained 1.6 (``docs/weights.md``).
    """

    imitates = "outputs"

    def __init__(
        self,
        temperature: float = 1.0,
        score: Literal["logit", "prob", "quality"] = "logit",
        candidates: Literal["positives", "topk"] = "topk",
        topk: int | None = None,
    ):
        super().__init__()
        check_choice("rm", "score", score, ("logit", "prob", "quality"))
        check_choice("rm", "candidates", candidates, ("positives", "topk"))
        if topk is not None and candidates == "positives":
            raise ValueError(
                "rm topk sizes the candidates='topk' bag: with 'positives' it is unused"
            )
        topk = 16 if topk is None else topk
        if topk < 2:
            raise ValueError(f"rm topk must be >= 2 (one candidate has no order), got {topk}")
        if temperature <= 0:
            raise ValueError(f"rm temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.score = score
        self.candidates = candidates
        self.topk = topk

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        if self.score == "quality" and not (student.has_quality and teacher.has_quality):
            raise IncompatibleModelsError(
                "rm score='quality' reads a quality branch (FCOS, ATSS heads), got student "
                f"{student.head_type!r} and teacher {teacher.head_type!r}"
            )

    def _candidates(self, batch: DistillBatch) -> Candidates:
        if self.candidates == "topk":
            return top_iou_candidates(batch, self.topk)
        return positive_candidates(batch)

    def _scores(self, output: DetectorOutput, candidates: Candidates) -> Tensor:
        images, anchors, classes = candidates.images, candidates.anchors, candidates.classes
        logits = output.flat_cls_logits()[images, anchors, classes]
        if self.score == "logit":
            return logits
        if self.score == "prob":
            return logits.sigmoid()
        quality = output.flat_quality()
        if quality is None:
            raise ValueError(
                "rm score='quality' needs a detector head with a quality branch (FCOS, ATSS)"
            )
        quality_logits = quality[images, anchors]
        return F.logsigmoid(logits) + F.logsigmoid(quality_logits)

    def forward(self, batch: DistillBatch) -> Tensor:
        candidates = self._candidates(batch)
        student = self._scores(batch.student, candidates)
        teacher = self._scores(batch.teacher, candidates)
        return rank_mimicking_loss(student, teacher, candidates.instances, self.temperature)
