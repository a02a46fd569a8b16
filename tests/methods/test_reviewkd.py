"""ReviewKD: the review path (ABF fusion, deepest first) and HCL against an independent float64
implementation, the warm-up state, ABFs restored from a checkpoint, bf16, stage matching for
every CIFAR-100 pair and the small models, gradients into the student and the ABFs only."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.context import FakeContext, trainable_pair
from torch import nn

from kdlab.errors import ConfigError
from kdlab.methods.base import Outputs
from kdlab.methods.reviewkd import ABF, ReviewKD
from kdlab.models import build_model
from kdlab.teachers import forward_with_features

P = "penultimate"
CIFAR_PAIRS = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
               ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"),
               ("resnet32x4", "shufflenetv2"), ("resnet32x4", "mobilenetv2")]


# -- an independent float64 implementation ----------------------------------------------------
def ref_bn(x, bn):
    """Training-mode BatchNorm2d: batch statistics, biased variance."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    w, b = bn.weight.double().view(1, -1, 1, 1), bn.bias.double().view(1, -1, 1, 1)
    return (x - mean) / torch.sqrt(var + bn.eps) * w + b


def ref_conv(x, conv):
    """A convolution by loops over output positions (stride 1, zero padding)."""
    w = conv.weight.double()
    pad = conv.padding[0]
    k = w.shape[2]
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    b, _, h, wd = x.shape
    out = torch.zeros(b, w.shape[0], h - k + 1, wd - k + 1, dtype=torch.float64)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            patch = x[:, :, i:i + k, j:j + k]
            out[:, :, i, j] = torch.einsum("bckl,ockl->bo", patch, w)
    if conv.bias is not None:
        out = out + conv.bias.double().view(1, -1, 1, 1)
    return out


def ref_nearest(x, size):
    """Nearest resize: output row i reads input row floor(i * in / out)."""
    rows = [math.floor(i * x.shape[2] / size[0]) for i in range(size[0])]
    cols = [math.floor(j * x.shape[3] / size[1]) for j in range(size[1])]
    return x[:, :, rows][:, :, :, cols]


def ref_abf(abf, x, deeper, out_size):
    x = ref_bn(ref_conv(x, abf.reduce[0]), abf.reduce[1])
    if deeper is not None:
        deeper = ref_nearest(deeper, x.shape[2:])
        z = ref_conv(torch.cat([x, deeper], 1), abf.attention[0])
        a = 1 / (1 + torch.exp(-z))
        x = x * a[:, 0:1] + deeper * a[:, 1:2]
    if tuple(x.shape[2:]) != tuple(out_size):
        x = ref_nearest(x, out_size)
    return ref_bn(ref_conv(x, abf.output[0]), abf.output[1]), x


def ref_pool(x, level):
    h = x.shape[2] // level
    return torch.stack([torch.stack([x[:, :, i * h:(i + 1) * h, j * h:(j + 1) * h].mean((2, 3))
                                     for j in range(level)], -1) for i in range(level)], -2)


def ref_hcl(r, f):
    loss, weight, total = ((r - f) ** 2).mean(), 1.0, 1.0
    for level in (4, 2, 1):
        if level < r.shape[2]:
            weight /= 2
            loss = loss + weight * ((ref_pool(r, level) - ref_pool(f, level)) ** 2).mean()
            total += weight
    return loss / total


# -- a hand-built ReviewKD over three stages --------------------------------------------------
def built_method(seed=0, **kwargs):
    """Student maps (2 ch, 4x4), (3 ch, 2x2), penultimate 4; teacher (5 ch, 8x8), (2 ch, 2x2),
    penultimate 6: the shallow ABF must resize 4x4 -> 8x8."""
    torch.manual_seed(seed)
    method = ReviewKD(student_layers=["a", "b"], teacher_layers=["x", "y"], **kwargs)
    method.layers = {"student": ["a", "b"], "teacher": ["x", "y"]}
    method.abfs = nn.ModuleList([ABF(2, 4, 5, True), ABF(3, 4, 2, True), ABF(4, 4, 6, False)])
    method.out_sizes = torch.tensor([[8, 8], [2, 2], [1, 1]])
    with torch.no_grad():
        for m in method.abfs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return method


def outputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = {"a": torch.randn(3, 2, 4, 4, generator=g), "b": torch.randn(3, 3, 2, 2, generator=g),
         P: torch.randn(3, 4, generator=g)}
    t = {"x": torch.randn(3, 5, 8, 8, generator=g), "y": torch.randn(3, 2, 2, 2, generator=g),
         P: torch.randn(3, 6, generator=g)}
    logits = torch.randn(3, 7, generator=g)
    cast = {k: v.to(dtype) for k, v in s.items()}
    return Outputs(logits.to(dtype), cast), Outputs(torch.zeros(3, 7), t)


def ref_review_loss(method, student, teacher):
    maps = [student.features["a"], student.features["b"], student.features[P][:, :, None, None]]
    maps = [m.double() for m in maps]
    targets = [teacher.features["x"], teacher.features["y"], teacher.features[P][:, :, None, None]]
    sizes = [(8, 8), (2, 2), (1, 1)]
    results, deeper = [None] * 3, None
    for j in (2, 1, 0):
        results[j], deeper = ref_abf(method.abfs[j], maps[j], deeper, sizes[j])
    return sum(ref_hcl(r, f.double()) for r, f in zip(results, targets, strict=True)).item()


def test_loss_matches_an_independent_implementation():
    method = built_method(weight=5.0, warmup_epochs=20, ce_weight=0.5)
    method.epoch.fill_(8)  # warm-up 8 / 20
    student, teacher = outputs()
    terms = method.loss_terms(student, [teacher], {"target": torch.tensor([0, 1, 2])})
    assert set(terms) == {"ce", "reviewkd"}
    expected = 5.0 * 0.4 * ref_review_loss(method, student, teacher)
    assert terms["reviewkd"].item() == pytest.approx(expected, rel=1e-4)
    z = student.logits.double()
    ce = (torch.logsumexp(z, 1) - z[range(3), [0, 1, 2]]).mean().item()
    assert terms["ce"].item() == pytest.approx(0.5 * ce, rel=1e-5)


def test_hcl_skips_pyramid_levels_at_least_as_large_as_the_map():
    """On 2x2 maps only the 1x1 level is added, on 1x1 maps none: HCL of 1x1 maps is their
    MSE."""
    method = built_method()
    student, teacher = outputs()
    r = torch.randn(3, 6, 1, 1)
    from kdlab.methods.reviewkd import hcl
    assert hcl(r, teacher.features[P][:, :, None, None]).item() == pytest.approx(
        ((r.double() - teacher.features[P].double()[:, :, None, None]) ** 2).mean().item(),
        rel=1e-6)
    two = torch.randn(3, 2, 2, 2)
    expected = ref_hcl(two.double(), teacher.features["y"].double()).item()
    assert hcl(two, teacher.features["y"]).item() == pytest.approx(expected, rel=1e-6)
    assert method.warmup_factor().item() == 0.0  # epoch 0: no review loss yet


def test_warmup_is_epoch_state_saved_and_restored():
    method = built_method(warmup_epochs=20)
    for current_epoch, factor in [(0, 0.0), (5, 0.25), (20, 1.0), (90, 1.0)]:
        method.on_train_epoch_start(FakeContext(nn.Identity(), current_epoch=current_epoch))
        assert method.warmup_factor().item() == pytest.approx(factor)
    fresh = ReviewKD(student_layers=["a", "b"], teacher_layers=["x", "y"])
    fresh.load_state_dict(method.state_dict())  # before setup: ABFs rebuilt from the shapes
    assert int(fresh.epoch) == 90
    assert torch.equal(fresh.out_sizes, method.out_sizes)
    fresh.layers = method.layers
    student, teacher = outputs()
    batch = {"target": torch.tensor([0, 1, 2])}
    a = method.loss_terms(student, [teacher], batch)["reviewkd"]
    b = fresh.loss_terms(student, [teacher], batch)["reviewkd"]
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_one_class_batch_and_bf16_features():
    method = built_method()
    method.epoch.fill_(20)
    student, teacher = outputs(dtype=torch.bfloat16)
    terms = method.loss_terms(student, [teacher], {"target": torch.full((3,), 6)})
    assert terms["reviewkd"].dtype == torch.float32 and terms["ce"].dtype == torch.float32
    expected = 5.0 * ref_review_loss(method, student, teacher)
    assert terms["reviewkd"].item() == pytest.approx(expected, rel=1e-4)
    z = student.logits.double()
    ce = (torch.logsumexp(z, 1) - z[:, 6]).mean().item()
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)


def test_very_confident_teacher_features():
    method = built_method()
    method.epoch.fill_(20)
    student, teacher = outputs()
    teacher.features["y"] = teacher.features["y"] * 1e3
    terms = method.loss_terms(student, [teacher], {"target": torch.tensor([0, 1, 2])})
    assert terms["reviewkd"].item() == pytest.approx(
        5.0 * ref_review_loss(method, student, teacher), rel=1e-4)


@pytest.mark.parametrize("teacher_name,student_name", CIFAR_PAIRS)
def test_every_cifar100_pair_builds_abfs_that_meet_the_teacher_maps(teacher_name, student_name):
    """Probed at 16x16 for speed (the stage grouping of 32x32 images, every map half the
    size): one ABF per matched stage plus the penultimate, outputs shaped like the teacher's."""
    student = build_model(student_name, 100, (3, 32, 32))
    teacher = build_model(teacher_name, 100, (3, 32, 32))
    method = ReviewKD()
    ctx = FakeContext(student, (teacher,), num_classes=100, input_shape=(3, 16, 16))
    method.setup(ctx)
    assert method.student_features[-1] == P and method.teacher_features[-1] == P
    n = len(method.student_features)
    assert n == len(method.teacher_features) == len(method.abfs) == (5 if "vgg" in student_name
                                                                      else 4)
    assert [a.attention is not None for a in method.abfs] == [True] * (n - 1) + [False]
    x = torch.randn(2, 3, 16, 16)
    s = forward_with_features(student.eval(), x, method.student_features)
    t = ctx.teacher_outputs(x, method.teacher_features)[0]
    from kdlab.methods.reviewkd import as_map
    reviewed = method.review([as_map(s.features[p]) for p in method.student_features])
    for r, p in zip(reviewed, method.teacher_features, strict=True):
        assert r.shape == as_map(t.features[p]).shape


@pytest.mark.parametrize("student_name,teacher_name", [("cnn_small", "cnn"),
                                                       ("mlp_small", "mlp_large")])
def test_small_models_work_or_fail_in_one_line(student_name, teacher_name):
    shape = (1, 8, 8) if student_name.startswith("cnn") else (14,)
    student, teacher = build_model(student_name, 10, shape), build_model(teacher_name, 10, shape)
    method = ReviewKD()
    if student_name.startswith("mlp"):
        with pytest.raises(ConfigError, match="reviewkd needs \\(B, C, H, W\\) feature maps"):
            method.check(student, [teacher])
        return
    method.setup(FakeContext(student, (teacher,), input_shape=shape))
    assert method.student_features == ("features.2", "features.5", P)
    assert [tuple(s) for s in method.out_sizes.tolist()] == [(8, 8), (4, 4), (1, 1)]


def test_gradients_reach_student_and_abfs_never_the_teacher():
    student, teacher = trainable_pair()
    method = ReviewKD(warmup_epochs=0)
    ctx = FakeContext(student, (teacher,))
    method.setup(ctx)
    method.setup(ctx)  # idempotent
    x = torch.randn(4, 1, 8, 8)
    terms = method(forward_with_features(student, x, method.student_features),
                   ctx.teacher_outputs(x, method.teacher_features), {"target": torch.arange(4)})
    terms["reviewkd"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert {id(p) for p in method.extra_parameters()} == {id(p) for p in method.abfs.parameters()}
    assert all(p.grad is not None for p in method.extra_parameters())
    assert student.features[0].weight.grad.abs().sum() > 0
