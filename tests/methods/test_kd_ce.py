"""KD and CE against their formulas, computed independently in float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
from loss_cases import CASES
from loss_cases import make_inputs as shared_inputs

from kdlab.methods.base import Outputs
from kdlab.methods.ce import CE
from kdlab.methods.kd import KD


def make_inputs(classes, scale, gap, batch=7, seed=0):
    return shared_inputs(classes, scale, gap, batch=batch, seed=seed, teacher_offset=1)


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max()
    return z - m - np.log(np.exp(z - m).sum())


def ref_ce(s, y):
    return np.mean([-np_log_softmax(s[i])[y[i]] for i in range(len(y))])


def ref_kd_kl(s, t, temperature):
    total = 0.0
    for i in range(len(s)):
        q = np_softmax(t[i] / temperature)
        log_q = np_log_softmax(t[i] / temperature)
        log_p = np_log_softmax(s[i] / temperature)
        total += sum(q[c] * (log_q[c] - log_p[c]) for c in range(len(q)))
    return total / len(s) * temperature**2


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_ce_matches_formula(case):
    _, classes, scale, _, gap = case
    s, _, y = make_inputs(classes, scale, gap)
    terms = CE(weight=0.7).loss_terms(Outputs(s), [], {"target": y})
    assert set(terms) == {"ce"}
    expected = 0.7 * ref_ce(s.double().numpy(), y.numpy())
    assert terms["ce"].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kd_matches_formula(case):
    _, classes, scale, temperature, gap = case
    s, t, y = make_inputs(classes, scale, gap)
    method = KD(temperature=temperature, ce_weight=0.1, kd_weight=0.9)
    terms = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    assert set(terms) == {"ce", "kd"}
    sn, tn = s.double().numpy(), t.double().numpy()
    assert terms["ce"].item() == pytest.approx(0.1 * ref_ce(sn, y.numpy()), rel=1e-5, abs=1e-6)
    assert terms["kd"].item() == pytest.approx(0.9 * ref_kd_kl(sn, tn, temperature),
                                               rel=1e-4, abs=1e-5)


def test_kd_averages_over_teachers():
    s, t1, y = make_inputs(5, 2.0, 0.0, seed=1)
    _, t2, _ = make_inputs(5, 2.0, 0.0, seed=2)
    terms = KD(kd_weight=1.0).loss_terms(Outputs(s), [Outputs(t1), Outputs(t2)], {"target": y})
    sn = s.double().numpy()
    expected = (ref_kd_kl(sn, t1.double().numpy(), 4.0)
                + ref_kd_kl(sn, t2.double().numpy(), 4.0)) / 2
    assert terms["kd"].item() == pytest.approx(expected, rel=1e-5)


def test_kd_is_zero_when_student_equals_teacher():
    s, _, y = make_inputs(10, 3.0, 0.0)
    terms = KD().loss_terms(Outputs(s), [Outputs(s.clone())], {"target": y})
    assert terms["kd"].item() == pytest.approx(0.0, abs=1e-6)
