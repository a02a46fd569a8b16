"""RKD: distance and angle relations against float64 loops, degenerate batches, bf16 and
autocast, gradients into the student only."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.context import FakeContext, trainable_pair

from kdlab.errors import ConfigError
from kdlab.methods.base import Outputs
from kdlab.methods.rkd import RKD
from kdlab.models import build_model
from kdlab.teachers import forward_with_features

P = "penultimate"


def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def ref_distances(x):
    n = len(x)
    d = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j:
                d[i][j] = math.sqrt(max(sum((a - b) ** 2 for a, b in zip(x[i], x[j], strict=True)),
                                        1e-12))
    positive = [v for row in d for v in row if v > 0]
    mean = sum(positive) / len(positive) if positive else 1.0
    return [[v / mean for v in row] for row in d]


def unit(v):
    norm = math.sqrt(sum(a * a for a in v))
    return [a / max(norm, 1e-12) for a in v]


def ref_angles(x):
    n = len(x)
    out = []
    for i in range(n):
        for j in range(n):
            for k in range(n):
                e_ij = unit([b - a for a, b in zip(x[i], x[j], strict=True)])
                e_ik = unit([b - a for a, b in zip(x[i], x[k], strict=True)])
                out.append(sum(a * b for a, b in zip(e_ij, e_ik, strict=True)))
    return out


def ref_rkd(s, t):
    s, t = s.double().tolist(), t.double().tolist()
    ds, dt = ref_distances(s), ref_distances(t)
    n = len(s)
    distance = sum(huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2
    a_s, a_t = ref_angles(s), ref_angles(t)
    angle = sum(huber(a - b) for a, b in zip(a_s, a_t, strict=True)) / n**3
    return distance, angle


def features(batch=5, dim=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=g) * scale, torch.randn(batch, dim + 2, generator=g)


def loss(method, s, t, y=None):
    y = torch.zeros(len(s), dtype=torch.long) if y is None else y
    logits = torch.zeros(len(s), 3)
    return method.loss_terms(Outputs(logits, {P: s}), [Outputs(logits, {P: t})], {"target": y})


@pytest.mark.parametrize("scale", [1.0, 0.01, 30.0], ids=["unit", "tiny", "large"])
def test_terms_match_the_formula(scale):
    s, t = features(scale=scale)
    terms = loss(RKD(distance_weight=25.0, angle_weight=50.0), s, t)
    assert set(terms) == {"ce", "rkd_distance", "rkd_angle"}
    distance, angle = ref_rkd(s, t)
    assert terms["rkd_distance"].item() == pytest.approx(25 * distance, rel=1e-4, abs=1e-6)
    assert terms["rkd_angle"].item() == pytest.approx(50 * angle, rel=1e-4, abs=1e-6)
    assert terms["ce"].item() == pytest.approx(math.log(3), rel=1e-6)  # zero logits


def test_relations_ignore_scale_and_translation():
    """Distances are normalised by their mean and angles are scale-free: a teacher that is a
    scaled, shifted copy of the student costs nothing."""
    s, _ = features(batch=6)
    terms = loss(RKD(), s, 3.0 * s + 2.0)
    assert terms["rkd_distance"].item() == pytest.approx(0.0, abs=1e-5)
    assert terms["rkd_angle"].item() == pytest.approx(0.0, abs=1e-5)


def test_degenerate_batches_one_example_and_identical_rows():
    s, t = features(batch=1)
    one = loss(RKD(), s, t)
    assert one["rkd_distance"].item() == 0.0 and one["rkd_angle"].item() == 0.0
    same = torch.ones(4, 3)  # all rows equal: distances are all sqrt(1e-12), normalised to 1
    _, t = features(batch=4)
    terms = loss(RKD(), same, t)
    distance, angle = ref_rkd(same, t)
    assert terms["rkd_distance"].item() == pytest.approx(25 * distance, rel=1e-4)
    assert terms["rkd_angle"].item() == pytest.approx(50 * angle, rel=1e-4)


def test_one_class_in_the_batch_only_changes_the_ce():
    s, t = features()
    logits = torch.tensor([[2.0, 0.0, -1.0]] * 5)
    y = torch.full((5,), 1)
    terms = RKD(ce_weight=0.5).loss_terms(Outputs(logits, {P: s}), [Outputs(logits, {P: t})],
                                          {"target": y})
    ce = -(0.0 - math.log(math.exp(2) + 1 + math.exp(-1)))
    assert terms["ce"].item() == pytest.approx(0.5 * ce, rel=1e-6)
    distance, _ = ref_rkd(s, t)
    assert terms["rkd_distance"].item() == pytest.approx(25 * distance, rel=1e-4)


def test_bf16_features_and_autocast_are_computed_in_float32():
    s, t = features(batch=6, scale=5.0)
    s16, t16 = s.bfloat16(), t.bfloat16()
    terms = loss(RKD(), s16, t16)
    distance, angle = ref_rkd(s16.float(), t16.float())
    assert terms["rkd_distance"].dtype == torch.float32
    assert terms["rkd_distance"].item() == pytest.approx(25 * distance, rel=1e-4)
    assert terms["rkd_angle"].item() == pytest.approx(50 * angle, rel=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # matmuls would otherwise run in bf16
        auto = loss(RKD(), s, t)
    distance, angle = ref_rkd(s, t)
    assert auto["rkd_distance"].item() == pytest.approx(25 * distance, rel=1e-4)
    assert auto["rkd_angle"].item() == pytest.approx(50 * angle, rel=1e-4)


def test_gradients_reach_the_student_never_the_teacher():
    student, teacher = trainable_pair()
    method = RKD()
    method.check(student, [teacher])
    ctx = FakeContext(student, (teacher,))
    x = torch.randn(6, 1, 8, 8)
    terms = method(forward_with_features(student, x, method.student_features),
                   ctx.teacher_outputs(x, method.teacher_features), {"target": torch.arange(6)})
    (terms["rkd_distance"] + terms["rkd_angle"]).backward()
    assert all(p.grad is None for p in teacher.parameters())
    conv = student.features[0].weight
    assert conv.grad is not None and conv.grad.abs().sum() > 0


def test_one_teacher_only():
    student = build_model("mlp", 10, (4,), hidden=[8])
    with pytest.raises(ConfigError, match="exactly 1 teacher"):
        RKD().check(student, [student, student])
