"""One weight initialisation for the CIFAR model zoo (kdlab/models/shared.py): what it does to
each kind of layer, and that every CIFAR architecture initialises exactly as before the
five per-family copies became one helper."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdlab.models import build_model
from kdlab.models.shared import init_cifar_weights

# (sum, sum of squares) over every tensor of the state dict (parameters and BN buffers, in
# float64) of build_model(name, 10, shape) right after torch.manual_seed(0), shape (1, 28, 28)
# for vgg6/vgg7/vgg7x4 and (3, 32, 32) otherwise. Recorded by running exactly this
# computation on main at fa6e667, where each model file still had its own _init_weights.
# A family initialised differently (another classifier init, conv biases left at their
# default, one more or one fewer random draw) moves the sums by far more than the tolerance.
RECORDED = {
    "resnet8": (654.8317659402408, 1126.0508907920087),
    "resnet14": (1134.5105633646485, 2022.4623369802564),
    "resnet20": (1509.8666293986194, 2918.056124947408),
    "resnet32": (2420.2135174752416, 4709.863163893035),
    "resnet44": (3306.316143764413, 6498.461134372169),
    "resnet56": (4235.071078707854, 8290.101373406955),
    "resnet110": (8288.915586329713, 16374.018197221445),
    "resnet8x4": (2807.049668234484, 4552.179644497639),
    "resnet32x4": (9905.861413587569, 18900.342310349974),
    "wrn_16_1": (942.567504277849, 1830.400376290059),
    "wrn_16_2": (1824.0006212164733, 3614.0353334183574),
    "wrn_40_1": (2669.2700724915135, 5420.37454017169),
    "wrn_40_2": (5362.918899054962, 10795.328978820442),
    "mobilenetv2": (18378.942665839102, 27037.08786313243),
    "shufflenetv1": (23818.360449770367, 30262.955672247423),
    "shufflenetv2": (16174.01957082729, 26177.372898267175),
    "vgg8": (2986.5979437083415, 4871.630110309761),
    "vgg11": (5476.992999715919, 9992.531445657842),
    "vgg13": (5838.166530165216, 10762.007961056244),
    "vgg16": (8511.086952142536, 15880.428622625768),
    "vgg19": (10995.026356845474, 21000.261647925076),
    "vgg6": (189.87445844898775, 353.7313742185687),
    "vgg7": (217.7049307420025, 386.2978515884625),
    "vgg7x4": (847.3719343288863, 1537.4255931002895),
}


@pytest.mark.parametrize("name", list(RECORDED))
def test_every_cifar_model_initialises_as_before(name):
    torch.manual_seed(0)
    shape = (1, 28, 28) if name in ("vgg6", "vgg7", "vgg7x4") else (3, 32, 32)
    state = build_model(name, 10, shape).state_dict().values()
    total = sum(float(t.double().sum()) for t in state)
    squares = sum(float(t.double().pow(2).sum()) for t in state)
    assert (total, squares) == pytest.approx(RECORDED[name], rel=1e-9)


def layers() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(8, 64, 3), nn.BatchNorm2d(64), nn.Flatten(),
                         nn.Linear(400, 300))


def test_each_kind_of_layer_gets_its_initialisation():
    torch.manual_seed(0)
    conv, bn, _, linear = model = layers()
    with torch.no_grad():  # make the defaults visible: nothing below may keep these
        bn.weight.fill_(3.0)
        bn.bias.fill_(3.0)
        conv.bias.fill_(3.0)
    init_cifar_weights(model, linear_std=0.01, zero_linear_bias=True)
    # He normal, fan_out: std = sqrt(2 / (out_channels * k * k)) = sqrt(2 / 576)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.03)
    assert conv.weight.mean().abs().item() < 0.003
    assert torch.equal(conv.bias, torch.zeros(64))
    assert torch.equal(bn.weight, torch.ones(64)) and torch.equal(bn.bias, torch.zeros(64))
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert torch.equal(linear.bias, torch.zeros(300))


def test_the_classifier_keeps_pytorch_defaults_unless_asked():
    torch.manual_seed(0)
    model = layers()
    default_weight = model[3].weight.detach().clone()
    default_bias = model[3].bias.detach().clone()
    init_cifar_weights(model)
    assert torch.equal(model[3].weight, default_weight) and torch.equal(model[3].bias,
                                                                         default_bias)
    init_cifar_weights(model, zero_linear_bias=True)  # the WRNs: only the bias
    assert torch.equal(model[3].weight, default_weight)
    assert torch.equal(model[3].bias, torch.zeros(300))
