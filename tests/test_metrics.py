"""Metrics against independent computations of their formulas."""

import math

import numpy as np
import torch
from helpers.metrics import hand_ece

from kdlab.metrics import (
    Agreement,
    ReliabilityBins,
    classification_metrics,
    ece_from_bins,
)


def _data(n=500, c=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 2.5
    target = torch.randint(0, c, (n,), generator=g)
    # make a good share correct so accuracy is non-trivial
    target[: n // 2] = logits[: n // 2].argmax(1)
    return logits, target


def test_collection_matches_formulas():
    logits, target = _data()
    m = classification_metrics(12)
    # update in two chunks: the metric must accumulate
    m.update(logits[:200], target[:200])
    m.update(logits[200:], target[200:])
    out = {k: float(v) for k, v in m.compute().items()}
    probs = torch.softmax(logits.double(), 1).numpy()
    y = target.numpy()
    assert math.isclose(out["acc"], float(np.mean(probs.argmax(1) == y)), abs_tol=1e-7)
    top5 = np.argsort(-probs, 1)[:, :5]
    assert math.isclose(out["acc_top5"], float(np.mean([y[i] in top5[i] for i in range(len(y))])),
                        abs_tol=1e-7)
    assert math.isclose(out["ece"], hand_ece(probs, y), abs_tol=1e-5)
    nll = -np.mean(np.log(probs[np.arange(len(y)), y]))
    assert math.isclose(out["nll"], nll, rel_tol=1e-5)
    onehot = np.eye(12)[y]
    assert math.isclose(out["brier"], float(np.mean(((probs - onehot) ** 2).sum(1))), rel_tol=1e-5)


def test_top5_only_with_more_than_five_classes():
    assert "acc_top5" not in classification_metrics(5)
    assert "acc_top5" in classification_metrics(6)


def test_reliability_bins_match_hand_ece_and_counts():
    logits, target = _data(seed=3)
    bins = ReliabilityBins(15)
    bins.update(logits, target)
    out = bins.compute()
    probs = torch.softmax(logits.double(), 1).numpy()
    assert out["count"].sum() == len(target)
    assert math.isclose(ece_from_bins(out), hand_ece(probs, target.numpy()), abs_tol=1e-6)
    conf = probs.max(1)
    assert out["count"][14] == int(np.sum(conf > 14 / 15))


def test_agreement():
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    t = torch.tensor([[1.0, 0.0], [2.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    a = Agreement()
    a.update(s, t)
    assert float(a.compute()) == 0.75
