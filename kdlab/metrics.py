"""Classification metrics, all torchmetrics (synced across DDP ranks by torchmetrics).

top-1 / top-5 accuracy, ECE (Guo et al. 2017: 15 equal-width bins of the max-softmax
confidence, ECE = sum_b n_b/N |acc_b - conf_b|, L1), NLL, Brier score, student/teacher
top-1 agreement, and the per-bin sums behind a reliability diagram.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

ECE_BINS = 15


class NLL(MeanMetric):
    """Mean negative log-likelihood of the true class."""

    def update(self, logits: Tensor, target: Tensor) -> None:  # type: ignore[override]
        super().update(F.cross_entropy(logits.float(), target, reduction="none"))


class Brier(MeanMetric):
    """Mean over examples of sum_c (p_c - onehot_c)^2."""

    def update(self, logits: Tensor, target: Tensor) -> None:  # type: ignore[override]
        p = logits.float().softmax(-1)
        onehot = F.one_hot(target, p.shape[-1]).float()
        super().update(((p - onehot) ** 2).sum(-1))


class ReliabilityBins(Metric):
    """Per-bin count, summed confidence and summed correctness (for reliability diagrams)."""

    full_state_update = False

    def __init__(self, n_bins: int = ECE_BINS):
        super().__init__()
        self.n_bins = n_bins
        for name in ("count", "confidence", "correct"):
            self.add_state(name, default=torch.zeros(n_bins, dtype=torch.float64),
                           dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        conf, pred = logits.float().softmax(-1).max(-1)
        # Bins are (lo, hi]; a confidence of exactly 0 cannot occur for a softmax maximum.
        b = (torch.ceil(conf * self.n_bins).long() - 1).clamp(0, self.n_bins - 1)
        self.count += torch.bincount(b, minlength=self.n_bins).double()
        self.confidence += torch.bincount(b, weights=conf.double(), minlength=self.n_bins)
        self.correct += torch.bincount(b, weights=(pred == target).double(),
                                       minlength=self.n_bins)

    def compute(self) -> dict[str, Tensor]:
        return {"count": self.count, "confidence": self.confidence, "correct": self.correct}


def ece_from_bins(bins: dict) -> float:
    """ECE from per-bin sums (tensors or lists): sum_b |correct_b - confidence_b| / N."""
    count, correct, confidence = (torch.as_tensor(bins[k], dtype=torch.float64)
                                  for k in ("count", "correct", "confidence"))
    return float((correct - confidence).abs().sum() / count.sum().clamp_min(1))


# What results.json and eval.json report of each evaluated model.
RESULT_METRICS = ("acc", "acc_top5", "ece", "nll", "brier")


def logged_metrics(logged: dict[str, float], prefix: str) -> dict[str, float]:
    """The reported metrics out of Lightning's logged values, ``prefix`` removed."""
    return {k: float(logged[prefix + k]) for k in RESULT_METRICS if prefix + k in logged}


def classification_metrics(num_classes: int) -> MetricCollection:
    metrics = {
        "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
        "ece": MulticlassCalibrationError(num_classes, n_bins=ECE_BINS, norm="l1"),
        "nll": NLL(),
        "brier": Brier(),
    }
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


class Agreement(MeanMetric):
    """Fraction of examples where student and teacher predict the same top-1 class."""

    def update(self, student_logits: Tensor, teacher_logits: Tensor) -> None:  # type: ignore[override]
        super().update((student_logits.argmax(-1) == teacher_logits.argmax(-1)).float())
