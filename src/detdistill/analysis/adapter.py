"""A least-squares 1x1 convolution from student to teacher features.

Why: PFI's feature difference D compares ``phi(F^s)`` with ``F^t``,
and ``phi`` (the trained adapter) is not saved in a student's ``model.pt``.
When the channel counts differ, the analysis therefore fits the best linear
map it can, per level: a 1x1 conv is a channel-wise linear regression, fitted
here by least squares over all analysed locations. D is then the part of the
teacher's features that *no* linear read-out of the student explains, which
is a lower bound of what a trained adapter would leave.

The fit streams: only the normal equations ``[X 1]^T [X 1]`` and
``[X 1]^T Y`` (float64) are accumulated, so hundreds of COCO images never
need their feature maps in memory at once; :func:`torch.linalg.lstsq` with
the SVD-based ``gelsd`` driver then solves them, giving the minimum-norm
solution when some student channels are dead or collinear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ChannelMap", "ChannelMapFitter", "fit_channel_map"]


def _as_rows(x: Tensor) -> Tensor:
    """(N, C, H, W) maps or (n, C) rows -> (n, C) float64 rows."""
    if x.dim() == 4:
        x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    elif x.dim() != 2:
        raise ValueError(f"expected (N, C, H, W) or (n, C), got shape {tuple(x.shape)}")
    return x.detach().double()


@dataclass
class ChannelMap:
    """``y = weight @ x + bias`` per location: weight (C_out, C_in), bias (C_out,)."""

    weight: Tensor
    bias: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        """Apply to (N, C_in, H, W) maps or (n, C_in) rows, in ``x``'s dtype and device."""
        w = self.weight.to(x.device, x.dtype)
        b = self.bias.to(x.device, x.dtype)
        if x.dim() == 4:
            return torch.einsum("oc,nchw->nohw", w, x) + b[None, :, None, None]
        return x @ w.T + b


class ChannelMapFitter:
    """Accumulates the normal equations of one level; :meth:`solve` gives the map."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.gram = torch.zeros(in_channels + 1, in_channels + 1, dtype=torch.float64)
        self.cross = torch.zeros(in_channels + 1, out_channels, dtype=torch.float64)
        self.count = 0

    def update(self, student: Tensor, teacher: Tensor) -> None:
        """Add matching locations: (N, C_in, H, W) with (N, C_out, H, W), or rows."""
        x, y = _as_rows(student), _as_rows(teacher)
        if (
            x.shape[0] != y.shape[0]
            or x.shape[1] != self.in_channels
            or y.shape[1] != self.out_channels
        ):
            raise ValueError(
                f"expected student (n, {self.in_channels}) and teacher (n, {self.out_channels}) "
                f"locations, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        x1 = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        self.gram += (x1.T @ x1).cpu()
        self.cross += (x1.T @ y).cpu()
        self.count += int(x.shape[0])

    def solve(self) -> ChannelMap:
        if self.count == 0:
            raise ValueError("no locations were added: cannot fit the channel map")
        solution = torch.linalg.lstsq(self.gram, self.cross, driver="gelsd").solution
        return ChannelMap(weight=solution[:-1].T.contiguous(), bias=solution[-1].contiguous())


def fit_channel_map(student: Tensor, teacher: Tensor) -> ChannelMap:
    """Least-squares ``teacher ~ weight @ student + bias`` over all locations at once."""
    x = _as_rows(student)
    fitter = ChannelMapFitter(x.shape[1], _as_rows(teacher).shape[1])
    fitter.update(student, teacher)
    return fitter.solve()
