"""FitNet: the regressor built by probing shapes, the hint MSE by hand, pooling on size
mismatch, gradients into the student and the regressor only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.context import FakeContext
from torch import nn

from kdlab.errors import ConfigError
from kdlab.methods.base import Outputs
from kdlab.methods.fitnet import FitNet, align_features, make_regressor, probe_feature
from kdlab.models import build_model
from kdlab.teachers import forward_with_features


def make_ctx(student, teacher, input_shape=(1, 8, 8)):
    return FakeContext(student, (teacher,), input_shape=input_shape)


def models(student="cnn_small"):
    torch.manual_seed(0)
    s = (build_model("cnn", 10, (1, 8, 8), width=8) if student == "cnn_small"
         else build_model("mlp", 10, (1, 8, 8), hidden=[32]))
    return s, build_model("cnn", 10, (1, 8, 8), width=32).eval()


def test_regressor_from_probed_shapes_and_bn_stats_untouched():
    student, teacher = models()
    bn = student.features[1]
    running = bn.running_mean.clone()
    method = FitNet("features.5", "features.5")
    method.setup(make_ctx(student, teacher))
    conv, norm = method.regressor[0], method.regressor[1]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
    assert (conv.in_channels, conv.out_channels) == (16, 64)
    assert isinstance(norm, nn.BatchNorm2d)
    assert torch.equal(bn.running_mean, running) and student.training
    regressor = method.regressor
    method.setup(make_ctx(student, teacher))  # idempotent
    assert method.regressor is regressor
    assert {id(p) for p in method.extra_parameters()} == {id(p) for p in regressor.parameters()}


def test_hint_is_mse_of_regressed_student_feature_by_hand():
    g = torch.Generator().manual_seed(0)
    f_s, f_t = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 6, 5, 5, generator=g)
    method = FitNet("a", "b", beta=100.0, ce_weight=0.5)
    method.regressor = nn.Sequential(nn.Conv2d(3, 6, 1, bias=False), nn.BatchNorm2d(6))
    with torch.no_grad():
        method.regressor[1].weight.uniform_(0.5, 1.5, generator=g)
        method.regressor[1].bias.uniform_(-1, 1, generator=g)
    logits, y = torch.randn(4, 10, generator=g), torch.tensor([1, 2, 3, 4])
    teacher = Outputs(torch.zeros(4, 10), {"b": f_t})
    terms = method.loss_terms(Outputs(logits, {"a": f_s}), [teacher], {"target": y})
    assert set(terms) == {"ce", "hint"}
    w = method.regressor[0].weight.detach().double().numpy()[:, :, 0, 0]
    gamma = method.regressor[1].weight.detach().double().numpy()
    shift = method.regressor[1].bias.detach().double().numpy()
    x = np.einsum("oc,bchw->bohw", w, f_s.double().numpy())
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))  # BN in training mode
    x = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
    x = x * gamma[None, :, None, None] + shift[None, :, None, None]
    mse = np.mean((x - f_t.double().numpy()) ** 2)
    assert terms["hint"].item() == pytest.approx(100.0 * mse, rel=1e-4)
    z = logits.double().numpy()
    ce = np.mean([np.log(np.exp(z[i]).sum()) - z[i, y[i]] for i in range(4)])
    assert terms["ce"].item() == pytest.approx(0.5 * ce, rel=1e-5)


def test_larger_map_is_pooled_to_the_smaller():
    g = torch.Generator().manual_seed(1)
    big, small = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    s, t = align_features(big, small)
    by_hand = big.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    assert torch.allclose(s, by_hand, atol=1e-6) and t is small
    t2, s2 = align_features(small, big)
    assert t2 is small and torch.allclose(s2, by_hand, atol=1e-6)
    v, m = align_features(torch.randn(2, 7), big)
    assert m.shape == (2, 3) and torch.allclose(m, big.mean((2, 3)))


def test_linear_regressor_for_vector_student():
    student, teacher = models("mlp")
    method = FitNet("body.2", "features.5")
    method.setup(make_ctx(student, teacher))
    assert isinstance(method.regressor, nn.Linear)
    assert (method.regressor.in_features, method.regressor.out_features) == (32, 64)


@pytest.mark.parametrize("student_kind,layers", [("cnn_small", ("features.5", "features.2")),
                                                 ("mlp", ("body.2", "features.5"))])
def test_gradients_reach_student_and_regressor_not_teacher(student_kind, layers):
    student, teacher = models(student_kind)
    for p in teacher.parameters():
        p.requires_grad_(True)  # even a trainable teacher must get no gradient
    method = FitNet(*layers)
    ctx = make_ctx(student, teacher)
    method.setup(ctx)
    x = torch.randn(5, 1, 8, 8)
    teachers = ctx.teacher_outputs(x, method.teacher_features)
    outs = forward_with_features(student, x, method.student_features)
    terms = method(outs, teachers, {"target": torch.tensor([0, 1, 2, 3, 4])})
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in method.regressor.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert terms["hint"].item() > 0


def test_bad_layer_path_is_a_config_error_naming_the_option():
    student, teacher = models()
    with pytest.raises(ConfigError, match="method.student_layer='layer2'.*features, classifier"):
        FitNet("layer2", "features.5").setup(make_ctx(student, teacher))
    with pytest.raises(ConfigError, match="method.teacher_layer='nope'"):
        FitNet("features.5", "nope").setup(make_ctx(student, teacher))


def test_single_teacher_only():
    student, teacher = models()
    with pytest.raises(ConfigError, match="exactly 1 teacher"):
        FitNet("features.5", "features.5").check(student, (teacher, teacher))
    with pytest.raises(ConfigError, match="exactly 1 teacher"):
        FitNet("features.5", "features.5").setup(FakeContext(student, (teacher, teacher)))


@pytest.mark.parametrize("teacher_name,student_name", [
    ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
    ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"),
    ("resnet32x4", "shufflenetv2"), ("resnet32x4", "mobilenetv2")])
def test_auto_layers_fit_every_cifar100_pair(teacher_name, student_name):
    """The yaml default (auto) picks each model's middle stage: layer2 of the 3-stage
    families, layer3 of the 5-stage VGGs, layer4 of the 7-stage MobileNetV2; the probed
    features align and the regressor maps the student's onto the teacher's."""
    method = FitNet()
    student = build_model(student_name, 100, (3, 32, 32))
    teacher = build_model(teacher_name, 100, (3, 32, 32))
    method.check(student, [teacher])
    expected = {"vgg8": "layer3", "vgg13": "layer3", "mobilenetv2": "layer4"}  # 5, 7 stages
    assert method.student_layer == expected.get(student_name, "layer2")
    assert method.teacher_layer == expected.get(teacher_name, "layer2")
    f_s = probe_feature(student, method.student_layer, (3, 32, 32))
    f_t = probe_feature(teacher, method.teacher_layer, (3, 32, 32))
    f_s, f_t = align_features(f_s, f_t)
    regressor = make_regressor(f_s, f_t).train()
    assert regressor(f_s).shape == f_t.shape


@pytest.mark.parametrize("student,teacher,layers", [
    ("cnn_small", "cnn", ("features.2", "features.2")),
    ("mlp_small", "mlp_large", ("body.2", "body.2")),
    ("mlp", "cnn", ("body.2", "features.2"))])
def test_auto_layers_of_the_small_models(student, teacher, layers):
    shape = (14,) if student.startswith("mlp_") else (1, 8, 8)
    method = FitNet()
    method.check(build_model(student, 10, shape), [build_model(teacher, 10, shape)])
    assert (method.student_layer, method.teacher_layer) == layers
