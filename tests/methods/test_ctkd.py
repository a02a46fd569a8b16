"""CTKD: KD at the learnable temperature against float64 loops, the reversed gradient on theta
(against a finite difference), the cosine curriculum, state saved and restored, bf16."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.context import FakeContext
from loss_cases import make_inputs

from kdlab.methods.base import Outputs
from kdlab.methods.ctkd import CTKD


def log_softmax(row, temperature):
    z = [v / temperature for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def ref_kd(s, t, temperature):
    total = 0.0
    for sr, tr in zip(s, t, strict=True):
        lp, lq = log_softmax(tr, temperature), log_softmax(sr, temperature)
        total += sum(math.exp(a) * (a - b) for a, b in zip(lp, lq, strict=True))
    return total / len(s) * temperature**2


def temperature_of(theta, t_min=1.0, t_range=20.0):
    return t_min + t_range / (1 + math.exp(-theta))


def at_epoch(method, current_epoch):
    method.on_train_epoch_start(FakeContext(torch.nn.Identity(), current_epoch=current_epoch))
    return method


@pytest.mark.parametrize("theta,gap", [(1.0, 0.0), (-3.0, 0.0), (1.0, 40.0)],
                         ids=["initial", "low temperature", "very confident teacher"])
def test_loss_at_the_learnable_temperature(theta, gap):
    s, t, y = make_inputs(10, 3.0, gap, teacher_offset=1)
    method = CTKD(theta_init=theta, ce_weight=0.1, kd_weight=0.9)
    terms = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    assert set(terms) == {"ce", "kd"}
    temperature = temperature_of(theta)
    expected = ref_kd(s.double().tolist(), t.double().tolist(), temperature)
    assert terms["kd"].item() == pytest.approx(0.9 * expected, rel=1e-4, abs=1e-6)
    rows = zip(s.double().tolist(), y.tolist(), strict=True)
    ce = sum(-log_softmax(r, 1.0)[c] for r, c in rows) / len(y)
    assert terms["ce"].item() == pytest.approx(0.1 * ce, rel=1e-5)


def test_initial_temperature_is_15_6():
    assert CTKD().results()["ctkd"]["temperature_final"] == pytest.approx(
        1 + 20 / (1 + math.exp(-1)), rel=1e-6)


def test_curriculum_strength_rises_on_a_cosine_over_ten_epochs():
    method = CTKD(curriculum_epochs=10)
    for current_epoch in (0, 1, 4, 8, 9, 10, 100):
        e = min(current_epoch + 1, 10)  # epochs count from 1
        expected = (1 - math.cos(math.pi * e / 10)) / 2
        assert float(at_epoch(method, current_epoch).reversal) == pytest.approx(expected)
    assert float(at_epoch(method, 4).reversal) == pytest.approx(0.5)


@pytest.mark.parametrize("current_epoch", [0, 4, 12])
def test_theta_gets_the_reversed_kd_gradient(current_epoch):
    """d(loss)/d(theta) through the layer is -lambda * d(kd term)/d(theta); the finite
    difference of the float64 formula gives the latter."""
    s, t, y = make_inputs(10, 3.0, 0.0, teacher_offset=1)
    method = at_epoch(CTKD(theta_init=0.3, kd_weight=0.9), current_epoch)
    terms = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    (terms["ce"] + terms["kd"]).backward()
    h = 1e-4
    sd, td = s.double().tolist(), t.double().tolist()
    slope = 0.9 * (ref_kd(sd, td, temperature_of(0.3 + h))
                   - ref_kd(sd, td, temperature_of(0.3 - h))) / (2 * h)
    strength = float(method.reversal)
    assert method.theta.grad.item() == pytest.approx(-strength * slope, rel=1e-3, abs=1e-7)
    if current_epoch >= 9:
        assert method.theta.grad.item() * slope < 0  # the temperature climbs the KD loss


def test_student_gradient_is_plain_kd_at_the_current_temperature():
    """The reversal acts on theta only: the student's gradient is KD's at that temperature."""
    s, t, y = make_inputs(10, 3.0, 0.0)
    method = at_epoch(CTKD(theta_init=0.5), 12)
    s1 = s.clone().requires_grad_(True)
    sum(method.loss_terms(Outputs(s1), [Outputs(t)], {"target": y}).values()).backward()
    from kdlab.methods.kd import KD
    s2 = s.clone().requires_grad_(True)
    kd = KD(temperature=temperature_of(0.5), ce_weight=0.1, kd_weight=0.9)
    sum(kd.loss_terms(Outputs(s2), [Outputs(t)], {"target": y}).values()).backward()
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-7)


def test_state_is_saved_and_restored_and_results_report_the_last_step():
    s, t, y = make_inputs(10, 3.0, 0.0)
    method = at_epoch(CTKD(), 6)
    assert [n for n, _ in method.named_parameters()] == ["theta"]
    assert method.extra_parameters() == [method.theta]
    with torch.no_grad():
        method.theta.fill_(-0.7)
    ctx = FakeContext(torch.nn.Identity())
    method.on_train_batch_end(ctx, {})
    assert ctx.logged["ctkd/temperature"].item() == pytest.approx(temperature_of(-0.7), rel=1e-6)
    fresh = CTKD()
    fresh.load_state_dict(method.state_dict())
    assert fresh.theta.item() == pytest.approx(-0.7) and float(fresh.reversal) == pytest.approx(
        float(method.reversal))
    a = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})["kd"].item()
    b = fresh.loss_terms(Outputs(s), [Outputs(t)], {"target": y})["kd"].item()
    assert a == pytest.approx(b, rel=1e-6)
    with torch.no_grad():  # results() runs after the best checkpoint is loaded back
        method.theta.fill_(2.0)
    assert method.results()["ctkd"]["temperature_final"] == pytest.approx(temperature_of(-0.7),
                                                                          rel=1e-6)


def test_one_class_batch_and_bf16_logits():
    s, t, _ = make_inputs(10, 3.0, 0.0)
    y = torch.full((7,), 2)
    method = CTKD()
    terms = method.loss_terms(Outputs(s.bfloat16()), [Outputs(t.bfloat16())], {"target": y})
    assert all(v.dtype == torch.float32 for v in terms.values())
    sd, td = s.bfloat16().double().tolist(), t.bfloat16().double().tolist()
    assert terms["kd"].item() == pytest.approx(0.9 * ref_kd(sd, td, temperature_of(1.0)), rel=1e-4)
    ce = sum(-log_softmax(r, 1.0)[2] for r in sd) / 7
    assert terms["ce"].item() == pytest.approx(0.1 * ce, rel=1e-5)
