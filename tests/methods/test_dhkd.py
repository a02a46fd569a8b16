"""Dual-head KD: the binary KL from its Bernoulli definition (float64 numpy), the auxiliary
head (built from the student's width, trained, never on the evaluation path), which
parameters each term reaches, and gradient alignment against a projection computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.context import FakeContext
from loss_cases import CASES, make_inputs
from torch import nn

from kdlab.errors import ConfigError
from kdlab.methods.base import Outputs
from kdlab.methods.dhkd import DHKD, binary_kl_loss, log_cosh
from kdlab.teachers import forward_with_features


def ref_binary_kl(z, t, temperature):
    """T^2 mean_i sum_c KL(Bern(1/2) || Bern(q)), q = sigmoid((z - t) / T), by definition."""
    total = 0.0
    for i in range(len(z)):
        for c in range(len(z[i])):
            d = (z[i][c] - t[i][c]) / temperature
            log_q = -np.logaddexp(0.0, -d)          # log sigmoid(d)
            log_1mq = -np.logaddexp(0.0, d)         # log (1 - sigmoid(d))
            total += 0.5 * (np.log(0.5) - log_q) + 0.5 * (np.log(0.5) - log_1mq)
    return temperature ** 2 * total / len(z)


def np_ce(s, y):
    out = 0.0
    for i in range(len(y)):
        m = s[i].max()
        out += -(s[i][y[i]] - m - np.log(np.exp(s[i] - m).sum()))
    return out / len(y)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_binary_kl_matches_the_bernoulli_definition(case):
    _, classes, scale, temperature, gap = case
    z, t, _ = make_inputs(classes, scale, gap, teacher_offset=1)
    got = binary_kl_loss(z, t, temperature).item()
    assert got == pytest.approx(ref_binary_kl(z.double().numpy(), t.double().numpy(),
                                              temperature), rel=1e-5, abs=1e-6)


def test_log_cosh_is_stable_and_exact():
    x = torch.tensor([0.0, 1e-3, 0.5, -3.0, 30.0, -1e4], dtype=torch.float64)
    expected = [math.log(math.cosh(v)) if abs(v) < 300 else abs(v) - math.log(2)
                for v in x.tolist()]
    torch.testing.assert_close(log_cosh(x), torch.tensor(expected, dtype=torch.float64))
    assert torch.isfinite(log_cosh(torch.tensor([1e30, -1e30]))).all()


class TwoLayer(nn.Module):
    """A tiny student: body -> penultimate (B, 6) -> classifier (B, C)."""

    def __init__(self, classes=5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.classifier = nn.Linear(6, classes)

    def forward(self, x):
        return self.classifier(self.body(x))


def setup_method(**options):
    torch.manual_seed(0)
    student, teacher = TwoLayer(), TwoLayer()
    method = DHKD(**options)
    ctx = FakeContext(student, (teacher,), num_classes=5, input_shape=(4,))
    method.setup(ctx)
    return method, student, teacher, ctx


def step(method, student, teacher, x, y):
    out = forward_with_features(student, x, method.student_features)
    with torch.no_grad():
        t = teacher(x)
    return out, t, method.loss_terms(out, [Outputs(t)], {"target": y})


def test_loss_terms_with_a_known_head():
    method, student, teacher, _ = setup_method(alpha=0.5, temperature=3.0, ce_weight=0.7)
    x, y = torch.randn(9, 4), torch.randint(0, 5, (9,))
    out, t, terms = step(method, student, teacher, x, y)
    assert set(terms) == {"ce", "aux"}
    h = student.body(x).detach().double().numpy()
    w = method.aux_head.weight.detach().double().numpy()
    b = method.aux_head.bias.detach().double().numpy()
    z = h @ w.T + b
    assert terms["aux"].item() == pytest.approx(
        0.5 * ref_binary_kl(z, t.double().numpy(), 3.0), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(
        0.7 * np_ce(out.logits.detach().double().numpy(), y.numpy()), rel=1e-5)


def test_head_is_built_from_the_student_and_is_method_state():
    method, student, _, ctx = setup_method()
    head = method.aux_head
    assert (head.in_features, head.out_features) == (6, 5)
    method.setup(ctx)  # idempotent
    assert method.aux_head is head
    assert {id(p) for p in method.extra_parameters()} == {id(p) for p in head.parameters()}
    assert set(method.state_dict()) == {"aux_head.weight", "aux_head.bias"}
    mlp, _, _, _ = setup_method(head="mlp")
    assert isinstance(mlp.aux_head, nn.Sequential) and mlp.aux_head[-1].out_features == 5
    with pytest.raises(ConfigError, match="head"):
        DHKD(head="conv")
    with pytest.raises(ConfigError, match="exactly 1"):
        DHKD().check(student, [])


def test_each_term_reaches_what_it_should():
    """CE: the classifier and the body, not the auxiliary head; the auxiliary term: the head
    and the body, not the classifier; the teacher: nothing."""
    method, student, teacher, _ = setup_method()
    x, y = torch.randn(8, 4), torch.randint(0, 5, (8,))
    _, _, terms = step(method, student, teacher, x, y)
    named = {"classifier": list(student.classifier.parameters()),
             "body": list(student.body.parameters()), "head": list(method.aux_head.parameters())}
    flat = [p for ps in named.values() for p in ps]
    for term, reaches in (("ce", {"classifier", "body"}), ("aux", {"head", "body"})):
        grads = torch.autograd.grad(terms[term], flat, retain_graph=True, allow_unused=True)
        got, i = set(), 0
        for part, ps in named.items():
            if any(g is not None and g.abs().sum() > 0 for g in grads[i:i + len(ps)]):
                got.add(part)
            i += len(ps)
        assert got == reaches, term
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_evaluation_uses_the_main_head_only():
    """What validation, test and kdlab eval score (method.predict of the student's logits)
    is the main head's output, computed here by hand, whatever the auxiliary head holds."""
    method, student, _, _ = setup_method()
    x = torch.randn(3, 4)
    with torch.no_grad():
        method.aux_head.weight.add_(5.0)
        lin, head = student.body[0], student.classifier
        main_head = torch.tanh(x @ lin.weight.T + lin.bias) @ head.weight.T + head.bias
        torch.testing.assert_close(method.predict(student(x)), main_head)


@pytest.mark.parametrize("edge", ["bf16", "one class", "confident teacher"])
def test_edge_cases(edge):
    z, t, y = make_inputs(10, 3.0, 40.0 if edge == "confident teacher" else 0.0,
                          student_gap=False, teacher_offset=1)
    if edge == "one class":
        y = torch.zeros_like(y)
    if edge == "bf16":
        z, t = z.bfloat16(), t.bfloat16()
    got = binary_kl_loss(z, t, 2.0)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert got.item() == pytest.approx(
        ref_binary_kl(z.double().numpy(), t.double().numpy(), 2.0), rel=1e-4)
    method, student, teacher, _ = setup_method()
    x = torch.randn(len(y), 4)
    out = forward_with_features(student, x, method.student_features)
    t5 = t[:, :5].float()
    terms = method.loss_terms(out, [Outputs(t5.bfloat16() if edge == "bf16" else t5)],
                              {"target": y % 5})
    assert all(torch.isfinite(v) for v in terms.values())


def flat_grad(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return np.concatenate([(g if g is not None else torch.zeros_like(p)).detach().double()
                           .numpy().ravel() for g, p in zip(grads, params, strict=True)])


@pytest.mark.parametrize("seed", range(6))
def test_gradient_alignment_is_the_projection(seed):
    """The summed terms' gradient equals g_ce + g_aux, with g_aux replaced by
    g_aux - (<g_aux, g_ce> / |g_ce|^2) g_ce when the two conflict (numpy, by hand)."""
    method, student, teacher, _ = setup_method(gradient_alignment=True, alpha=3.0)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 4, generator=g), torch.randint(0, 5, (6,), generator=g)
    params = [*student.parameters(), *method.aux_head.parameters()]
    _, _, terms = step(method, student, teacher, x, y)
    g_ce, g_aux = flat_grad(terms["ce"], params), flat_grad(terms["aux"], params)
    dot = float(g_ce @ g_aux)
    expected = g_ce + (g_aux - dot / float(g_ce @ g_ce) * g_ce if dot < 0 else g_aux)
    got = flat_grad(sum(terms.values()), params)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert terms["align"].item() >= 0.0
    if dot >= 0:
        assert terms["align"].item() == 0.0


def test_gradient_alignment_finds_conflicts():
    """Some of the seeds above do conflict (the test is not only the no-op branch)."""
    conflicts = 0
    for seed in range(6):
        method, student, teacher, _ = setup_method(gradient_alignment=True, alpha=3.0)
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(6, 4, generator=g), torch.randint(0, 5, (6,), generator=g)
        _, _, terms = step(method, student, teacher, x, y)
        conflicts += terms["align"].item() > 0
    assert conflicts > 0
