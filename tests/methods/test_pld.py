"""PLD against an explicit Python loop over the ranking (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from loss_cases import CASES
from loss_cases import make_inputs as shared_inputs

from kdlab.methods.base import Outputs
from kdlab.methods.pld import PLD, teacher_ranking


def make_inputs(classes, scale, gap, batch=6, seed=0):
    return shared_inputs(classes, scale, gap, batch=batch, seed=seed, teacher_offset=1)


def ref_pld(s, t, y, tau):
    total = 0.0
    for i in range(len(y)):
        si, ti, yi = [float(v) for v in s[i]], [float(v) for v in t[i]], int(y[i])
        others = sorted((c for c in range(len(si)) if c != yi), key=lambda c: -ti[c])
        ranking = [yi] + others
        m = max(v / tau for v in ti)
        z = sum(math.exp(v / tau - m) for v in ti)
        for k, cls in enumerate(ranking):
            a_k = math.exp(ti[cls] / tau - m) / z
            tail = [si[c] for c in ranking[k:]]
            top = max(tail)
            lse = top + math.log(sum(math.exp(v - top) for v in tail))
            total += a_k * (lse - si[cls])
    return total / len(y)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_loss_matches_loop_over_ranking(case):
    _, classes, scale, tau, gap = case
    s, t, y = make_inputs(classes, scale, gap)
    terms = PLD(temperature=tau, weight=0.5).loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    assert set(terms) == {"pld"}
    expected = 0.5 * ref_pld(s.double(), t.double(), y, tau)
    assert terms["pld"].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_ranking_puts_label_first_then_teacher_order():
    t = torch.tensor([[0.5, 3.0, -1.0, 2.0], [9.0, 1.0, 2.0, 3.0]])
    y = torch.tensor([2, 0])
    assert teacher_ranking(t, y).tolist() == [[2, 1, 3, 0], [0, 3, 2, 1]]


def test_averages_over_teachers():
    s, t1, y = make_inputs(5, 2.0, 0.0, seed=1)
    _, t2, _ = make_inputs(5, 2.0, 0.0, seed=2)
    terms = PLD().loss_terms(Outputs(s), [Outputs(t1), Outputs(t2)], {"target": y})
    expected = (ref_pld(s.double(), t1.double(), y, 4.0) + ref_pld(s.double(), t2.double(), y, 4.0))
    assert terms["pld"].item() == pytest.approx(expected / 2, rel=1e-5)


def test_student_gradient_is_finite_and_teacher_is_untouched():
    s, t, y = make_inputs(10, 3.0, 40.0)
    s.requires_grad_(True)
    t_before = t.clone()
    PLD().loss_terms(Outputs(s), [Outputs(t)], {"target": y})["pld"].backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert torch.equal(t, t_before)
