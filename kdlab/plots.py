"""Plots written into run directories and reports (matplotlib, no display needed)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from .metrics import ece_from_bins  # noqa: E402

ACCURACY, OVER, UNDER = "#4C72B0", "#C44E52", "#55A868"


LABEL_WIDTH = 40  # characters per line of a group's label in a plot legend or axis


def wrap_label(label: str) -> str:
    """A report group's label (``k=v, k=v``) wrapped at its spaces, so a long one grows
    down, not across."""
    return textwrap.fill(label, LABEL_WIDTH, break_on_hyphens=False)


ACCURACY_SHARE = 0.55  # of a bin's width: the accuracy bar; the rest holds the gap bar
GAP_HATCH = "////"
PANEL_WIDTH = 3.1  # inches per reliability panel; its title wraps at 42 characters


def draw_reliability(ax, bins: dict, title: str = "") -> None:
    """Accuracy per confidence bin against the diagonal. Each bin holds two bars side by
    side, so neither hides the other: the accuracy bar (left, from 0 to the accuracy) and the
    gap bar (right, hatched, from min(accuracy, confidence) to max(accuracy, confidence)), red
    when over-confident, green when under-confident, with a black tick at the bin's mean
    confidence. A bar's opacity grows with the number of examples in its bin, and the count
    is written above bars: a bin with one example does not look as important as one with
    hundreds."""
    count = np.asarray(bins["count"], dtype=float)
    n_bins = len(count)
    safe = np.maximum(count, 1)
    acc = np.asarray(bins["correct"], dtype=float) / safe
    conf = np.asarray(bins["confidence"], dtype=float) / safe
    width = 1.0 / n_bins
    left = np.arange(n_bins) * width
    acc_width, gap_left = ACCURACY_SHARE * width, left + ACCURACY_SHARE * width
    gap_width = width - acc_width
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    weight = np.clip(0.2 + 0.8 * count / max(count.max(), 1), 0, 1)
    for i in np.flatnonzero(count > 0):
        ax.bar(left[i], acc[i], width=acc_width, align="edge", color=ACCURACY,
               alpha=weight[i], edgecolor="black", lw=0.5)
        low, high = sorted((acc[i], conf[i]))
        colour = OVER if conf[i] > acc[i] else UNDER
        ax.bar(gap_left[i], high - low, bottom=low, width=gap_width, align="edge",
               facecolor=to_rgba(colour, min(1.0, 0.25 + 0.35 * weight[i])),
               edgecolor=colour, hatch=GAP_HATCH, lw=0.5)
        ax.hlines(conf[i], gap_left[i], gap_left[i] + gap_width, color="black", lw=1)
        ax.text(left[i] + width / 2, high + 0.015, f"{int(count[i])}", ha="center",
                va="bottom", fontsize=5, rotation=90)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.12)
    ax.set_xlabel("confidence (max softmax)", fontsize=8)
    ax.set_ylabel("accuracy", fontsize=8)
    ax.tick_params(labelsize=7)
    heading = f"ECE ({n_bins} bins) = {ece_from_bins(bins):.4f}, n = {int(count.sum())}"
    ax.set_title("\n".join([*textwrap.wrap(title, 42), heading]) if title else heading,
                 fontsize=8)


def reliability_legend(fig, ncol: int) -> None:
    handles = [Patch(color=ACCURACY, label="accuracy (opacity and label: examples per bin)"),
               Patch(facecolor=to_rgba(OVER, 0.6), edgecolor=OVER, hatch=GAP_HATCH,
                     label="gap, over-confident: confidence > accuracy"),
               Patch(facecolor=to_rgba(UNDER, 0.6), edgecolor=UNDER, hatch=GAP_HATCH,
                     label="gap, under-confident: confidence < accuracy"),
               plt.Line2D([], [], color="black", lw=1, label="mean confidence of the bin"),
               plt.Line2D([], [], ls="--", color="grey", label="perfect calibration")]
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False)


def reliability_grid(panels: list[tuple[str, dict]], path: str | Path, suptitle: str,
                     cols: int = 4) -> Path:
    """One reliability panel per (title, bins), a shared legend below."""
    cols = min(cols, len(panels))
    rows = -(-len(panels) // cols)
    ncol = 2 if cols > 1 else 1
    legend_height = 0.2 * -(-5 // ncol) + 0.15
    height = 3.6 * rows + legend_height + 0.4
    width = max(PANEL_WIDTH * cols, 4.2)  # 4 columns: 1,364 px at the saved 110 dpi
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, bins) in zip(axes.flat, panels, strict=False):
        draw_reliability(ax, bins, title)
    fig.suptitle(textwrap.fill(suptitle, int(width * 11)), fontsize=10)  # ~11 characters/inch
    reliability_legend(fig, ncol)
    fig.tight_layout(rect=(0, legend_height / height, 1, 0.97))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reliability_diagram(bins: dict, path: str | Path, title: str) -> Path:
    """A run's reliability diagram (test set, best-on-val checkpoint)."""
    return reliability_grid([(title, bins)], path, "reliability on the test set", cols=1)
