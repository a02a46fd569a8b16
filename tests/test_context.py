"""The run context (kdlab.context.RunContext): every MethodContext member, served from the
running training; the one fake context of the method tests offers the same members."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from helpers.context import FakeContext
from helpers.runs import FAST, fit

from kdlab.config import compose
from kdlab.context import RunContext
from kdlab.data.digits import DigitsDataModule
from kdlab.methods.base import MethodContext

HELPERS = Path(__file__).resolve().parent / "helpers" / "conf"


def protocol_members() -> dict[str, object]:
    """MethodContext's members, as declared: read-only properties and methods."""
    return {name: value for name, value in vars(MethodContext).items()
            if not name.startswith("_")}


def test_the_protocol_declares_what_the_methods_read():
    members = protocol_members()
    assert len(members) == 24
    assert {"student", "teachers", "train_size", "total_steps", "current_lr", "run_dir",
            "noise_mask", "examples", "teacher_outputs", "clean_train_teacher_outputs",
            "precision_context", "all_gather", "log"} <= set(members)


@pytest.mark.parametrize("ctx", [RunContext(module=None), FakeContext(torch.nn.Identity())],
                         ids=["RunContext", "FakeContext"])
def test_both_contexts_provide_every_protocol_member(ctx):
    """Structurally (nothing is evaluated: the real context outside a run has no trainer)."""
    for name, declared in protocol_members().items():
        provided = inspect.getattr_static(ctx, name)  # AttributeError if missing
        if isinstance(declared, property):
            assert not inspect.isfunction(provided), f"{name} should be a value, not a method"
            continue
        assert inspect.isfunction(provided), f"{name} should be a method"
        expected = inspect.signature(declared).parameters
        got = inspect.signature(provided).parameters
        assert [(p.name, p.default) for p in got.values()] == [
            (p.name, p.default) for p in expected.values()], name
    assert not isinstance(ctx, torch.nn.Module)  # a method may keep it as an attribute


def test_a_run_serves_the_methods_its_own_facts(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))
    cfg = compose([*FAST, "trainer.max_epochs=1", "teacher.max_epochs=1", "seed=4",
                   "noise=symmetric", "noise.rate=0.3", "method=context_probe"], [HELPERS])
    module = fit(cfg, tmp_path / "run")
    seen = module.method.seen
    fit_start = seen["fit_start"]
    dm = DigitsDataModule(seed=4, noise={"type": "symmetric", "rate": 0.3})
    dm.setup()
    train, val = dm.splits["train"], dm.splits["val"]
    steps = len(train) // 64  # batches of 64, the last partial one dropped

    # the method kept the context as a plain attribute: no submodule, nothing in the state
    assert fit_start["same_ctx"] and module.method.ctx is module.context
    assert not any("ctx" in name for name, _ in module.method.named_modules())
    assert not any("ctx" in key for key in module.state_dict())
    assert {k: fit_start[k] for k in ("num_classes", "input_shape", "train_size",
                                      "batch_size", "max_epochs", "total_steps", "seed",
                                      "global_rank", "world_size", "is_global_zero",
                                      "run_dir", "current_epoch", "global_step")} == {
        "num_classes": 10, "input_shape": (1, 8, 8), "train_size": len(train),
        "batch_size": 64, "max_epochs": 1, "total_steps": steps, "seed": 4, "global_rank": 0,
        "world_size": 1, "is_global_zero": True, "run_dir": tmp_path / "run",
        "current_epoch": 0, "global_step": 0}
    assert fit_start["current_lr"] == pytest.approx(0.05)  # digits' recipe lr, epoch 1
    assert fit_start["device"] == torch.device("cpu")
    assert fit_start["student"] is module.student
    assert fit_start["teachers"] == module.teachers.models and len(fit_start["teachers"]) == 1
    # the noise mask marks exactly the train labels the noise changed
    assert torch.equal(fit_start["noise_mask"], train.targets != train.clean_targets)
    assert 0.2 < float(fit_start["noise_mask"].float().mean()) < 0.4
    # un-augmented examples of a split: its stored inputs and (noisy, for train) labels
    assert torch.equal(fit_start["val"]["input"], val.inputs)
    assert torch.equal(fit_start["val"]["target"], val.targets)
    index = torch.tensor([3, 1])
    assert torch.equal(fit_start["train"]["target"], train.targets[index])
    with torch.no_grad():
        expected = fit_start["teachers"][0](train.inputs[index])
    torch.testing.assert_close(fit_start["teacher_outputs"], expected)
    torch.testing.assert_close(fit_start["clean_train_teacher_outputs"], expected)
    torch.testing.assert_close(fit_start["all_gather"], torch.tensor([2.0, 5.0]))
    # progress as the hooks see it: the epoch starts at step 0, each step ends counted
    assert seen["epoch_start"] == (0, 0)
    assert seen["step_ends"] == list(range(1, steps + 1))
