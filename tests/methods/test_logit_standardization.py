"""Logit standardization on KD and DKD: the z-scored losses against float64 loops, the
invariance that motivates it, constant logits, bf16, and the paper's presets."""

from __future__ import annotations

import math

import pytest
import torch
from loss_cases import CASES, make_inputs

from kdlab.config import compose
from kdlab.methods import instantiate_method
from kdlab.methods.base import Outputs
from kdlab.methods.dkd import DKD
from kdlab.methods.kd import KD


def zscore(row):
    """(z - mean) / (std + 1e-7), std with Bessel's correction (as torch.std)."""
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / (std + 1e-7) for v in row]


def probs(row, temperature):
    m = max(row)
    e = [math.exp((v - m) / temperature) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def ref_kd_ls(s, t, temperature):
    return sum(kl(probs(zscore(tr), temperature), probs(zscore(sr), temperature))
               for sr, tr in zip(s, t, strict=True)) / len(s) * temperature**2


def ref_dkd_ls(s, t, y, temperature):
    tckd = nckd = 0.0
    for sr, tr, label in zip(s, t, y, strict=True):
        ps, pt = probs(zscore(sr), temperature), probs(zscore(tr), temperature)
        tckd += kl([pt[label], 1 - pt[label]], [ps[label], 1 - ps[label]])
        others = [c for c in range(len(sr)) if c != label]
        nckd += kl([pt[c] / (1 - pt[label]) for c in others],
                   [ps[c] / (1 - ps[label]) for c in others])
    return tckd / len(y) * temperature**2, nckd / len(y) * temperature**2


def ce(s, y):
    return sum(-math.log(probs(r, 1.0)[c]) for r, c in zip(s, y, strict=True)) / len(y)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kd_with_logit_standardization_matches_the_formula(case):
    _, classes, scale, temperature, gap = case
    s, t, y = make_inputs(classes, scale, gap, teacher_offset=1)
    method = KD(temperature=temperature, ce_weight=0.1, kd_weight=9.0, logit_standardization=True)
    terms = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    sd, td = s.double().tolist(), t.double().tolist()
    assert terms["kd"].item() == pytest.approx(9 * ref_kd_ls(sd, td, temperature), rel=1e-4,
                                               abs=1e-6)
    assert terms["ce"].item() == pytest.approx(0.1 * ce(sd, y.tolist()), rel=1e-5)  # raw logits


@pytest.mark.parametrize("case", CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_dkd_with_logit_standardization_matches_the_formula(case):
    _, classes, scale, temperature, gap = case
    s, t, y = make_inputs(classes, scale, gap)
    method = DKD(temperature=temperature, alpha=9.0, beta=72.0, warmup_epochs=0,
                 logit_standardization=True)
    terms = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    tckd, nckd = ref_dkd_ls(s.double().tolist(), t.double().tolist(), y.tolist(), temperature)
    assert terms["tckd"].item() == pytest.approx(9 * tckd, rel=1e-4, abs=1e-6)
    # a float32 KL of ~1e-4 per example carries ~1e-7 absolute error, times 72 T^2 here
    assert terms["nckd"].item() == pytest.approx(72 * nckd, rel=1e-4, abs=72 * 16 * 1e-7)
    assert terms["ce"].item() == pytest.approx(ce(s.double().tolist(), y.tolist()), rel=1e-5)


def test_the_student_need_not_match_the_teachers_logit_scale():
    """The point of the paper: a student whose logits are an affine copy (a s + b, a > 0) of
    the teacher's pays nothing with standardization, but does without it."""
    _, t, y = make_inputs(10, 3.0, 0.0)
    student = 0.3 * t + 5.0
    with_ls = KD(temperature=2.0, logit_standardization=True).loss_terms(
        Outputs(student), [Outputs(t)], {"target": y})
    without = KD(temperature=2.0).loss_terms(Outputs(student), [Outputs(t)], {"target": y})
    assert with_ls["kd"].item() == pytest.approx(0.0, abs=1e-5)
    assert without["kd"].item() > 0.1


def test_constant_logits_one_class_batch_and_bf16():
    s, t, _ = make_inputs(10, 3.0, 0.0)
    y = torch.full((7,), 1)
    s[0] = 2.5  # a row with no spread: z-scores are 0, the 1e-7 keeps them finite
    terms = KD(temperature=2.0, kd_weight=9.0, logit_standardization=True).loss_terms(
        Outputs(s.bfloat16()), [Outputs(t.bfloat16())], {"target": y})
    assert all(v.dtype == torch.float32 for v in terms.values())
    sd, td = s.bfloat16().double().tolist(), t.bfloat16().double().tolist()
    assert terms["kd"].item() == pytest.approx(9 * ref_kd_ls(sd, td, 2.0), rel=1e-4)
    dkd = DKD(temperature=2.0, alpha=9.0, beta=72.0, warmup_epochs=0,
              logit_standardization=True).loss_terms(Outputs(s.bfloat16()),
                                                     [Outputs(t.bfloat16())], {"target": y})
    tckd, nckd = ref_dkd_ls(sd, td, y.tolist(), 2.0)
    assert dkd["tckd"].item() == pytest.approx(9 * tckd, rel=1e-4)
    assert dkd["nckd"].item() == pytest.approx(72 * nckd, rel=1e-4)


def test_gradient_reaches_the_student_logits():
    s, t, y = make_inputs(10, 3.0, 0.0)
    s.requires_grad_(True)
    terms = KD(logit_standardization=True).loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    sum(terms.values()).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_presets_carry_the_papers_settings():
    kd = instantiate_method(compose(["method=kd_ls"]).method)
    assert (kd.logit_standardization, kd.temperature, kd.ce_weight, kd.kd_weight) == (
        True, 2.0, 0.1, 9.0)
    dkd = instantiate_method(compose(["method=dkd_ls"]).method)
    assert (dkd.logit_standardization, dkd.temperature, dkd.alpha, dkd.beta) == (
        True, 2.0, 9.0, 72.0)
    assert (dkd.ce_weight, dkd.warmup_epochs) == (1.0, 20)
    assert instantiate_method(compose(["method=kd"]).method).logit_standardization is False
    assert instantiate_method(compose(["method=dkd"]).method).logit_standardization is False
    on = instantiate_method(compose(["method=kd", "method.logit_standardization=true"]).method)
    assert on.logit_standardization is True and on.temperature == 4.0
