"""FitNet: the regressor built by probing shapes (the CRD code's ConvReg: each spatial case,
BN, ReLU), the hint MSE by hand, pooling on size mismatch, gradients into the student and
the regressor only."""

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
    conv, norm, relu = method.regressor  # ConvReg: conv (with bias), BN, ReLU
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is not None
    assert (conv.in_channels, conv.out_channels) == (16, 64)
    assert isinstance(norm, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
    assert not method.pool_maps  # equal sizes: nothing to pool
    assert torch.equal(bn.running_mean, running) and student.training
    regressor = method.regressor
    method.setup(make_ctx(student, teacher))  # idempotent
    assert method.regressor is regressor
    assert {id(p) for p in method.extra_parameters()} == {id(p) for p in regressor.parameters()}
    no_relu = FitNet("features.5", "features.5", regressor_relu=False)
    no_relu.setup(make_ctx(student, teacher))
    assert [type(m) for m in no_relu.regressor] == [nn.Conv2d, nn.BatchNorm2d]


# -- hand formulas (float64 numpy) for the regressor's layers ---------------------------------


def conv2d_by_hand(x, w, b, stride=1, pad=0):
    """x (B, C, H, W), w (O, C, kh, kw): out[b, o, i, j] = b_o + sum_{c, u, v}
    w[o, c, u, v] * x_padded[b, c, i * stride + u, j * stride + v]."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    rows, cols = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], rows, cols))
    for i in range(rows):
        for j in range(cols):
            patch = x[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
            out[:, :, i, j] = np.einsum("bcuv,ocuv->bo", patch, w)
    return out + b[None, :, None, None]


def conv_transpose2d_by_hand(x, w, b, stride, pad):
    """x (B, C, H, W), w (C, O, kh, kw): every input pixel (i, j) adds w[c] * x[b, c, i, j]
    to the output window at (i * stride, j * stride); ``pad`` rows/columns are cut from each
    border."""
    kh, kw = w.shape[2:]
    h, wd = x.shape[2:]
    full = np.zeros((x.shape[0], w.shape[1], (h - 1) * stride + kh, (wd - 1) * stride + kw))
    for i in range(h):
        for j in range(wd):
            full[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw] += np.einsum(
                "bc,couv->bouv", x[:, :, i, j], w)
    return full[:, :, pad:full.shape[2] - pad, pad:full.shape[3] - pad] + b[None, :, None, None]


def batchnorm_train_by_hand(x, gamma, shift, eps=1e-5):
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))  # biased variance, as BN
    x = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + eps)
    return x * gamma[None, :, None, None] + shift[None, :, None, None]


def randomise_bn(regressor, g):
    with torch.no_grad():
        regressor[1].weight.uniform_(0.5, 1.5, generator=g)
        regressor[1].bias.uniform_(-1, 1, generator=g)


def numpy_params(regressor):
    conv, bn = regressor[0], regressor[1]
    return [p.detach().double().numpy() for p in (conv.weight, conv.bias, bn.weight, bn.bias)]


@pytest.mark.parametrize("relu", [True, False])
def test_hint_is_mse_of_regressed_student_feature_by_hand(relu):
    g = torch.Generator().manual_seed(0)
    f_s, f_t = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 6, 5, 5, generator=g)
    method = FitNet("a", "b", beta=100.0, ce_weight=0.5, regressor_relu=relu)
    method.regressor, method.pool_maps = make_regressor(f_s, f_t, relu=relu)
    randomise_bn(method.regressor, g)
    logits, y = torch.randn(4, 10, generator=g), torch.tensor([1, 2, 3, 4])
    teacher = Outputs(torch.zeros(4, 10), {"b": f_t})
    terms = method.loss_terms(Outputs(logits, {"a": f_s}), [teacher], {"target": y})
    assert set(terms) == {"ce", "hint"}
    w, b, gamma, shift = numpy_params(method.regressor)
    x = np.einsum("oc,bchw->bohw", w[:, :, 0, 0], f_s.double().numpy()) + b[None, :, None, None]
    x = batchnorm_train_by_hand(x, gamma, shift)
    if relu:
        x = np.maximum(x, 0.0)
    mse = np.mean((x - f_t.double().numpy()) ** 2)
    assert terms["hint"].item() == pytest.approx(100.0 * mse, rel=1e-4)
    z = logits.double().numpy()
    ce = np.mean([np.log(np.exp(z[i]).sum()) - z[i, y[i]] for i in range(4)])
    assert terms["ce"].item() == pytest.approx(0.5 * ce, rel=1e-5)


# student map size, teacher map size -> ConvReg's convolution (kernel, stride, padding,
# transposed) or kdlab's fallback (teacher pooled to the student's size, then 1x1)
SPATIAL_CASES = [
    ((8, 8), (4, 4), ((3, 3), (2, 2), (1, 1), False)),   # H_s = 2 H_t
    ((4, 4), (8, 8), ((4, 4), (2, 2), (1, 1), True)),    # 2 H_s = H_t
    ((7, 6), (4, 4), ((4, 3), (1, 1), (0, 0), False)),   # H_s >= H_t: (1+Hs-Ht)x(1+Ws-Wt)
    ((16, 16), (4, 4), ((13, 13), (1, 1), (0, 0), False)),  # 4x: a valid conv, not stride 2
    ((4, 4), (4, 4), ((1, 1), (1, 1), (0, 0), False)),
    ((2, 2), (8, 8), None),                              # ConvReg has none: the fallback
]


@pytest.mark.parametrize("s_size,t_size,expected", SPATIAL_CASES,
                         ids=[f"{s[0]}to{t[0]}" for s, t, _ in SPATIAL_CASES])
def test_regressor_resamples_like_convreg_by_hand(s_size, t_size, expected):
    g = torch.Generator().manual_seed(3)
    f_s = torch.randn(5, 3, *s_size, generator=g)
    f_t = torch.randn(5, 4, *t_size, generator=g)
    method = FitNet("a", "b", beta=1.0)
    method.regressor, method.pool_maps = make_regressor(f_s, f_t)
    randomise_bn(method.regressor, g)
    conv = method.regressor[0]
    w, b, gamma, shift = numpy_params(method.regressor)
    x_s, x_t = f_s.double().numpy(), f_t.double().numpy()
    if expected is None:
        assert method.pool_maps and conv.kernel_size == (1, 1)
        # the teacher's map pooled to the student's 2x2: means of its 4x4 blocks
        x_t = x_t.reshape(5, 4, 2, 4, 2, 4).mean(axis=(3, 5))
        x = conv2d_by_hand(x_s, w, b)
    else:
        kernel, stride, padding, transposed = expected
        assert not method.pool_maps
        assert isinstance(conv, nn.ConvTranspose2d) == transposed
        assert (conv.kernel_size, conv.stride, conv.padding) == (kernel, stride, padding)
        by_hand = conv_transpose2d_by_hand if transposed else conv2d_by_hand
        x = by_hand(x_s, w, b, stride[0], padding[0])
    assert x.shape == x_t.shape
    x = np.maximum(batchnorm_train_by_hand(x, gamma, shift), 0.0)
    hint = method.hint_loss(f_s, f_t)
    assert hint.item() == pytest.approx(np.mean((x - x_t) ** 2), rel=1e-5)


def test_spatial_pool_is_the_pooled_1x1_regressor():
    f_s, f_t = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    regressor, pool_maps = make_regressor(f_s, f_t, spatial="pool")
    assert pool_maps and regressor[0].kernel_size == (1, 1)
    with pytest.raises(ConfigError, match="method.spatial must be one of"):
        FitNet(spatial="resize")


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
    linear, relu = method.regressor
    assert isinstance(linear, nn.Linear) and isinstance(relu, nn.ReLU)
    assert (linear.in_features, linear.out_features) == (32, 64)
    # by hand: ReLU(W f_s + b) against the teacher's map averaged over its positions
    f_s, f_t = torch.randn(3, 32), torch.randn(3, 64, 2, 2)
    w, b = linear.weight.detach().double().numpy(), linear.bias.detach().double().numpy()
    x = np.maximum(f_s.double().numpy() @ w.T + b, 0.0)
    mse = np.mean((x - f_t.double().numpy().mean(axis=(2, 3))) ** 2)
    assert method.hint_loss(f_s, f_t).item() == pytest.approx(mse, rel=1e-5)


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
    regressor, pool_maps = make_regressor(f_s, f_t)
    f_s, f_t = align_features(f_s, f_t, pool_maps)
    assert regressor.train()(f_s).shape == f_t.shape
    # ConvReg's resampling where it has one (shufflenetv2's 8x8 map: a transposed conv up to
    # the 16x16 hint); mobilenetv2's 4x4 map against 16x16 falls back to pooling the hint
    assert pool_maps == (student_name == "mobilenetv2")
    assert isinstance(regressor[0], nn.ConvTranspose2d) == (student_name == "shufflenetv2")


@pytest.mark.parametrize("student,teacher,layers", [
    ("cnn_small", "cnn", ("features.2", "features.2")),
    ("mlp_small", "mlp_large", ("body.2", "body.2")),
    ("mlp", "cnn", ("body.2", "features.2"))])
def test_auto_layers_of_the_small_models(student, teacher, layers):
    shape = (14,) if student.startswith("mlp_") else (1, 8, 8)
    method = FitNet()
    method.check(build_model(student, 10, shape), [build_model(teacher, 10, shape)])
    assert (method.student_layer, method.teacher_layer) == layers
