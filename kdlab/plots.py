"""Plots written into run directories (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .metrics import ece_from_bins  # noqa: E402


def reliability_diagram(bins: dict[str, torch.Tensor], path: str | Path, title: str) -> Path:
    """Accuracy per confidence bin against the diagonal, with the bins' share of examples."""
    count = bins["count"].double()
    n_bins = len(count)
    safe = count.clamp_min(1)
    acc, conf = (bins["correct"] / safe).numpy(), (bins["confidence"] / safe).numpy()
    centers = (torch.arange(n_bins).double() + 0.5) / n_bins
    width = 1.0 / n_bins
    has = (count > 0).numpy()
    fig, (ax, ax_hist) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    ax.bar(centers[has], acc[has], width=width, edgecolor="black", color="#4C72B0",
           label="accuracy")
    ax.bar(centers[has], (conf - acc)[has], bottom=acc[has], width=width, color="#DD8452",
           alpha=0.6, edgecolor="#DD8452", label="gap to confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}\nECE ({n_bins} bins) = {ece_from_bins(bins):.4f}", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    ax_hist.bar(centers, (count / count.sum().clamp_min(1)).numpy(), width=width,
                color="grey", edgecolor="black")
    ax_hist.set_xlabel("confidence (max softmax)")
    ax_hist.set_ylabel("share")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
