"""ALM-KD's plots: how the mixing weights of clean and noisy examples evolve in a run
(:func:`plot_mixing_history`), and the label weights of clean and noisy examples over the
groups of a report (:data:`LABEL_WEIGHTS`, a :class:`~kdlab.methods.base.ReportPlot`).

The run's plot:

One row per weight column (label, then each teacher). Left: at every meta pass, clean and
noisy examples side by side (never drawn over each other), each as its 5-95 % range (thin
line), inter-quartile box and median (black tick), with the mean joined across passes.
Dotted lines mark the bounds the weights are kept in, and a triangle on a bound says that
a quartile sits on it (a quarter or more of the group piled up there): weights piled up at
both bounds show as boxes reaching the bounds with those triangles, not as a band filled in
between. Right: the current weights as the fraction of each group per bin (outlines, so
neither group hides the other), and the fraction of each group at each bound in the
title. Under each pass: the noise AUROC of the label weight (noisy labels flagged by a low
weight; 0.5 = no separation). The legend sits below the panels, outside every data area.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from torch import Tensor  # noqa: E402

from ..plots import wrap_label  # noqa: E402
from .alm_kd_report import PassRecord  # noqa: E402
from .base import GroupStats, ReportPlot  # noqa: E402

CLEAN, NOISY = "#4C72B0", "#C44E52"
GROUPS = ((1, "clean", CLEAN, -0.2), (2, "noisy", NOISY, 0.2))  # summary group, x offset
BOX_WIDTH = 0.3  # of the distance between two passes


def at_bound(weights: Tensor, bound: float) -> Tensor:
    """Which weights sit at ``bound`` (equal up to the float32 rounding of the table)."""
    return torch.isclose(weights.double(), torch.tensor(float(bound), dtype=torch.float64),
                         rtol=1e-6, atol=0.0)


def _share(part: Tensor, bound: float) -> str:
    return f"{float(at_bound(part, bound).double().mean()):.0%}" if len(part) else "-"


def plot_mixing_history(history: list[PassRecord], table: Tensor,
                        noise_mask: Tensor | None, column_names: list[str],
                        path: str | Path, bounds: tuple[float, float] | None = None) -> Path:
    """``history``: one :class:`PassRecord` per meta pass (epoch -1: the initial weights),
    its summary (K+1, groups all/clean/noisy, stats mean, std, q05, q25, q50, q75, q95) and
    the label weight's noise AUROC, shown under each pass. ``bounds``: the (lower, upper)
    bounds the weights are kept in (clamp or simplex), drawn and counted at."""
    n_cols = table.shape[1]
    noisy = (torch.zeros(len(table), dtype=torch.bool) if noise_mask is None
             else noise_mask.cpu().bool())
    labels = [("init" if r.epoch < 0 else f"e{r.shown_epoch}")
              + ("" if math.isnan(r.noise_auroc) else f"\nAUC {r.noise_auroc:.2f}")
              for r in history]
    x = torch.arange(len(history), dtype=torch.float64)
    fig, axes = plt.subplots(n_cols, 2, figsize=(10, 2.9 * n_cols + 1.2), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]}, layout="constrained")
    for j in range(n_cols):
        ax, ax_hist = axes[j]
        col = table[:, j].double()
        for g, name, color, offset in GROUPS:
            if not history:
                break
            s = torch.stack([r.summary[j, g] for r in history]).double()
            if torch.isnan(s[:, 0]).all():
                continue
            at = x + offset
            ax.vlines(at, s[:, 2], s[:, 6], color=color, lw=1, gid=f"{name} q05-q95")
            ax.bar(at, s[:, 5] - s[:, 3], bottom=s[:, 3], width=BOX_WIDTH, color=color,
                   alpha=0.45, edgecolor=color, lw=0.8, gid=f"{name} q25-q75")
            ax.hlines(s[:, 4], at - BOX_WIDTH / 2, at + BOX_WIDTH / 2, color="black", lw=1.5,
                      gid=f"{name} median")
            ax.plot(at, s[:, 0], "--", color=color, lw=1, marker="o", ms=2.5,
                    gid=f"{name} mean")
            if bounds is not None:  # a quartile at a bound: a quarter or more piled up there
                for q, bound, marker in ((3, bounds[0], "v"), (5, bounds[1], "^")):
                    piled = at_bound(s[:, q], bound)
                    ax.plot(at[piled], [bound] * int(piled.sum()), ls="none", marker=marker,
                            color=color, ms=6, mec="black", mew=0.5,
                            gid=f"{name} quarter at {bound:g}")
        if bounds is not None:
            for bound in bounds:
                ax.axhline(bound, color="grey", ls=":", lw=1, gid="bound")
            ax.set_ylim(bounds[0] - 0.08 * (bounds[1] - bounds[0]),
                        bounds[1] + 0.08 * (bounds[1] - bounds[0]))
        ax.set_xticks(x.tolist())
        ax.set_xticklabels(labels, fontsize=7, rotation=45 if len(x) > 12 else 0)
        ax.set_xlim(-0.6, max(len(history), 1) - 0.4)
        ax.set_ylabel(f"{column_names[j]} weight")
        ax.set_xlabel("meta pass (before epoch)")
        lo, hi = bounds if bounds is not None else (float(col.min()), float(col.max()))
        edges = torch.linspace(lo, hi if hi > lo else lo + 1e-6, 41).numpy()
        shares = []
        for part, name, color in ((col[~noisy], "clean", CLEAN), (col[noisy], "noisy", NOISY)):
            if len(part):
                ax_hist.hist(part.numpy(), bins=edges, histtype="step", lw=1.5, color=color,
                             weights=torch.full((len(part),), 1.0 / len(part)).numpy(),
                             gid=name)
            shares.append((name, part))
        ax_hist.set_xlabel(f"{column_names[j]} weight, current")
        ax_hist.set_ylabel("fraction of the group")
        if bounds is not None:
            ax_hist.set_title("\n".join(f"at {bound:g}: " + ", ".join(
                f"{name} {_share(part, bound)}" for name, part in shares if len(part))
                for bound in bounds), fontsize=8)
    title = "ALM-KD mixing weights: clean vs noisy training examples"
    scales = history[-1].rebalance if history else None
    if scales is not None:
        now = ", ".join(f"{name} {float(c):.2f}" for name, c in zip(column_names, scales,
                                                                       strict=True))
        title += f"\n(rows shown; loss weight = column scale x row; scales now: {now})"
    fig.suptitle(title, fontsize=10)
    handles = [Patch(color=c, alpha=0.45, label=f"{name}: inter-quartile box")
               for _, name, c, _ in GROUPS]
    handles += [Line2D([], [], color="grey", lw=1, label="5-95 % range"),
                Line2D([], [], color="black", lw=1.5, label="median"),
                Line2D([], [], color="grey", ls="--", marker="o", ms=2.5, lw=1, label="mean")]
    if bounds is not None:
        handles += [Line2D([], [], color="grey", ls=":", lw=1, label="bounds"),
                    Line2D([], [], ls="none", marker="v", color="grey", mec="black", mew=0.5,
                           label="a quarter or more of the group at the bound")]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=7,
               frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_label_weights(groups: list[GroupStats], path: Path) -> Path:
    """One row of bars per report group (its wrapped label beside it: long labels grow
    down): the mean weight on the given label of clean and of noisy examples, with the std
    over seeds as error bars (a missing value drawn as 0)."""
    clean, noisy = LABEL_WEIGHTS.columns
    labels = [wrap_label(g.label) for g in groups]
    heights = [max(0.55, 0.13 * (label.count("\n") + 1) + 0.2) for label in labels]
    fig, ax = plt.subplots(figsize=(9.0, sum(heights) + 1.3), layout="constrained")
    y = [sum(heights[:i]) + h / 2 for i, h in enumerate(heights)]
    for offset, col, name, color in ((-0.12, clean, "clean examples", "#55A868"),
                                     (0.12, noisy, "noisy examples", "#C44E52")):
        ax.barh([v + offset for v in y], [_or_zero(g.mean[col]) for g in groups],
                height=0.24, xerr=[_or_zero(g.std[col]) for g in groups], capsize=3,
                color=color, label=name)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(sum(heights), 0)  # the first group on top, as in the table
    ax.set_xlabel("mean weight on the given label")
    ax.set_title("ALM-KD mixing: label weight, clean vs noisy (mean ± std over seeds)",
                 fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _or_zero(value: float) -> float:
    return 0.0 if math.isnan(value) else value


# results.json "mixing" of ALM-KD and TGeo-KD alike: the mean label weight by noise group.
LABEL_WEIGHTS = ReportPlot(
    name="report_mixing", columns=("mixing.label_weight_clean", "mixing.label_weight_noisy"),
    draw=plot_label_weights,
    caption="ALM-KD: mean weight on the given label for clean and noisy examples.")
