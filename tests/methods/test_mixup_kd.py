"""Mixup KD: the std-scaled loss against float64 numpy loops, the partial-mixup transform
(which rows are mixed, in both modes, and that inputs and soft targets are mixed alike), the
evaluation hook, and the confidence ceiling that std scaling implies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.context import FakeContext
from loss_cases import CASES, make_inputs

from kdlab.errors import ConfigError
from kdlab.methods.base import Outputs
from kdlab.methods.mixup_kd import MixupKD, partial_mixup


def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max()
    return z - m - np.log(np.exp(z - m).sum())


def ref_terms(s, t, soft):
    """Per row: z / std(z) with the n - 1 std, soft CE and KL, averaged over the rows."""
    ce = kl = 0.0
    for i in range(len(s)):
        zs = s[i] / np.std(s[i], ddof=1)
        zt = t[i] / np.std(t[i], ddof=1)
        log_ps, log_pt = np_log_softmax(zs), np_log_softmax(zt)
        ce += -sum(soft[i][c] * log_ps[c] for c in range(len(zs)))
        kl += sum(np.exp(log_pt[c]) * (log_pt[c] - log_ps[c]) for c in range(len(zs)))
    return ce / len(s), kl / len(s)


def random_soft_targets(batch, classes, seed=0):
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.dirichlet(np.ones(classes), size=batch), dtype=torch.float32)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_loss_matches_formula(case):
    _, classes, scale, _, gap = case
    s, t, y = make_inputs(classes, scale, gap, teacher_offset=1)
    soft = random_soft_targets(len(y), classes)
    terms = MixupKD(ce_weight=0.3, kd_weight=0.7).loss_terms(
        Outputs(s), [Outputs(t)], {"target": y, "soft_target": soft})
    assert set(terms) == {"ce", "kd"}
    ce, kl = ref_terms(s.double().numpy(), t.double().numpy(), soft.double().numpy())
    assert terms["ce"].item() == pytest.approx(0.3 * ce, rel=1e-5, abs=1e-6)
    assert terms["kd"].item() == pytest.approx(0.7 * kl, rel=1e-4, abs=1e-6)


def test_without_the_transform_the_labels_are_one_hot():
    s, t, y = make_inputs(10, 3.0, 0.0)
    plain = MixupKD().loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    onehot = torch.nn.functional.one_hot(y, 10).float()
    soft = MixupKD().loss_terms(Outputs(s), [Outputs(t)], {"target": y, "soft_target": onehot})
    assert plain["ce"].item() == pytest.approx(soft["ce"].item(), rel=1e-6)


@pytest.mark.parametrize("edge", ["bf16", "one class", "confident teacher", "constant logits"])
def test_edge_cases_stay_finite_and_close_to_float64(edge):
    s, t, y = make_inputs(10, 3.0, 40.0 if edge == "confident teacher" else 0.0,
                          student_gap=False, teacher_offset=1)
    if edge == "one class":
        y = torch.full_like(y, 3)
    if edge == "constant logits":
        s = torch.zeros_like(s)
    soft = torch.nn.functional.one_hot(y, 10).float()
    batch = {"target": y, "soft_target": soft}
    logits = (s.bfloat16(), t.bfloat16()) if edge == "bf16" else (s, t)
    terms = MixupKD(ce_weight=1.0, kd_weight=1.0).loss_terms(
        Outputs(logits[0]), [Outputs(logits[1])], batch)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    if edge == "constant logits":  # sigma floored: a uniform prediction
        assert terms["ce"].item() == pytest.approx(math.log(10), rel=1e-5)
        return
    ref_s, ref_t = (x.double().numpy() for x in logits)
    ce, kl = ref_terms(ref_s, ref_t, soft.double().numpy())
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-4, abs=1e-5)
    assert terms["kd"].item() == pytest.approx(kl, rel=1e-4, abs=1e-5)


def test_gradient_reaches_the_student_through_its_std_and_never_the_teacher():
    s, t, y = make_inputs(10, 3.0, 0.0)
    s.requires_grad_(True)
    t.requires_grad_(True)  # a teacher output with history must still get nothing
    terms = MixupKD().loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    sum(terms.values()).backward()
    assert t.grad is None
    # the loss is invariant to rescaling s, so its gradient is orthogonal to s per row
    # (d/da L(a s) = <grad, s> = 0): true only if the gradient flows through std(s) too
    assert s.grad.abs().sum() > 0
    torch.testing.assert_close((s.grad * s.detach()).sum(-1), torch.zeros(len(s)),
                               atol=1e-6, rtol=0)


def identity_batch(batch_size, classes=5, seed=0):
    """Inputs are one-hot example ids, so a mixed input reveals its two sources and weight."""
    g = torch.Generator().manual_seed(seed)
    return torch.eye(batch_size), torch.randint(0, classes, (batch_size,), generator=g)


def test_stated_mode_mixes_exactly_the_fraction_and_mixes_inputs_and_targets_alike():
    b, classes = 64, 5
    x, y = identity_batch(b, classes)
    torch.manual_seed(0)
    mixed_x, soft, lam, perm1 = partial_mixup(x, y, classes, 0.1, 1.0, "stated")
    assert int((lam < 1).sum()) == round(0.1 * b)  # Beta(1, 1) < 1 almost surely
    for i in range(b):
        sources = torch.nonzero(mixed_x[i]).flatten().tolist()
        weights = mixed_x[i][sources]
        expected = torch.zeros(classes)
        for j, w in zip(sources, weights, strict=True):
            expected[y[j]] += w
        if lam[i] == 1:
            assert sources == [int(perm1[i])]  # a kept row: an example of the first permutation
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
        assert float(mixed_x[i, perm1[i]]) >= float(lam[i]) - 1e-6  # l on the first source
        torch.testing.assert_close(soft[i], expected, atol=1e-6, rtol=0)


def test_released_mode_mixes_about_41_percent_of_a_64_batch():
    """int(0.9 * 64) = 57 kept indices drawn with replacement: a row escapes all of them with
    probability (63/64)^57, so that share of the batch is mixed."""
    b = 64
    x, y = identity_batch(b)
    torch.manual_seed(0)
    fractions = [float((partial_mixup(x, y, 5, 0.1, 1.0, "released")[2] < 1).float().mean())
                 for _ in range(400)]
    expected = (1 - 1 / b) ** int(0.9 * b)
    assert expected == pytest.approx(0.4075, abs=1e-3)
    assert np.mean(fractions) == pytest.approx(expected, abs=0.01)


def test_transform_batch_keeps_the_batch_consistent():
    method = MixupKD(mixed_fraction=0.5)
    x, y = identity_batch(16, 5)
    index = torch.arange(100, 116)
    torch.manual_seed(1)
    out = method.transform_batch({"input": x, "target": y, "index": index},
                                 FakeContext(torch.nn.Identity(), num_classes=5))
    assert set(out) >= {"input", "target", "index", "soft_target", "mix_weight"}
    torch.testing.assert_close(out["soft_target"].sum(-1), torch.ones(16))
    assert torch.equal(out["target"], out["soft_target"].argmax(-1))
    first = out["input"].argmax(-1)  # a kept row's only source
    kept = out["mix_weight"] == 1
    assert torch.equal(out["index"][kept], index[first[kept]])


def test_options_are_checked():
    with pytest.raises(ConfigError, match="partial"):
        MixupKD(partial="always")
    with pytest.raises(ConfigError, match="mixed_fraction"):
        MixupKD(mixed_fraction=1.5)
    with pytest.raises(ConfigError, match="beta_alpha"):
        MixupKD(beta_alpha=0)


def test_evaluation_sees_the_standardised_prediction():
    student = torch.nn.Linear(4, 10)
    x = torch.randn(5, 4)
    raw = torch.nn.functional.linear(x, student.weight, student.bias)
    torch.testing.assert_close(MixupKD().predict(raw), raw / raw.std(dim=-1, keepdim=True))
    assert torch.equal(MixupKD(standardize_eval_logits=False).predict(raw), raw)


@pytest.mark.parametrize("classes", [2, 10, 20, 100])
def test_standardised_confidence_has_a_ceiling(classes):
    """With z / std(z) (n - 1 std), the largest gap between one logit and the rest is
    sqrt(C), so softmax(z / std(z)) never exceeds e^sqrt(C) / (e^sqrt(C) + C - 1): 0.72
    for 10 classes, 0.82 for 20, 0.9955 for 100. Reached by one high logit, the rest equal."""
    ceiling = math.exp(math.sqrt(classes)) / (math.exp(math.sqrt(classes)) + classes - 1)
    z = torch.zeros(1, classes, dtype=torch.float64)
    z[0, 0] = 50.0
    from kdlab.methods.mixup_kd import standardized_log_probs

    assert standardized_log_probs(z).exp().max().item() == pytest.approx(ceiling, rel=1e-9)
    torch.manual_seed(0)
    random = torch.randn(2000, classes, dtype=torch.float64) * 10
    assert standardized_log_probs(random).exp().max().item() <= ceiling + 1e-12
