"""TAID: the loss and its stop-gradient from the formula, the schedule of t against a plain
re-statement of the update rule, the schedule as module state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.context import FakeContext
from loss_cases import make_inputs as shared_inputs

from kdlab.errors import ConfigError
from kdlab.methods.base import Outputs
from kdlab.methods.taid import TAID

CASES = [
    ("random", 10, 3.0, 0.0),
    ("dominant class", 10, 1.0, 40.0),
    ("two classes", 2, 3.0, 0.0),
]


def make_inputs(classes, scale, gap, batch=6, seed=0):
    return shared_inputs(classes, scale, gap, batch=batch, seed=seed, student_gap=False)


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def ref_ce_and_kl(s, t, tt):
    ce = kl = 0.0
    for i in range(len(s)):
        p = np_softmax((1 - tt) * s[i] + tt * t[i])
        q = np_softmax(s[i])
        ce += -np.sum(p * np.log(q))
        kl += np.sum([pc * np.log(pc / qc) for pc, qc in zip(p, q, strict=True) if pc > 0])
    return ce / len(s), kl / len(s)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("t_value", [0.4, 0.75, 1.0])
def test_loss_is_ce_to_interpolated_target(case, t_value):
    _, classes, scale, gap = case
    s, t, y = make_inputs(classes, scale, gap)
    method = TAID()
    method.t.fill_(t_value)
    terms = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    assert set(terms) == {"taid"}
    ce, kl = ref_ce_and_kl(s.double().numpy(), t.double().numpy(), t_value)
    assert terms["taid"].item() == pytest.approx(ce, rel=1e-5, abs=1e-5)
    assert method._objective.item() == pytest.approx(kl, rel=1e-4, abs=1e-5)


def test_student_is_a_stopgrad_inside_the_target():
    """d L / d s = (softmax(s) - p_t) / B: no gradient through p_t."""
    s, t, y = make_inputs(10, 3.0, 0.0)
    s.requires_grad_(True)
    method = TAID()
    method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})["taid"].backward()
    sn, tn = s.detach().double().numpy(), t.double().numpy()
    expected = np.stack([np_softmax(sn[i]) - np_softmax(0.6 * sn[i] + 0.4 * tn[i])
                         for i in range(len(sn))]) / len(sn)
    np.testing.assert_allclose(s.grad.double().numpy(), expected, rtol=1e-4, atol=1e-6)


def ref_schedule(objectives, total, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99):
    """The rule of the paper, restated in plain floats."""
    t, m, prev, ts = t_start, 0.0, None, []
    for n, j in enumerate(objectives, start=1):
        if prev is not None:
            m = beta * m + (1 - beta) * (prev - j) / prev
            floor = t_start + (t_end - t_start) * min(n / total, 1.0)
            t = min(t_end, max(floor, t + alpha * (1 / (1 + math.exp(-m))) * (1 - t)))
        prev = j
        ts.append(t)
    return ts, m


@pytest.mark.parametrize("alpha", [5e-4, 0.05])
def test_schedule_follows_the_update_rule(alpha):
    rng = np.random.default_rng(0)
    objectives = list(np.exp(-np.linspace(0, 3, 60)) * (1 + 0.2 * rng.standard_normal(60)) + 0.1)
    total = 50  # more steps than planned: t must stop at t_end
    method = TAID(alpha=alpha, total_steps=total)
    ts = []
    for n, j in enumerate(objectives, start=1):
        method._objective = torch.tensor(j, dtype=torch.float32)
        method.on_train_batch_end(FakeContext(torch.nn.Identity(), global_step=n), {})
        ts.append(float(method.t))
    expected, m = ref_schedule([float(np.float32(j)) for j in objectives], total, alpha=alpha)
    np.testing.assert_allclose(ts, expected, rtol=1e-5, atol=1e-6)
    assert float(method.momentum) == pytest.approx(m, rel=1e-4, abs=1e-7)
    assert all(b >= a for a, b in zip(ts, ts[1:], strict=False))  # monotone
    assert ts[-1] == pytest.approx(1.0)
    floors = [0.4 + 0.6 * min(n / total, 1.0) for n in range(2, 61)]
    assert all(t >= f - 1e-6 for t, f in zip(ts[1:], floors, strict=True))


def test_fit_start_reads_total_steps_from_the_context():
    method = TAID()
    method.on_fit_start(FakeContext(torch.nn.Identity(), total_steps=200))
    assert method.floor(100) == pytest.approx(0.7)
    assert method.floor(400) == pytest.approx(1.0)


def test_schedule_is_module_state():
    method = TAID(total_steps=10)
    for n, j in enumerate([2.0, 1.5, 1.2], start=1):
        method._objective = torch.tensor(j)
        method.on_train_batch_end(FakeContext(torch.nn.Identity(), global_step=n), {})
    state = method.state_dict()
    assert {"t", "momentum", "prev_objective"} <= set(state)
    fresh = TAID(total_steps=10)
    fresh.load_state_dict(state)
    for k in ("t", "momentum", "prev_objective"):
        assert torch.equal(getattr(fresh, k), getattr(method, k))
    assert float(fresh.prev_objective) == pytest.approx(1.2)


def test_single_teacher_only():
    s, t, y = make_inputs(4, 1.0, 0.0)
    with pytest.raises(ConfigError, match="exactly 1 teacher"):
        TAID().loss_terms(Outputs(s), [Outputs(t), Outputs(t)], {"target": y})
