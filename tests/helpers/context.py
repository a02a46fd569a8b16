"""``FakeContext``: the one stand-in for :class:`kdlab.methods.base.MethodContext` that every
method test uses (no Trainer, no DataModule)."""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdlab.methods.base import Outputs

_SCRATCH = tempfile.TemporaryDirectory(prefix="kdlab-fake-run-")


@dataclass
class FakeContext:
    student: nn.Module
    teachers: tuple[nn.Module, ...] = ()
    num_classes: int = 10
    input_shape: tuple[int, ...] = (1, 8, 8)
    # split -> (inputs, targets); "train" targets are the training labels
    data: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    batch_size: int = 8
    current_epoch: int = 0
    global_step: int = 0
    max_epochs: int = 4
    total_steps: int = 100
    current_lr: float = 0.1
    seed: int = 0
    device: torch.device = torch.device("cpu")
    global_rank: int = 0
    world_size: int = 1
    is_global_zero: bool = True
    # a scratch directory removed at exit: what a method writes there never lands in the repo
    run_dir: Path = field(default_factory=lambda: Path(_SCRATCH.name))
    noise_mask: Tensor | None = None
    logged: dict[str, Any] = field(default_factory=dict)

    @property
    def train_size(self) -> int:
        return len(self.data["train"][1]) if "train" in self.data else 16

    def teacher_outputs(self, x: Tensor, paths: tuple[str, ...] = ()) -> list[Outputs]:
        from kdlab.teachers import Teachers

        return Teachers(list(self.teachers)).forward(x, paths)

    def examples(self, split: str, index: Tensor | None = None) -> dict[str, Tensor]:
        inputs, targets = self.data[split]
        index = torch.arange(len(targets)) if index is None else index
        return {"input": inputs[index], "target": targets[index], "index": index}

    def clean_train_teacher_outputs(self, batch: dict[str, Tensor]) -> list[Outputs]:
        return self.teacher_outputs(batch["input"])

    def precision_context(self):
        return nullcontext()

    def all_gather(self, tensor: Tensor) -> Tensor:
        return tensor.unsqueeze(0)

    def log(self, name: str, value: Any, **kwargs: Any) -> None:
        self.logged[name] = value


def digits_data(n_train: int = 64, n_meta: int = 32, seed: int = 0
                ) -> dict[str, tuple[Tensor, Tensor]]:
    """Small random digit-shaped splits (1x8x8, 10 classes) for method tests."""
    g = torch.Generator().manual_seed(seed)
    return {split: (torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
            for split, n in (("train", n_train), ("meta", n_meta), ("val", n_meta))}


def trainable_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A small digits student and a teacher left trainable on purpose: a method must still
    give the teacher no gradient."""
    from kdlab.models import build_model

    torch.manual_seed(seed)
    student = build_model("cnn", 10, (1, 8, 8), width=4)
    teacher = build_model("cnn", 10, (1, 8, 8), width=8).eval()
    teacher.requires_grad_(True)
    return student, teacher


def tiny_bn_model(d: int, hidden: int, c: int) -> nn.Module:
    """A float64 Linear-BatchNorm-Tanh-Linear student in train mode with non-trivial running
    statistics: for lookahead tests that differentiate through a whole (BN) network."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.Tanh(),
                          nn.Linear(hidden, c)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.train()
