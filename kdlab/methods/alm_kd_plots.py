"""ALM-KD's plot: how the mixing weights of clean and noisy examples evolve.

One row per weight column (label, then each teacher). Left: median and inter-quartile band
(plus the 5-95 % range, lighter) at every meta pass, clean vs noisy examples. Right: the
distribution of the current weights, clean vs noisy. Under each pass: the noise AUROC of the
label weight (noisy labels flagged by a low weight; 0.5 = no separation).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from .alm_kd_report import PassRecord  # noqa: E402

CLEAN, NOISY = "#4C72B0", "#C44E52"


def plot_mixing_history(history: list[PassRecord], table: Tensor,
                        noise_mask: Tensor | None, column_names: list[str],
                        path: str | Path) -> Path:
    """``history``: one :class:`PassRecord` per meta pass (epoch -1: the initial weights),
    its summary (K+1, groups all/clean/noisy, stats mean, std, q05, q25, q50, q75, q95) and
    the label weight's noise AUROC, shown under each pass."""
    n_cols = table.shape[1]
    noisy = (torch.zeros(len(table), dtype=torch.bool) if noise_mask is None
             else noise_mask.cpu().bool())
    labels = [("init" if r.epoch < 0 else f"e{r.shown_epoch}")
              + ("" if math.isnan(r.noise_auroc) else f"\nAUC {r.noise_auroc:.2f}")
              for r in history]
    x = list(range(len(history)))
    fig, axes = plt.subplots(n_cols, 2, figsize=(9, 2.6 * n_cols), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    for j in range(n_cols):
        ax, ax_hist = axes[j]
        for g, name, color in ((1, "clean", CLEAN), (2, "noisy", NOISY)):
            if not history:
                break
            s = torch.stack([r.summary[j, g] for r in history]).numpy()
            if torch.isnan(torch.as_tensor(s[:, 0])).all():
                continue
            ax.fill_between(x, s[:, 2], s[:, 6], color=color, alpha=0.12, lw=0)
            ax.fill_between(x, s[:, 3], s[:, 5], color=color, alpha=0.3, lw=0)
            ax.plot(x, s[:, 4], "-o", color=color, ms=3, label=f"{name} (median, IQR, 5-95%)")
            ax.plot(x, s[:, 0], "--", color=color, lw=1, label=f"{name} mean")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7, rotation=45 if len(x) > 12 else 0)
        ax.set_ylabel(f"{column_names[j]} weight")
        ax.set_xlabel("meta pass (before epoch)")
        if j == 0:
            ax.legend(fontsize=7, loc="upper left", framealpha=0.8)
        col = table[:, j].double()
        lo, hi = float(col.min()), float(col.max())
        bins = torch.linspace(lo, hi if hi > lo else lo + 1e-6, 41).numpy()
        for part, name, color in ((col[~noisy], "clean", CLEAN), (col[noisy], "noisy", NOISY)):
            if len(part):
                ax_hist.hist(part.numpy(), bins=bins, density=True, alpha=0.55, color=color,
                             label=f"{name} (n={len(part)})")
        ax_hist.set_xlabel(f"{column_names[j]} weight, current")
        ax_hist.set_ylabel("density")
        ax_hist.legend(fontsize=7)
    title = "ALM-KD mixing weights: clean vs noisy training examples"
    scales = history[-1].rebalance if history else None
    if scales is not None:
        now = ", ".join(f"{name} {float(c):.2f}" for name, c in zip(column_names, scales,
                                                                       strict=True))
        title += f"\n(rows shown; loss weight = column scale x row; scales now: {now})"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
