"""AT: attention maps and their loss against float64 loops (with pooling of the larger map),
dead feature maps, bf16, the stages chosen for every CIFAR-100 pair and the small models,
the one-line error for MLPs, gradients into the student only."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.context import FakeContext, trainable_pair

from kdlab.errors import ConfigError
from kdlab.methods.at import AT
from kdlab.methods.base import Outputs
from kdlab.models import build_model
from kdlab.teachers import forward_with_features

CIFAR_PAIRS = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
               ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"),
               ("resnet32x4", "shufflenetv2"), ("resnet32x4", "mobilenetv2")]


def ref_attention(f):
    """Per example: q_k = mean_c f_ck^2 over positions k (row-major), divided by |q|."""
    f = f.double().tolist()
    maps = []
    for example in f:
        channels, h, w = len(example), len(example[0]), len(example[0][0])
        q = [sum(example[c][i][j] ** 2 for c in range(channels)) / channels
             for i in range(h) for j in range(w)]
        norm = math.sqrt(sum(v * v for v in q))
        maps.append([v / max(norm, 1e-12) for v in q])
    return maps


def ref_pool_2x2(f):
    """Average over non-overlapping 2x2 windows, by loops."""
    b, c, h, w = f.shape
    out = torch.zeros(b, c, h // 2, w // 2, dtype=torch.float64)
    for i in range(h // 2):
        for j in range(w // 2):
            out[:, :, i, j] = f[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].double().sum((2, 3)) / 4
    return out


def ref_at(f_s, f_t):
    a_s, a_t = ref_attention(f_s), ref_attention(f_t)
    diffs = [(x - y) ** 2 for rs, rt in zip(a_s, a_t, strict=True)
             for x, y in zip(rs, rt, strict=True)]
    return sum(diffs) / len(diffs)


def maps(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"s1": torch.randn(3, 2, 4, 4, generator=g), "t1": torch.randn(3, 5, 8, 8, generator=g),
            "s2": torch.randn(3, 4, 2, 2, generator=g), "t2": torch.randn(3, 3, 2, 2, generator=g)}


def terms_for(method, f, y=None, logits=None):
    y = torch.arange(3) if y is None else y
    logits = torch.zeros(3, 4) if logits is None else logits
    student = Outputs(logits, {"a": f["s1"], "b": f["s2"]})
    teacher = Outputs(torch.zeros(3, 4), {"x": f["t1"], "y": f["t2"]})
    return method.loss_terms(student, [teacher], {"target": y})


def explicit_at(**kwargs):
    method = AT(student_layers=["a", "b"], teacher_layers=["x", "y"], **kwargs)
    method.layers = {"student": ["a", "b"], "teacher": ["x", "y"]}  # what setup() resolves
    return method


def test_loss_matches_the_formula_with_pooling():
    f = maps()
    terms = terms_for(explicit_at(beta=1000.0, ce_weight=0.5), f)
    assert set(terms) == {"ce", "at"}
    expected = ref_at(f["s1"], ref_pool_2x2(f["t1"])) + ref_at(f["s2"], f["t2"])
    assert terms["at"].item() == pytest.approx(1000 * expected, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.5 * math.log(4), rel=1e-6)


def test_attention_ignores_channel_count_and_feature_scale():
    """a(f) is a normalised spatial map: scaling a feature by 7 changes nothing."""
    f = maps()
    g = {**f, "t1": f["s1"].repeat_interleave(2, 2).repeat_interleave(2, 3) * 7.0,
         "t2": f["s2"] * 7.0}
    assert terms_for(explicit_at(), g)["at"].item() == pytest.approx(0.0, abs=1e-6)


def test_dead_feature_maps_and_one_class_batch():
    """A map of zeros (dead ReLUs) has a zero attention vector, not NaN; labels only enter
    the CE."""
    f = {**maps(), "s2": torch.zeros(3, 4, 2, 2)}
    y = torch.full((3,), 2)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 3)
    terms = terms_for(explicit_at(), f, y=y, logits=logits)
    a_t = ref_attention(f["t2"])
    dead = sum(v * v for row in a_t for v in row) / 12  # |0 - a_t|^2 over 3 x 4 entries
    expected = ref_at(f["s1"], ref_pool_2x2(f["t1"])) + dead
    assert terms["at"].item() == pytest.approx(1000 * expected, rel=1e-5)
    ce = math.log(sum(math.exp(v) for v in (0, 1, 2, 3))) - 2.0
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)


def test_very_confident_teacher_features():
    """One huge activation in the teacher: its attention is ~one-hot, the loss still exact."""
    f = maps()
    f["t2"] = f["t2"].clone()
    f["t2"][:, :, 0, 0] = 1e4
    terms = terms_for(explicit_at(), f)
    expected = ref_at(f["s1"], ref_pool_2x2(f["t1"])) + ref_at(f["s2"], f["t2"])
    assert terms["at"].item() == pytest.approx(1000 * expected, rel=1e-5)


def test_bf16_features_are_cast():
    f = {k: v.bfloat16() for k, v in maps().items()}
    terms = terms_for(explicit_at(), f, logits=torch.zeros(3, 4, dtype=torch.bfloat16))
    expected = ref_at(f["s1"], ref_pool_2x2(f["t1"])) + ref_at(f["s2"], f["t2"])
    assert terms["at"].dtype == torch.float32 and terms["ce"].dtype == torch.float32
    assert terms["at"].item() == pytest.approx(1000 * expected, rel=1e-4)


@pytest.mark.parametrize("teacher_name,student_name", CIFAR_PAIRS)
def test_auto_stages_for_every_cifar100_pair(teacher_name, student_name):
    """auto: the last stage at each resolution, the deepest 4, matched between the two.
    Probed at 16x16 to keep the test fast: every stage halves or keeps the resolution, so the
    grouping is the one of 32x32 CIFAR images."""
    student = build_model(student_name, 100, (3, 32, 32))
    teacher = build_model(teacher_name, 100, (3, 32, 32))
    method = AT()
    method.setup(FakeContext(student, (teacher,), num_classes=100, input_shape=(3, 16, 16)))
    expected = {"vgg8": ["layer2", "layer3", "layer4", "layer5"],
                "vgg13": ["layer2", "layer3", "layer4", "layer5"],
                "mobilenetv2": ["layer3", "layer5", "layer7"]}  # matched to a 3-stage teacher
    three = ["layer1", "layer2", "layer3"]
    assert method.layers["student"] == expected.get(student_name, three)
    assert method.layers["teacher"] == expected.get(teacher_name, three)


@pytest.mark.parametrize("student_name,teacher_name,kind", [
    ("cnn_small", "cnn", "image"), ("mlp_small", "mlp_large", "vector"),
    ("mlp_small", "cnn", "image")])
def test_small_models_work_or_fail_in_one_line(student_name, teacher_name, kind):
    shape = (1, 8, 8) if kind == "image" else (14,)
    student = build_model(student_name, 10, shape)
    teacher = build_model(teacher_name, 10, shape)
    method = AT()
    if student_name.startswith("mlp"):
        with pytest.raises(ConfigError, match="needs \\(B, C, H, W\\) feature maps, but the "
                                              "student MLP has no convolutional stages") as e:
            method.check(student, [teacher])
        assert "\n" not in str(e.value)
        return
    method.setup(FakeContext(student, (teacher,), input_shape=shape))
    assert method.layers == {"student": ["features.2", "features.5"],
                             "teacher": ["features.2", "features.5"]}


def test_explicit_layers_must_exist_and_pair_up():
    student, teacher = build_model("cnn", 10, (1, 8, 8), width=4), build_model("cnn", 10,
                                                                               (1, 8, 8))
    with pytest.raises(ConfigError, match="method.student_layers: no module 'layer9'"):
        AT(student_layers=["layer9"], teacher_layers=["features.2"]).check(student, [teacher])
    with pytest.raises(ConfigError, match="must pair up, got 1 and 2"):
        AT(student_layers=["features.2"],
           teacher_layers=["features.2", "features.5"]).check(student, [teacher])
    with pytest.raises(ConfigError, match="student_layers: a \\(B, C, H, W\\) feature map is "
                                          "needed; layer 'features.7' gives \\(B, 8\\)"):
        AT(student_layers=["features.7"], teacher_layers=["features.5"]).setup(
            FakeContext(student, (teacher,)))


def test_gradients_reach_the_student_never_the_teacher():
    student, teacher = trainable_pair()
    method = AT()
    ctx = FakeContext(student, (teacher,))
    method.setup(ctx)
    x = torch.randn(4, 1, 8, 8)
    terms = method(forward_with_features(student, x, method.student_features),
                   ctx.teacher_outputs(x, method.teacher_features), {"target": torch.arange(4)})
    terms["at"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    first_conv = student.features[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert method.extra_parameters() == []
