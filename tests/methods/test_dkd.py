"""DKD: TCKD and NCKD from explicit probability masses (float64 loops), the warm-up state,
and the decomposition KL = TCKD + (1 - q_y) * NCKD from the paper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.context import FakeContext
from loss_cases import CASES, make_inputs

from kdlab.methods.base import Outputs, kd_kl
from kdlab.methods.dkd import DKD


def probs(z, temperature):
    z = np.asarray(z, dtype=np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def kl(q, p):
    return sum(qi * (np.log(qi) - np.log(pi)) for qi, pi in zip(q, p, strict=True) if qi > 0)


def ref_tckd_nckd(s, t, y, temperature):
    """Per the paper: binary masses (p_y, sum of the others) and the renormalised
    distribution over the non-target classes; plain loops."""
    tckd = nckd = 0.0
    for i in range(len(y)):
        p, q = probs(s[i], temperature), probs(t[i], temperature)
        others = [c for c in range(len(p)) if c != y[i]]
        p_rest, q_rest = sum(p[c] for c in others), sum(q[c] for c in others)
        tckd += kl([q[y[i]], q_rest], [p[y[i]], p_rest])
        nckd += kl([q[c] / q_rest for c in others], [p[c] / p_rest for c in others])
    n = len(y)
    return tckd / n * temperature**2, nckd / n * temperature**2


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_terms_match_probability_masses(case):
    _, classes, scale, temperature, gap = case
    s, t, y = make_inputs(classes, scale, gap)
    method = DKD(temperature=temperature, alpha=1.5, beta=8.0, warmup_epochs=4, ce_weight=0.5)
    method.epoch.fill_(2)  # warm-up factor 2 / 4
    terms = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    assert set(terms) == {"ce", "tckd", "nckd"}
    tckd, nckd = ref_tckd_nckd(s.double().numpy(), t.double().numpy(), y.numpy(), temperature)
    assert terms["tckd"].item() == pytest.approx(0.5 * 1.5 * tckd, rel=1e-4, abs=1e-6)
    assert terms["nckd"].item() == pytest.approx(0.5 * 8.0 * nckd, rel=1e-4, abs=1e-6)
    ce = -np.mean([np.log(probs(s[i].double().numpy(), 1.0)[y[i]]) for i in range(len(y))])
    assert terms["ce"].item() == pytest.approx(0.5 * ce, rel=1e-5, abs=1e-6)


def test_two_classes_nckd_is_zero_and_tckd_is_kd():
    s, t, y = make_inputs(2, 3.0, 0.0)
    terms = DKD(warmup_epochs=0).loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    assert terms["nckd"].item() == pytest.approx(0.0, abs=1e-7)
    assert terms["tckd"].item() == pytest.approx(kd_kl(s, t, 4.0).item(), rel=1e-5)


def test_decomposition_of_kd():
    """KD's KL = TCKD + (1 - q_y) NCKD per example (eq. 5 of the paper)."""
    s, t, y = make_inputs(10, 2.0, 0.0, batch=1)
    method = DKD(alpha=1.0, beta=1.0, warmup_epochs=0)
    terms = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    q_y = probs(t[0].double().numpy(), 4.0)[y[0]]
    combined = terms["tckd"].item() + (1 - q_y) * terms["nckd"].item()
    assert combined == pytest.approx(kd_kl(s, t, 4.0).item(), rel=1e-5)


def test_warmup_is_epoch_state():
    method = DKD(warmup_epochs=20)
    for current_epoch, factor in [(0, 1 / 20), (4, 5 / 20), (19, 1.0), (50, 1.0)]:
        method.on_train_epoch_start(FakeContext(torch.nn.Identity(), current_epoch=current_epoch))
        assert int(method.epoch) == current_epoch + 1
        assert method.warmup_factor().item() == pytest.approx(factor)
    assert "epoch" in method.state_dict()
    fresh = DKD(warmup_epochs=20)
    fresh.load_state_dict(method.state_dict())
    assert int(fresh.epoch) == 51


def test_kd_terms_scale_with_warmup():
    s, t, y = make_inputs(10, 3.0, 0.0)
    method = DKD(warmup_epochs=10)
    method.epoch.fill_(10)
    full = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    method.epoch.fill_(3)
    warm = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    assert warm["ce"].item() == pytest.approx(full["ce"].item())
    for k in ("tckd", "nckd"):
        assert warm[k].item() == pytest.approx(0.3 * full[k].item(), rel=1e-6)


def test_gradient_reaches_student_logits_only():
    s, t, y = make_inputs(10, 3.0, 0.0)
    s.requires_grad_(True)
    terms = DKD(warmup_epochs=0).loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    sum(terms.values()).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
