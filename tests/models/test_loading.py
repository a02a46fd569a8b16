"""Teacher loading: formats, strict shape checks, safe (weights_only) reading, freezing."""

import pickle

import pytest
import torch
from torch import nn

from kdlab.errors import TeacherLoadError
from kdlab.models import build_model
from kdlab.models.loading import freeze, load_weights

SHAPE = (1, 8, 8)


def _model(classes=10, width=8):
    torch.manual_seed(0)
    return build_model("cnn", classes, SHAPE, width=width)


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values(), strict=True))


def test_plain_state_dict_and_prefixed_variants(tmp_path):
    src = _model()
    variants = [("", None), ("module.", None), ("model.", "state_dict")]
    for i, (key_prefix, wrap) in enumerate(variants):
        state = {key_prefix + k: v for k, v in src.state_dict().items()}
        path = tmp_path / f"w{i}.pt"
        torch.save({wrap: state} if wrap else state, path)
        torch.manual_seed(1)
        dst = build_model("cnn", 10, SHAPE, width=8)
        assert not _same(src, dst)
        load_weights(dst, str(path))
        assert _same(src, dst)


def test_kdlab_checkpoint_keeps_only_student_weights(tmp_path):
    src = _model()
    state = {f"student.{k}": v for k, v in src.state_dict().items()}
    state["method.mixing_weights"] = torch.ones(5, 2)  # method state must be ignored
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10}, path)
    dst = build_model("cnn", 10, SHAPE, width=8)
    load_weights(dst, str(path))
    assert _same(src, dst)


def test_mismatch_names_tensors_and_shapes(tmp_path):
    path = tmp_path / "ten.pt"
    torch.save(_model(classes=10).state_dict(), path)
    with pytest.raises(TeacherLoadError) as e:
        load_weights(_model(classes=100), str(path))
    msg = str(e.value)
    assert "classifier.weight" in msg and "(10, 16)" in msg and "(100, 16)" in msg
    assert "\n" not in msg
    with pytest.raises(TeacherLoadError, match="missing keys"):
        load_weights(build_model("mlp", 10, SHAPE), str(path))


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(TeacherLoadError, match="not found"):
        load_weights(_model(), str(tmp_path / "nope.pt"))
    good = tmp_path / "good.pt"
    torch.save(_model().state_dict(), good)
    data = good.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(TeacherLoadError, match="truncated or not a torch checkpoint"):
        load_weights(_model(), str(bad))


class _Payload:
    """Unpickling this would create a marker file: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_executing_pickle_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _model().state_dict(), "extra": _Payload(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(TeacherLoadError, match="allow_pickle"):
        load_weights(_model(), str(path))
    assert not marker.exists()
    # plain pickle files are refused the same way
    path2 = tmp_path / "evil.pkl"
    path2.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(TeacherLoadError):
        load_weights(_model(), str(path2))
    assert not marker.exists()


def test_torchvision_weights_by_name(monkeypatch):
    import torchvision

    src = build_model("tv_resnet18", 10, (3, 32, 32))

    class FakeWeights:
        def get_state_dict(self, progress=True, check_hash=True):
            return src.state_dict()

    seen = []
    monkeypatch.setattr(torchvision.models, "get_weight",
                        lambda name: seen.append(name) or FakeWeights())
    dst = build_model("tv_resnet18", 10, (3, 32, 32))
    load_weights(dst, "tv:ResNet18_Weights.IMAGENET1K_V1")
    assert seen == ["ResNet18_Weights.IMAGENET1K_V1"]
    assert _same(src, dst)


def test_freeze_means_eval_and_no_grad():
    m = freeze(_model())
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    x = torch.randn(4, *SHAPE, requires_grad=True)
    m(x).sum().backward()
    assert all(p.grad is None for p in m.parameters())
