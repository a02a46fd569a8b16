"""MLKD against its formula written out in float64 numpy, the masks, both masking modes,
edge cases, and the strong view it asks for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.context import FakeContext
from torch import nn

from kdlab.methods.base import Outputs
from kdlab.methods.mlkd import MLKD, confidence_masks

TEMPS = (2.0, 3.0, 4.0, 5.0, 6.0)


def softmax(z, t=1.0):
    z = np.asarray(z, dtype=np.float64) / t
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference(s_weak, s_strong, t_weak, t_strong, y, masking="per_example"):
    s_weak, s_strong, t_weak, t_strong = (np.asarray(a, dtype=np.float64)
                                          for a in (s_weak, s_strong, t_weak, t_strong))
    b, c = s_weak.shape
    ce = sum(-np.log(softmax(s)[np.arange(b), y]).mean() for s in (s_weak, s_strong))
    conf = softmax(t_weak).max(1)
    m = (conf <= np.sort(conf)[(b - 1) // 2]).astype(float)  # at or below the lower median
    per_class = softmax(t_weak).sum(0)
    k = (per_class <= np.sort(per_class)[(c - 1) // 2]).astype(float)
    kd = bc = cc = 0.0
    for t in TEMPS:
        ps, pt = softmax(s_weak, t), softmax(t_weak, t)
        kl_weak = t * t * (pt * (np.log(pt) - np.log(ps))).sum(1)
        ps2, pt2 = softmax(s_strong, t), softmax(t_strong, t)
        kl_strong = t * t * (pt2 * (np.log(pt2) - np.log(ps2))).sum(1)
        gb = (pt @ pt.T - ps @ ps.T) ** 2
        gc = (pt.T @ pt - ps.T @ ps) ** 2
        if masking == "released":
            kd += kl_weak.mean() * m.mean() + kl_strong.mean()
            bc += gb.sum() / b * m.mean()
            cc += gc.sum() / c * k.mean()
        else:
            kd += (kl_weak * m).mean() + kl_strong.mean()
            bc += (gb * np.outer(m, m)).sum() / b
            cc += (gc * np.outer(k, k)).sum() / c
    return {"ce": 0.1 * ce, "kd": 0.9 * kd, "bc": 0.9 * bc, "cc": 0.9 * cc}


class Fixed(nn.Module):
    """A 'student' whose output on the strong view is given."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


def run_method(s_weak, s_strong, t_weak, t_strong, y, masking="per_example"):
    teacher = Fixed(t_strong)
    method = MLKD(masking=masking)
    method.on_fit_start(FakeContext(Fixed(s_strong), (teacher,), num_classes=s_weak.shape[1]))
    batch = {"input": torch.zeros(len(y), 1), "input_strong": torch.zeros(len(y), 1),
             "target": y, "index": torch.arange(len(y))}
    return method.loss_terms(Outputs(s_weak), [Outputs(t_weak)], batch)


@pytest.mark.parametrize("masking", ["per_example", "released"])
@pytest.mark.parametrize("b,c", [(8, 5), (7, 10)])
def test_loss_matches_the_formula(masking, b, c):
    g = torch.Generator().manual_seed(b * c)
    s_weak, s_strong, t_weak, t_strong = (torch.randn(b, c, generator=g) * 3 for _ in range(4))
    y = torch.randint(0, c, (b,), generator=g)
    terms = run_method(s_weak, s_strong, t_weak, t_strong, y, masking)
    expected = reference(s_weak, s_strong, t_weak, t_strong, y.numpy(), masking)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5), name


def test_masks_keep_the_less_confident_half():
    t = torch.tensor([[5.0, 0, 0], [1.0, 0, 0], [3.0, 0, 0], [0.2, 0, 0]])
    examples, classes = confidence_masks(t)
    assert examples.tolist() == [False, True, False, True]
    assert classes.tolist() == [False, True, True]


def test_edge_cases_one_class_confident_teacher_and_bf16():
    b, c = 6, 4
    y = torch.zeros(b, dtype=torch.long)  # one class in the batch
    confident = torch.zeros(b, c)
    confident[:, 0] = 60.0  # a teacher sure of class 0
    s = torch.randn(b, c, generator=torch.Generator().manual_seed(3))
    terms = run_method(s.bfloat16(), s.bfloat16(), confident, confident, y)
    expected = reference(s.bfloat16().float(), s.bfloat16().float(), confident, confident,
                         y.numpy())
    for name, value in expected.items():
        assert terms[name].dtype == torch.float32
        assert terms[name].item() == pytest.approx(value, rel=1e-4), name
    same = run_method(confident, confident, confident, confident, y)
    for name in ("kd", "bc", "cc"):
        assert same[name].item() == pytest.approx(0.0, abs=1e-6)  # nothing left to match
