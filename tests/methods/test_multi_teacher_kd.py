"""Multi-teacher KD against the formula with the mean of the softened teacher distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from loss_cases import CASES

from kdlab.errors import ConfigError
from kdlab.methods.base import Outputs
from kdlab.methods.kd import KD
from kdlab.methods.multi_teacher_kd import MultiTeacherKD


def logits(classes, scale, gap, y, seed, batch=6):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, classes, generator=g) * scale
    if gap:
        z[torch.arange(batch), y] += gap
    return z


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def ref_loss(s, teachers, y, temperature, ce_weight, kd_weight):
    ce = kd = 0.0
    for i in range(len(y)):
        q = np.mean([np_softmax(t[i] / temperature) for t in teachers], axis=0)
        p = np_softmax(s[i] / temperature)
        kd += sum(q[c] * np.log(q[c] / p[c]) for c in range(len(q)) if q[c] > 0)
        ce += -np.log(np_softmax(s[i])[y[i]])
    n = len(y)
    return ce_weight * ce / n, kd_weight * kd / n * temperature**2


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_loss_matches_formula_with_three_teachers(case):
    _, classes, scale, temperature, gap = case
    y = torch.randint(0, classes, (6,), generator=torch.Generator().manual_seed(9))
    s = logits(classes, scale, gap, y, seed=0)
    teachers = [logits(classes, scale, gap, (y + k) % classes, seed=k) for k in (1, 2, 3)]
    method = MultiTeacherKD(temperature=temperature, ce_weight=0.2, kd_weight=0.8)
    terms = method.loss_terms(Outputs(s), [Outputs(t) for t in teachers], {"target": y})
    assert set(terms) == {"ce", "kd"}
    ce, kd = ref_loss(s.double().numpy(), [t.double().numpy() for t in teachers], y.numpy(),
                      temperature, 0.2, 0.8)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5, abs=1e-6)
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-4, abs=1e-5)


def test_one_teacher_is_kd():
    y = torch.tensor([0, 3, 1, 2])
    s, t = logits(4, 2.0, 0.0, y, 0, batch=4), logits(4, 2.0, 0.0, y, 1, batch=4)
    a = MultiTeacherKD().loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    b = KD().loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    for k in ("ce", "kd"):
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-5)


def test_mean_of_distributions_not_of_logits():
    """Two opposite confident teachers average to an uncertain target."""
    y = torch.tensor([0])
    t1, t2 = torch.tensor([[20.0, 0.0]]), torch.tensor([[0.0, 20.0]])
    s = torch.zeros(1, 2)  # uniform student: matches the averaged target exactly
    terms = MultiTeacherKD(temperature=1.0).loss_terms(
        Outputs(s), [Outputs(t1), Outputs(t2)], {"target": y})
    assert terms["kd"].item() == pytest.approx(0.0, abs=1e-6)


def test_requires_a_teacher():
    with pytest.raises(ConfigError, match="needs a teacher"):
        MultiTeacherKD().loss_terms(Outputs(torch.zeros(2, 3)), [],
                                    {"target": torch.zeros(2).long()})
