"""Guided self-distillation: both squared-error terms against float64 numpy, the limits of
alpha, the edge cases, and the experiment that chains five generations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from loss_cases import CASES, make_inputs

from kdlab.config import compose
from kdlab.errors import ConfigError
from kdlab.methods import instantiate_method
from kdlab.methods.base import Outputs
from kdlab.methods.guided_self_distill import GuidedSelfDistill
from kdlab.preflight import validate


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def ref_terms(s, t, y, alpha):
    """alpha * mean over rows and classes of (p_s - onehot)^2, (1 - alpha) * ... (p_s - p_t)^2."""
    n, c = s.shape
    label = teacher = 0.0
    for i in range(n):
        ps, pt = np_softmax(s[i]), np_softmax(t[i])
        onehot = np.eye(c)[y[i]]
        label += ((ps - onehot) ** 2).sum()
        teacher += ((ps - pt) ** 2).sum()
    return alpha * label / (n * c), (1 - alpha) * teacher / (n * c)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_terms_match_formula(case):
    _, classes, scale, _, gap = case
    s, t, y = make_inputs(classes, scale, gap, teacher_offset=1)
    terms = GuidedSelfDistill(alpha=0.35).loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    assert set(terms) == {"label_mse", "teacher_mse"}
    label, teacher = ref_terms(s.double().numpy(), t.double().numpy(), y.numpy(), 0.35)
    assert terms["label_mse"].item() == pytest.approx(label, rel=1e-5, abs=1e-8)
    assert terms["teacher_mse"].item() == pytest.approx(teacher, rel=1e-5, abs=1e-8)


def test_alpha_limits():
    s, t, y = make_inputs(10, 3.0, 0.0)
    only_labels = GuidedSelfDistill(alpha=1.0).loss_terms(Outputs(s), [Outputs(t)],
                                                          {"target": y})
    only_teacher = GuidedSelfDistill(alpha=0.0).loss_terms(Outputs(s), [Outputs(t)],
                                                           {"target": y})
    assert only_labels["teacher_mse"].item() == 0.0 and only_teacher["label_mse"].item() == 0.0
    same = GuidedSelfDistill(alpha=0.0).loss_terms(Outputs(s), [Outputs(s.clone())],
                                                   {"target": y})
    assert same["teacher_mse"].item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError, match="alpha"):
        GuidedSelfDistill(alpha=1.2)


@pytest.mark.parametrize("edge", ["bf16", "one class", "confident teacher"])
def test_edge_cases(edge):
    s, t, y = make_inputs(10, 3.0, 40.0 if edge == "confident teacher" else 0.0,
                          student_gap=False, teacher_offset=1)
    if edge == "one class":
        y = torch.full_like(y, 9)
    if edge == "bf16":
        s, t = s.bfloat16(), t.bfloat16()
    terms = GuidedSelfDistill().loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    label, teacher = ref_terms(s.double().numpy(), t.double().numpy(), y.numpy(), 0.6)
    assert terms["label_mse"].item() == pytest.approx(label, rel=1e-4)
    assert terms["teacher_mse"].item() == pytest.approx(teacher, rel=1e-4)


def test_gradient_reaches_the_student_never_the_teacher():
    s, t, y = make_inputs(10, 3.0, 0.0)
    s.requires_grad_(True)
    t.requires_grad_(True)
    sum(GuidedSelfDistill().loss_terms(Outputs(s), [Outputs(t)], {"target": y}).values()
        ).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_the_experiment_chains_five_generations_of_one_architecture():
    cfg = compose(["experiment=digits_guided_self_distill"])
    assert cfg.generations == 5
    assert cfg.choices.method == "guided_self_distill"
    assert cfg.choices.teacher == cfg.choices.student == "cnn_small"
    assert cfg.teacher.ckpt == "auto" and cfg.teacher._target_ == cfg.student._target_
    assert instantiate_method(cfg.method).alpha == 0.6
    assert (cfg.optimizer._target_, cfg.optimizer.lr) == ("torch.optim.Adam", 0.01)
    assert cfg.dataset.recipe.lr == 0.05  # the first teacher is trained on the SGD recipe
    validate(cfg)
    override = compose(["experiment=digits_guided_self_distill", "method.alpha=0.35",
                        "generations=3"])
    assert (override.method.alpha, override.generations) == (0.35, 3)
