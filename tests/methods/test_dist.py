"""DIST: inter- and intra-class Pearson correlations of the softened predictions against
plain float64 loops, the degenerate cases the 1e-8 covers, bf16 logits, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from loss_cases import CASES, make_inputs

from kdlab.methods.base import Outputs
from kdlab.methods.dist import DIST


def softmax_rows(z, temperature):
    out = []
    for row in np.asarray(z, dtype=np.float64):
        e = [math.exp(v / temperature - max(row) / temperature) for v in row]
        out.append([v / sum(e) for v in e])
    return out


def pearson(a, b):
    """Correlation with the authors' 1e-8 in the denominator, by loops."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    da, db = [x - ma for x in a], [x - mb for x in b]
    cov = sum(x * y for x, y in zip(da, db, strict=True))
    na, nb = math.sqrt(sum(x * x for x in da)), math.sqrt(sum(y * y for y in db))
    return cov / (na * nb + 1e-8)


def ref_dist(s, t, temperature):
    """(inter, intra) relation losses, without the weights and T^2."""
    ps, pt = softmax_rows(s, temperature), softmax_rows(t, temperature)
    rows, cols = len(ps), len(ps[0])
    inter = 1 - sum(pearson(ps[i], pt[i]) for i in range(rows)) / rows
    intra = 1 - sum(pearson([ps[i][c] for i in range(rows)], [pt[i][c] for i in range(rows)])
                    for c in range(cols)) / cols
    return inter, intra


def ref_ce(s, y):
    total = 0.0
    for row, label in zip(np.asarray(s, dtype=np.float64), y, strict=True):
        m = max(row)
        total += m + math.log(sum(math.exp(v - m) for v in row)) - row[label]
    return total / len(y)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_terms_match_the_formula(case):
    _, classes, scale, temperature, gap = case
    s, t, y = make_inputs(classes, scale, gap, teacher_offset=1)
    method = DIST(temperature=temperature, beta=2.0, gamma=1.5, ce_weight=0.7)
    terms = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    assert set(terms) == {"ce", "dist_inter", "dist_intra"}
    inter, intra = ref_dist(s.numpy(), t.numpy(), temperature)
    t2 = temperature**2
    assert terms["dist_inter"].item() == pytest.approx(2.0 * t2 * inter, rel=1e-4, abs=1e-5)
    assert terms["dist_intra"].item() == pytest.approx(1.5 * t2 * intra, rel=1e-4, abs=1e-5)
    assert terms["ce"].item() == pytest.approx(0.7 * ref_ce(s.numpy(), y.tolist()), rel=1e-5)


def test_one_class_in_the_batch_and_a_single_example():
    """Labels only enter the CE; one example has no spread across the batch, so every class
    correlation is 0 (intra = 1), as the 1e-8 of the authors' denominator gives."""
    s, t, _ = make_inputs(10, 3.0, 0.0, batch=6)
    y = torch.full((6,), 3)
    terms = DIST().loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    inter, intra = ref_dist(s.numpy(), t.numpy(), 4.0)
    assert terms["dist_inter"].item() == pytest.approx(32 * inter, rel=1e-4)
    assert terms["dist_intra"].item() == pytest.approx(32 * intra, rel=1e-4)
    one = DIST().loss_terms(Outputs(s[:1]), [Outputs(t[:1])], {"target": y[:1]})
    assert one["dist_intra"].item() == pytest.approx(32.0, abs=1e-6)
    inter_one, _ = ref_dist(s[:1].numpy(), t[:1].numpy(), 4.0)
    assert one["dist_inter"].item() == pytest.approx(32 * inter_one, rel=1e-4)


def test_perfectly_correlated_predictions_cost_nothing_but_the_epsilon():
    s, _, y = make_inputs(10, 3.0, 0.0)
    terms = DIST().loss_terms(Outputs(s), [Outputs(s.clone())], {"target": y})
    inter, intra = ref_dist(s.numpy(), s.numpy(), 4.0)  # 1 - |a|^2 / (|a|^2 + 1e-8) each
    assert intra > 1e-7  # the epsilon matters for columns of small probabilities
    assert terms["dist_inter"].item() == pytest.approx(32 * inter, abs=2e-6)
    assert terms["dist_intra"].item() == pytest.approx(32 * intra, rel=0.05, abs=2e-6)


def test_very_confident_teacher():
    """The teacher puts ~all mass on one class (logit gap 60): still the formula, finite."""
    s, t, y = make_inputs(10, 1.0, 60.0, teacher_offset=1)
    terms = DIST(temperature=1.0).loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    inter, intra = ref_dist(s.numpy(), t.numpy(), 1.0)
    assert terms["dist_inter"].item() == pytest.approx(2 * inter, rel=1e-4, abs=1e-6)
    assert terms["dist_intra"].item() == pytest.approx(2 * intra, rel=1e-4, abs=1e-6)


def test_bf16_logits_are_cast_to_float32():
    s, t, y = make_inputs(10, 3.0, 0.0)
    s16, t16 = s.bfloat16(), t.bfloat16()
    terms = DIST().loss_terms(Outputs(s16), [Outputs(t16)], {"target": y})
    inter, intra = ref_dist(s16.float().numpy(), t16.float().numpy(), 4.0)
    assert all(v.dtype == torch.float32 for v in terms.values())
    assert terms["dist_inter"].item() == pytest.approx(32 * inter, rel=1e-4)
    assert terms["dist_intra"].item() == pytest.approx(32 * intra, rel=1e-4)


def test_gradient_reaches_the_student_logits_only():
    s, t, y = make_inputs(10, 3.0, 0.0)
    s.requires_grad_(True)
    t.requires_grad_(True)  # teacher outputs arrive without history; even so, check
    terms = DIST().loss_terms(Outputs(s), [Outputs(t.detach())], {"target": y})
    sum(terms.values()).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_several_teachers_are_averaged():
    s, t1, y = make_inputs(6, 2.0, 0.0, seed=1)
    _, t2, _ = make_inputs(6, 2.0, 0.0, seed=2)
    terms = DIST(beta=1.0, gamma=1.0).loss_terms(Outputs(s), [Outputs(t1), Outputs(t2)],
                                                 {"target": y})
    (i1, a1), (i2, a2) = ref_dist(s.numpy(), t1.numpy(), 4.0), ref_dist(s.numpy(), t2.numpy(), 4.0)
    assert terms["dist_inter"].item() == pytest.approx(16 * (i1 + i2) / 2, rel=1e-4)
    assert terms["dist_intra"].item() == pytest.approx(16 * (a1 + a2) / 2, rel=1e-4)
