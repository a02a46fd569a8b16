"""The ImageNet students and teachers: MobileNetV1 against the paper's layer table (hand
count of its multiply-adds), torchvision's ResNets against the metadata of their pretrained
weights (no download), timm models by name (skipped without timm)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kdlab.errors import ConfigError
from kdlab.models import build_model, count_parameters
from kdlab.models.features import find_classifier


def mobilenetv1_macs_by_hand() -> int:
    """Howard et al. 2017, Table 1 at 224x224, written out row by row: (input channels,
    output channels, output side) of each depthwise-separable block after the stem."""
    stem = 112 * 112 * (3 * 3 * 3) * 32
    blocks = [(32, 64, 112), (64, 128, 56), (128, 128, 56), (128, 256, 28), (256, 256, 28),
              (256, 512, 14)] + [(512, 512, 14)] * 5 + [(512, 1024, 7), (1024, 1024, 7)]
    separable = sum(side * side * (3 * 3 * cin + cin * cout) for cin, cout, side in blocks)
    return stem + separable + 1024 * 1000  # + the classifier


def test_mobilenetv1_has_the_papers_569m_multiply_adds_and_4_2m_parameters():
    model = build_model("mobilenetv1", 1000, (3, 224, 224)).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        logits = model(torch.zeros(1, 3, 224, 224))
    assert logits.shape == (1, 1000)
    macs = counter.get_total_flops() // 2  # torch counts a multiply-add as 2 FLOPs
    assert macs == mobilenetv1_macs_by_hand()
    assert abs(macs - 569e6) / 569e6 < 0.01  # the paper's Table 2: 569 M mult-adds
    # 3x3x3x32 stem, per block 3x3 depthwise + 1x1 pointwise weights, BN scale and shift
    # after every conv, the classifier: the paper's 4.2 M
    params = (27 * 32 + 2 * 32) + sum(9 * cin + 2 * cin + cin * cout + 2 * cout for cin, cout in
                                      [(32, 64), (64, 128), (128, 128), (128, 256),
                                       (256, 256), (256, 512)] + [(512, 512)] * 5
                                      + [(512, 1024), (1024, 1024)]) + 1024 * 1000 + 1000
    assert count_parameters(model) == params
    assert round(params / 1e6, 1) == 4.2
    assert find_classifier(model)[0] == "classifier"


@pytest.mark.parametrize("arch,weights", [("tv_resnet18", "ResNet18_Weights.IMAGENET1K_V1"),
                                          ("tv_resnet34", "ResNet34_Weights.IMAGENET1K_V1"),
                                          ("tv_resnet50", "ResNet50_Weights.IMAGENET1K_V1")])
def test_torchvision_teachers_fit_their_pretrained_weights(arch, weights):
    """The `tv:` spec names a weights enum whose metadata matches the model kdlab builds
    (the weights themselves are not downloaded here)."""
    import torchvision

    enum = torchvision.models.get_weight(weights)
    model = build_model(arch, 1000, (3, 224, 224))
    assert count_parameters(model) == enum.meta["num_params"]
    assert len(enum.meta["categories"]) == 1000


def test_timm_models_are_built_by_name():
    timm = pytest.importorskip("timm", reason="timm is an optional extra: "
                                              "pip install 'kdlab[timm]'")
    model = build_model({"_target_": "kdlab.models.timm_models.timm_model",
                         "model_name": "resnet18"}, 7, (3, 64, 64)).eval()
    reference = timm.create_model("resnet18", num_classes=7)
    assert count_parameters(model) == count_parameters(reference)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    with pytest.raises(ConfigError, match="unknown timm model 'nope'"):
        build_model({"_target_": "kdlab.models.timm_models.timm_model", "model_name": "nope"},
                    7)
