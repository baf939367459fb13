"""Rank Mimicking (RM), Li et al., AAAI 2022; formulas in docs/methods.md."""

from __future__ import annotations

import torch
from torch import Tensor

from detdistill.losses._precision import float32_loss


def _segment_log_softmax(values: Tensor, segments: Tensor, num_segments: int) -> Tensor:
    """log softmax of ``values`` within each segment, all segments at once."""
    seg_max = torch.full((num_segments,), float("-inf"), dtype=values.dtype, device=values.device)
    seg_max = seg_max.scatter_reduce(0, segments, values, reduce="amax", include_self=True)
    shifted = values - seg_max.detach()[segments]
    seg_sum = torch.zeros(num_segments, dtype=values.dtype, device=values.device)
    seg_sum = seg_sum.index_add(0, segments, shifted.exp())
    return shifted - seg_sum.log()[segments]


@float32_loss
def rank_mimicking_loss(
    student_scores: Tensor,
    teacher_scores: Tensor,
    instance_ids: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    r"""KL divergence between teacher and student rankings of each object's candidates.

    For ground-truth instance ``j`` with candidate boxes ``i = 1..N_j`` (the
    anchors its assigner made positive) and scores ``z`` of its class::

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
        Scalar float32 loss. ``M`` counts instances with at least one candidate.
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
