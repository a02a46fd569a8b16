"""Norm and direction regularisation, ND: KD++ and DKD++ (Wang, Cheng, Duan, Wang, Feng,
Kong, "Improving Knowledge Distillation via Regularizing Feature Norm and Direction",
ECCV 2024, arXiv 2305.17007), as in the authors' CIFAR-100 code:

    mu_c   = mean of the teacher's penultimate features h_t over the train examples of class c
             (computed once, before training)
    e_c    = mu_c / |mu_c|
    ND     = mean_i [ 1 - <p(h_s,i), e_{y_i}> / max(|p(h_s,i)|, |h_t,i|) ]
    KD++:  L = w_ce CE(s, y) + min(1, e / warmup) * w_kd T^2 KL(softmax(t/T) || softmax(s/T))
               + w_nd ND
    DKD++: L = w_ce CE(s, y) + min(1, e / warmup) * (alpha TCKD + beta NCKD) + w_nd ND

TCKD / NCKD as in :mod:`kdlab.methods.dkd`. e is the training epoch counted from 0 (the
first epoch has no KD term, as in the authors' loop); warmup = 20. p is the identity when
student and teacher penultimate widths agree, else a projector BatchNorm1d -> Dropout(0.5) ->
Linear to the teacher's width, trained with the student and used for ND only (its dropout
masks come from a generator seeded at every epoch start from (seed, epoch, rank), so a
resumed run draws the same masks).

Defaults (resnet32x4 -> resnet8x4 in the authors' script): KD++ w_ce = 1, w_kd = 3.5,
w_nd = 2, T = 4; DKD++ w_ce = 1, alpha = 2, beta = 8, w_nd = 0.5, T = 4. The CIFAR-100
experiment configs set the per-pair weights of that script.

State (module buffers): ``class_means`` (C x D_t) and ``has_class_means``, computed once in
``on_fit_start`` from the un-augmented train split (its possibly noisy labels), in batches;
every DDP rank computes them from the whole split, so all ranks hold the same means; a
resumed run keeps the saved ones. ``epoch`` (for the warm-up). One teacher.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.features import PENULTIMATE, feature_shapes
from .base import (
    Method,
    Outputs,
    StateBuffer,
    StateSizes,
    cross_entropy,
    epoch_seed,
    kd_kl,
    linear_warmup,
    require_teachers,
)
from .dkd import nckd, tckd

Base = Literal["kd", "dkd"]
Projector = Literal["auto", "always", "never"]


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C, D): the mean feature of each class (zeros for a class with no example)."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64,
                       device=features.device)
    sums.index_add_(0, labels, features.double())
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1)
    return (sums / counts[:, None]).float()


def nd_loss(student_embedding: Tensor, teacher_embedding: Tensor, means: Tensor,
            labels: Tensor) -> Tensor:
    """mean_i [1 - <h_s,i, e_y> / max(|h_s,i|, |h_t,i|)], e_y the unit class-mean direction."""
    h_s, h_t = student_embedding.float(), teacher_embedding.float()
    directions = F.normalize(means.float(), dim=1)[labels]
    largest = torch.maximum(h_s.norm(dim=1), h_t.norm(dim=1)).clamp_min(1e-12)
    return (1.0 - (h_s * directions).sum(1) / largest).mean()


class SeededDropout(nn.Dropout):
    """Dropout whose masks come from ``generator`` when it is set (the method reseeds it every
    epoch, so a resumed run draws the masks the uninterrupted one drew)."""

    generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or self.generator is None:
            return super().forward(x)
        keep = torch.rand(x.shape, generator=self.generator, device=x.device) >= self.p
        return x * keep / (1.0 - self.p)


def make_projector(student_width: int, teacher_width: int) -> nn.Module:
    """BN1d -> Dropout(0.5) -> Linear, BN at (1, 0) and a zero Linear bias, as the authors'."""
    projector = nn.Sequential(nn.BatchNorm1d(student_width), SeededDropout(0.5),
                              nn.Linear(student_width, teacher_width))
    nn.init.zeros_(projector[2].bias)
    return projector


class ND(Method):
    name = "nd"
    description = "KD++ / DKD++: KD or DKD + ND (embedding to the teacher's class-mean)"

    @classmethod
    def describe(cls, config) -> str:
        base = cls.setting(config, "base")
        name = {"kd": "KD++", "dkd": "DKD++"}.get(base)
        if name is None:
            return cls.description
        return (f"{name} (Wang et al. ECCV 2024): {base.upper()} + ND, the student's "
                "embedding pulled to the teacher's class-mean direction")
    student_features = (PENULTIMATE,)
    teacher_features = (PENULTIMATE,)

    def __init__(self, base: Base = "kd", temperature: float = 4.0, ce_weight: float = 1.0,
                 kd_weight: float = 3.5, alpha: float = 2.0, beta: float = 8.0,
                 nd_weight: float = 2.0, warmup_epochs: int = 20, projector: Projector = "auto",
                 batch_size: int = 512):
        super().__init__()
        self.projector_mode = projector
        self.projector: nn.Module | None = None  # built in setup() when the widths differ
        self._built = False
        self.register_buffer("class_means", torch.zeros(0, 0))
        self.register_buffer("has_class_means", torch.tensor(False))
        self._means_ready = False  # has_class_means, read once (a host sync on GPUs)
        # The training epoch counted from 0; module state so a resumed run warms up alike.
        self.register_buffer("epoch", torch.tensor(0, dtype=torch.long))

    # -- set-up ----------------------------------------------------------------------------
    def check(self, student, teachers) -> None:
        require_teachers(self.name, len(teachers), exactly=1)

    def setup(self, ctx) -> None:
        if self._built:  # idempotent: setup runs for every stage
            return
        self.check(ctx.student, ctx.teachers)
        shape = tuple(ctx.input_shape)
        (d_s,) = feature_shapes(ctx.student, (PENULTIMATE,), shape)[PENULTIMATE]
        (d_t,) = feature_shapes(ctx.teachers[0], (PENULTIMATE,), shape)[PENULTIMATE]
        if self.projector_mode == "never" and d_s != d_t:
            raise ConfigError(f"method.projector=never needs equal penultimate widths; student "
                              f"{d_s}, teacher {d_t}")
        device = next(ctx.student.parameters()).device
        if self.projector is None and (self.projector_mode == "always"
                                       or (self.projector_mode == "auto" and d_s != d_t)):
            self.projector = make_projector(d_s, d_t).to(device)
        if tuple(self.class_means.shape) != (int(ctx.num_classes), d_t):
            self.class_means = torch.zeros(int(ctx.num_classes), d_t, device=device)
            self.has_class_means.fill_(False)
            self._means_ready = False
        self._built = True

    def state_buffers(self, sizes: StateSizes) -> dict[str, StateBuffer]:
        shape = (sizes.num_classes, sizes.teacher_width)
        return {"class_means": StateBuffer(shape, torch.float32, rows="class")}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A method that has not run setup() yet takes the projector and means from the
        # checkpoint (e.g. DistillModule.load_from_checkpoint).
        weight = state_dict.get(f"{prefix}projector.2.weight")
        if weight is not None and self.projector is None:
            self.projector = make_projector(weight.shape[1], weight.shape[0]).to(weight.device)
        saved = state_dict.get(prefix + "class_means")
        if saved is not None and saved.shape != self.class_means.shape:
            self.class_means = torch.zeros_like(saved, device=self.class_means.device)
        self._means_ready = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def on_fit_start(self, ctx) -> None:
        """The teacher's class means over the whole train split, once (kept on resume)."""
        if bool(self.has_class_means):
            return
        n = int(ctx.train_size)
        features, labels = [], []
        for chunk in torch.arange(n).split(self.batch_size):
            batch = ctx.examples("train", chunk)
            (out,) = ctx.teacher_outputs(batch["input"], (PENULTIMATE,))
            features.append(out.features[PENULTIMATE].float().flatten(1))
            labels.append(batch["target"].long())
        means = class_means(torch.cat(features), torch.cat(labels), self.class_means.shape[0])
        self.class_means.copy_(means.to(self.class_means.device))
        self.has_class_means.fill_(True)
        self._means_ready = True

    def on_train_epoch_start(self, ctx) -> None:
        self.epoch.fill_(int(ctx.current_epoch))
        if self.projector is not None:
            generator = torch.Generator(device=self.class_means.device)
            generator.manual_seed(epoch_seed(ctx, salt=2))
            self.projector[1].generator = generator

    def warmup_factor(self) -> Tensor:
        return linear_warmup(self.epoch, self.warmup_epochs)

    # -- loss ------------------------------------------------------------------------------
    def kd_terms(self, s: Tensor, t: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The base method's distillation terms, warm-up applied."""
        warm = self.warmup_factor()
        if self.base == "kd":
            return {"kd": warm * self.kd_weight * kd_kl(s, t, self.temperature)}
        return {"tckd": warm * self.alpha * tckd(s, t, y, self.temperature),
                "nckd": warm * self.beta * nckd(s, t, y, self.temperature)}

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers), exactly=1)
        if not self._means_ready:
            self._means_ready = bool(self.has_class_means)
            if not self._means_ready:
                raise RuntimeError("nd class means are not computed: on_fit_start(ctx) must run")
        y = batch["target"]
        h_s = student.features[PENULTIMATE].float().flatten(1)
        if self.projector is not None:
            h_s = self.projector(h_s)
        h_t = teachers[0].features[PENULTIMATE].flatten(1)
        return {
            "ce": self.ce_weight * cross_entropy(student.logits, y),
            **self.kd_terms(student.logits, teachers[0].logits, y),
            "nd": self.nd_weight * nd_loss(h_s, h_t, self.class_means, y),
        }
