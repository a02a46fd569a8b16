"""Metrics written out from their formulas (independent of torchmetrics and kdlab.metrics)."""

from __future__ import annotations

import numpy as np
import torch


def hand_ece(probs: np.ndarray, target: np.ndarray, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): 15 equal-width bins (lo, hi] of the max-softmax confidence,
    sum_b n_b / N |acc_b - conf_b|."""
    conf, pred = probs.max(1), probs.argmax(1)
    ece = 0.0
    for b in range(n_bins):
        sel = (conf > b / n_bins) & (conf <= (b + 1) / n_bins)
        if sel.any():
            ece += sel.mean() * abs((pred[sel] == target[sel]).mean() - conf[sel].mean())
    return float(ece)


def by_hand(logits: torch.Tensor, y: np.ndarray, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, ECE, NLL and Brier of logits against labels, from the formulas."""
    probs = torch.softmax(logits.double(), 1).numpy()
    onehot = np.eye(probs.shape[1])[y]
    return {"acc": float((probs.argmax(1) == y).mean()), "ece": hand_ece(probs, y, n_bins),
            "nll": float(-np.log(probs[np.arange(len(y)), y]).mean()),
            "brier": float(((probs - onehot) ** 2).sum(1).mean())}
