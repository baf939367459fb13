"""Figures of the statistics: rank-correlation histograms and D/P map overlays.

Matplotlib's object API (``Figure``, no ``pyplot``) so that drawing needs no
display, touches no global backend state and leaks no open figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from detdistill.analysis.features import pearson_r
from detdistill.analysis.ranks import InstanceRanks, summarize

__all__ = ["plot_map_overlays", "plot_rank_histograms"]


def _fmt(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:+.2f}"


def plot_rank_histograms(ranks: InstanceRanks, path: Path) -> Path:
    """Histograms of per-instance Spearman rho and Kendall tau, with mean and median marked."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    bins = np.linspace(-1.0, 1.0, 21)
    for ax, name, values, color in (
        (axes[0], "Spearman rho", ranks.spearman, "tab:blue"),
        (axes[1], "Kendall tau", ranks.kendall, "tab:orange"),
    ):
        stats = summarize(values)
        finite = values[np.isfinite(values)]
        ax.hist(finite, bins=bins, color=color, alpha=0.8, edgecolor="white")
        if stats["count"]:
            ax.axvline(stats["mean"], color="black", ls="--", label=f"mean {_fmt(stats['mean'])}")
            ax.axvline(
                stats["median"], color="black", ls=":", label=f"median {_fmt(stats['median'])}"
            )
            ax.legend(loc="upper left")
        else:
            ax.text(
                0.5, 0.5, "no object with a defined order", ha="center", va="center",
                transform=ax.transAxes, in_layout=False,
            )  # fmt: skip
        ax.set_xlim(-1, 1)
        ax.set_xlabel(f"{name} (teacher vs student, per object)")
        ax.set_title(f"{name}: {stats['count']} objects with a defined order")
    axes[0].set_ylabel("objects")
    fig.suptitle(
        "How alike teacher and student rank each object's candidate boxes "
        "(1 = same order, 0 = unrelated, -1 = reversed)"
    )
    fig.savefig(path, dpi=100)
    return path


def plot_map_overlays(
    image: Tensor,
    d_maps: Sequence[Tensor],
    p_maps: Sequence[Tensor],
    strides: Sequence[int],
    path: Path,
    title: str = "",
) -> Path:
    """One row per FPN level: the image, D over it, P over it (each with its own colour scale).

    Each map cell is drawn over the ``stride x stride`` pixels it covers, so
    the positions are exact; colour scales are per map because D and P have
    unrelated units, and the question is *where* each is large.
    """
    img = image.permute(1, 2, 0).numpy()
    # Grey underlay: a colour photo under a colour map makes both unreadable.
    grey = img @ np.array([0.299, 0.587, 0.114], dtype=img.dtype)
    h, w = img.shape[:2]
    rows = len(strides)
    fig = Figure(figsize=(11, 3.3 * rows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, 3))
    for row, (d, p, stride) in enumerate(zip(d_maps, p_maps, strides, strict=True)):
        r = pearson_r(d, p)
        axes[row, 0].imshow(img)
        axes[row, 0].set_title(f"image, stride {stride}")
        for col, (name, m, cmap) in enumerate(
            (("D: feature difference", d, "magma"), ("P: prediction difference", p, "viridis")),
            start=1,
        ):
            ax = axes[row, col]
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
            gh, gw = m.shape
            art = ax.imshow(
                m.numpy(), cmap=cmap, alpha=0.7, extent=(0, gw * stride, gh * stride, 0),
                interpolation="nearest",
            )  # fmt: skip
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_title(
                f"{name}, stride {stride}" + (f"\nPearson r(D, P) = {_fmt(r)}" if col == 2 else "")
            )
            fig.colorbar(art, ax=ax, shrink=0.8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=90)
    return path
