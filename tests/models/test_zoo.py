"""The model zoo: parameter counts, shapes, the classifier contract, configs, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlab.errors import ConfigError
from kdlab.models import UnknownModelError, build_model, model_config, model_names
from kdlab.models.features import find_classifier

SMALL_MODELS = {"mlp", "mlp_small", "mlp_large", "cnn", "cnn_small"}

# Parameter counts (millions) for 100 classes as reported in the CIFAR-100 KD literature
# (CRD, Tian et al. 2020, and follow-ups).
PAPER_PARAMS_M = {
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_40_2": 2.26,
    "wrn_16_2": 0.70,
    "resnet56": 0.86,
    "resnet20": 0.28,
    "resnet110": 1.74,
}


def _input_shape(name: str) -> tuple[int, ...]:
    return (1, 8, 8) if name in SMALL_MODELS else (3, 64, 64) if name.startswith("tv_") \
        else (3, 32, 32)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_parameter_count_matches_paper(name):
    count = _num_params(build_model(name, 100))
    expected = PAPER_PARAMS_M[name] * 1e6
    assert abs(count - expected) / expected < 0.02, f"{name}: {count} parameters"


@pytest.mark.parametrize("name", model_names())
def test_every_model_config_builds_and_maps_a_batch_to_logits(name):
    if name == "timm":
        pytest.importorskip("timm", reason="timm is an optional extra: pip install 'kdlab[timm]'")
    torch.manual_seed(0)
    shape = _input_shape(name)
    model = build_model(name, 10, shape)
    _, head = find_classifier(model)  # `classifier`, or the last Linear (torchvision's fc)
    assert isinstance(head, nn.Linear) and head.out_features == 10
    with torch.no_grad():
        logits = model.eval()(torch.randn(2, *shape))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


def test_classifier_is_applied_last_to_pooled_features():
    model = build_model("resnet8", 10).eval()
    seen = {}
    model.classifier.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert seen["x"].shape == (2, model.classifier.in_features)
    assert torch.equal(seen["y"], logits)


@pytest.mark.parametrize("name", [n for n in model_names()
                                  if n not in SMALL_MODELS and not n.startswith("tv_")])
def test_hint_layers_are_named_layer1_to_layer3(name):
    if name == "timm":
        pytest.importorskip("timm", reason="timm is an optional extra: pip install 'kdlab[timm]'")
    model = build_model(name, 10).eval()
    features = {}
    for path in ("layer1", "layer2", "layer3"):
        module = model.get_submodule(path)
        module.register_forward_hook(lambda m, a, out, path=path: features.update({path: out}))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert all(features[p].dim() == 4 and features[p].shape[0] == 2 for p in features)
    assert len(features) == 3


def test_cifar_models_accept_other_channel_counts_and_sizes():
    model = build_model("resnet20", 10, (1, 28, 28)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ConfigError, match="image inputs.*MLP"):
        build_model("wrn_16_1", 10, (64,))


@pytest.mark.parametrize("net_size", [0.5, 1.0, 1.5, 2.0])
def test_shufflenetv2_sizes(net_size):
    model = build_model("shufflenetv2", 10, net_size=net_size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_model_lists_available_names():
    with pytest.raises(UnknownModelError) as info:
        build_model("nope", 10)
    message = str(info.value)
    assert "nope" in message
    for name in ("resnet8x4", "wrn_40_2", "mobilenetv2", "shufflenetv2", "vgg13"):
        assert name in message


def test_torchvision_models_by_name():
    model = build_model("tv_resnet18", 10, (3, 64, 64)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    with pytest.raises(ConfigError, match="unknown torchvision model 'xyz'"):
        build_model({"_target_": "kdlab.models.torchvision_models.torchvision_model",
                     "name": "xyz"}, 10)


def test_a_model_is_its_config_and_options_override_it():
    """Every model is a `_target_` config; the file name is its one name."""
    assert model_config("cnn_small")._target_ == model_config("cnn")._target_
    assert build_model("cnn_small", 10, (1, 8, 8)).classifier.in_features == 16  # width 8
    assert build_model("cnn", 10, (1, 8, 8), width=8).classifier.in_features == 16
    assert build_model("cnn", 10, (1, 8, 8)).classifier.in_features == 64  # width 32
    assert build_model("mlp_small", 20, (14,)).classifier.in_features == 60
    assert build_model("mlp_large", 20, (14,)).classifier.in_features == 80


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "vgg8", "mobilenetv2", "shufflenetv2",
                                  "cnn_small", "mlp"])
def test_penultimate_feature_is_the_classifier_input(name):
    from kdlab.models.features import FeatureHooks

    shape = _input_shape(name)
    model = build_model(name, 10, shape).eval()
    x = torch.randn(3, *shape)
    with torch.no_grad(), FeatureHooks(model, ["penultimate"]) as feats:
        logits = model(x)
    _, head = find_classifier(model)
    torch.testing.assert_close(head(feats["penultimate"]), logits)
    assert feats["penultimate"].shape == (3, head.in_features)


def _vgg_macs(stages: list[list[int]], in_channels: int = 1, size: int = 28,
              classes: int = 10) -> int:
    """Multiply-accumulates of a three-stage VGG by hand: 3x3 convs at full size in stage 1,
    each later stage after a 2x2 max-pool; the linear classifier on the pooled features."""
    macs, c = 0, in_channels
    for k, stage in enumerate(stages):
        side = size // 2**k
        for out in stage:
            macs += side * side * c * out * 9
            c = out
    return macs + c * classes


def test_the_fashion_mnist_student_has_under_an_eighth_of_the_teachers_flops():
    from torch.utils.flop_counter import FlopCounterMode

    counted = {}
    for name in ("vgg6", "vgg7x4"):
        model = build_model(name, 10, (1, 28, 28)).eval()
        with FlopCounterMode(display=False) as flops, torch.no_grad():
            model(torch.zeros(1, 1, 28, 28))
        counted[name] = flops.get_total_flops() // 2
    assert counted["vgg6"] == _vgg_macs([[8], [16, 16], [32, 32]])  # 1.41 M
    assert counted["vgg7x4"] == _vgg_macs([[32, 32], [64, 64], [128, 128]])  # 29.1 M
    assert counted["vgg6"] * 8 <= counted["vgg7x4"]
