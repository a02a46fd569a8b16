"""Sinkhorn KD: the transport plan against plain-division Sinkhorn in float64 numpy (the
released code's form), the whole loss against numpy, the gradient through plan and cost
against finite differences (gradcheck), and the edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from loss_cases import CASES, make_inputs

from kdlab.errors import ConfigError
from kdlab.methods.base import Outputs
from kdlab.methods.sinkhorn_kd import SinkhornKD, sinkhorn_loss, sinkhorn_plan


def np_softmax(z, temperature):
    z = np.asarray(z, dtype=np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def log_sum_exp(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def ref_plan(cost, epsilon, iterations):
    """Rows then columns of exp(-cost / eps) normalised, ``iterations`` times (float64, in
    the log domain so that a tiny epsilon does not underflow)."""
    log_k = -cost / epsilon
    for _ in range(iterations):
        log_k = log_k - log_sum_exp(log_k, axis=1)
        log_k = log_k - log_sum_exp(log_k, axis=0)
    return np.exp(log_k)


def ref_sinkhorn(s, t, temperature, epsilon, iterations):
    ps = np.array([np_softmax(r, temperature) for r in s])
    pt = np.array([np_softmax(r, temperature) for r in t])
    cost = np.array([[np.abs(ps[i] - pt[j]).sum() for j in range(len(pt))]
                     for i in range(len(ps))])
    return (ref_plan(cost, epsilon, iterations) * cost).sum()


def ref_loss(s, t, y, temperature, w_ce, w_kd, w_sink, epsilon, iterations):
    ce = kd = 0.0
    for i in range(len(s)):
        p1 = np_softmax(s[i], 1.0)
        ce += -np.log(p1[y[i]])
        ps, pt = np_softmax(s[i], temperature), np_softmax(t[i], temperature)
        kd += sum(pt[c] * (np.log(pt[c]) - np.log(ps[c])) for c in range(len(ps)))
    n = len(s)
    return (w_ce * ce / n, w_kd * kd / n,
            w_sink * ref_sinkhorn(s, t, temperature, epsilon, iterations))


def test_plan_matches_plain_sinkhorn():
    rng = np.random.default_rng(0)
    cost = rng.uniform(0, 2, size=(6, 6))
    got = sinkhorn_plan(torch.tensor(cost), 0.1, 20).numpy()
    np.testing.assert_allclose(got, ref_plan(cost, 0.1, 20), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.sum(axis=0), np.ones(6), rtol=1e-12)  # columns last


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_loss_matches_formula(case):
    _, classes, scale, temperature, gap = case
    s, t, y = make_inputs(classes, scale, gap, teacher_offset=1)
    method = SinkhornKD(temperature=temperature, ce_weight=0.3, kd_weight=0.7,
                        sinkhorn_weight=0.01, epsilon=0.1, iterations=20)
    terms = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    assert set(terms) == {"ce", "kd", "sinkhorn"}
    ce, kd, sink = ref_loss(s.double().numpy(), t.double().numpy(), y.numpy(), temperature,
                            0.3, 0.7, 0.01, 0.1, 20)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-4, abs=1e-7)
    assert terms["sinkhorn"].item() == pytest.approx(sink, rel=1e-4, abs=1e-8)


def test_gradient_through_plan_and_cost_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: sinkhorn_loss(z, t, 2.0, 0.1, 20), (s,))


def test_gradient_reaches_the_student_never_the_teacher():
    s, t, y = make_inputs(10, 3.0, 0.0)
    s.requires_grad_(True)
    t.requires_grad_(True)
    terms = SinkhornKD().loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    terms["sinkhorn"].backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_identical_distributions_cost_little():
    s, _, y = make_inputs(10, 3.0, 0.0)
    same = sinkhorn_loss(s, s.clone(), 2.0, 0.1, 20).item()
    other = sinkhorn_loss(s, torch.flip(s, dims=[1]), 2.0, 0.1, 20).item()
    assert same < other


@pytest.mark.parametrize("edge", ["bf16", "one class", "confident teacher", "batch of one",
                                  "tiny epsilon"])
def test_edge_cases(edge):
    s, t, y = make_inputs(10, 3.0, 40.0 if edge == "confident teacher" else 0.0,
                          student_gap=False, teacher_offset=1)
    epsilon = 1e-4 if edge == "tiny epsilon" else 0.1  # exp(-W / eps) underflows in float32
    if edge == "one class":
        y = torch.full_like(y, 4)
    if edge == "batch of one":
        s, t, y = s[:1], t[:1], y[:1]
    if edge == "bf16":
        s, t = s.bfloat16(), t.bfloat16()
    terms = SinkhornKD(epsilon=epsilon).loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    _, _, sink = ref_loss(s.double().numpy(), t.double().numpy(), y.numpy(), 2.0, 0.2, 0.8,
                          0.001, epsilon, 20)
    assert terms["sinkhorn"].item() == pytest.approx(sink, rel=1e-3, abs=1e-8)


def test_options_are_checked():
    for bad in ({"epsilon": 0}, {"temperature": -1}, {"iterations": 0}):
        with pytest.raises(ConfigError):
            SinkhornKD(**bad)
