"""ALM-KD's plot: how the mixing weights of clean and noisy examples evolve.

One row per weight column (label, then each teacher). Left: median and inter-quartile band
(plus the 5-95 % range, lighter) at every meta pass, clean vs noisy examples. Right: the
distribution of the current weights, clean vs noisy.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

CLEAN, NOISY = "#4C72B0", "#C44E52"


def plot_mixing_history(history: list[tuple[int, Tensor]], table: Tensor,
                        noise_mask: Tensor | None, column_names: list[str],
                        path: str | Path) -> Path:
    """``history``: (epoch, summary (K+1, groups all/clean/noisy, stats)) per meta pass,
    epoch -1 for the initial weights; stats are mean, std, q05, q25, q50, q75, q95."""
    n_cols = table.shape[1]
    noisy = (torch.zeros(len(table), dtype=torch.bool) if noise_mask is None
             else noise_mask.cpu().bool())
    labels = ["init" if e < 0 else f"e{e}" for e, _ in history]
    x = list(range(len(history)))
    fig, axes = plt.subplots(n_cols, 2, figsize=(9, 2.6 * n_cols), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    for j in range(n_cols):
        ax, ax_hist = axes[j]
        for g, name, color in ((1, "clean", CLEAN), (2, "noisy", NOISY)):
            if not history:
                break
            s = torch.stack([summary[j, g] for _, summary in history]).numpy()
            if torch.isnan(torch.as_tensor(s[:, 0])).all():
                continue
            ax.fill_between(x, s[:, 2], s[:, 6], color=color, alpha=0.12, lw=0)
            ax.fill_between(x, s[:, 3], s[:, 5], color=color, alpha=0.3, lw=0)
            ax.plot(x, s[:, 4], "-o", color=color, ms=3, label=f"{name} (median, IQR, 5-95%)")
            ax.plot(x, s[:, 0], "--", color=color, lw=1, label=f"{name} mean")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7, rotation=45 if len(x) > 12 else 0)
        ax.set_ylabel(f"{column_names[j]} weight")
        ax.set_xlabel("meta pass (epoch)")
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
    fig.suptitle("ALM-KD mixing weights: clean vs noisy training examples", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
