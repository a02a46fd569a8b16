"""The method contract.

A distillation method is an ``nn.Module`` (so whatever it learns or remembers across steps
lives in its buffers/parameters and is saved in checkpoints). The LightningModule never asks
which method it runs; it only calls this contract:

* ``needs_teacher`` -- whether teacher outputs must be computed for the training batch.
* ``student_features`` / ``teacher_features`` -- module paths (``"layer2"``,
  ``"block.1.conv"``) whose outputs the method needs; they are taken with forward hooks.
* ``loss_terms(student, teachers, batch)`` -- returns ``{term name: already-weighted
  scalar}``; the training loss is their sum and each term is logged as ``train/loss_<name>``.
  Logits may arrive in bfloat16 under mixed precision: cast to float32 before softmax.
* ``check(student, teachers)`` -- raise a :class:`ConfigError` if the method cannot apply to
  these (untrained) models, e.g. a feature path that does not exist; runs before any work.
* Optional hooks, each given the run's :class:`MethodContext`: ``setup`` (before optimisers
  are built and before a checkpoint is restored: create state buffers and learnable parts
  whose shapes depend on the data or models; runs for every stage, keep it idempotent),
  ``on_fit_start``, ``on_train_epoch_start``, ``on_train_batch_end`` (after the optimiser
  step).
* ``results()`` -- extra entries for the run's ``results.json``. It is called after the
  best-on-val checkpoint has been loaded back for testing, so a method reports state it
  kept itself (e.g. the final weights), not what the buffers hold at that moment.

How the contract grows for methods that need more than a loss:

1. **A batch transform** -- ``transform_batch(batch, ctx)`` (override it) runs before the
   forward pass of every training batch and returns the batch the student *and* the
   teachers see, with any extra targets (mixup: mixed inputs and ``soft_target``). Teachers
   then always run on the transformed inputs, never from a logit cache.
2. **Extra input views** -- ``input_views = ("strong",)`` asks the datamodule for another,
   independently augmented view of each training batch (``batch["input_strong"]``:
   RandAugment + Cutout); teacher outputs for it come from ``ctx.teacher_outputs``.
3. **Learnable auxiliary parts** (a head on the pooled feature, a regressor, a controller)
   are submodules of the method: saved in checkpoints, never on the student's evaluation
   path; ``extra_parameters()`` joins them to the student's optimiser. A part trained on
   another objective (e.g. bilevel on the meta split) keeps its own optimiser inside the
   method and saves its state in buffers (:func:`step_with_flat_state`) or
   ``get_extra_state``.
4. **Trainable peers** (online distillation): a second network is a submodule of the
   method, trained with the student (``extra_parameters()``), in train mode with it, synced
   by DDP like the student, saved and resumed with it; ``evaluated_models()`` names it so
   the run tests it like the student (``results.json["peers"]``). ``needs_teacher = False``.
5. **The prediction** -- ``predict(logits)``: what the student's prediction is when the
   method's loss only sees a transform of its logits (evaluation goes through it).
6. **Generations** (``generations=N`` in the run config): N successive students, each
   distilled from the previous one's best checkpoint (the first from ``teacher``), in
   ``<run dir>/generation<k>/``; the run's results.json summarises them. Nothing to do in the
   method.
7. **What a report shows** (``kdlab report``, which never names a method): class attributes
   ``report_metrics`` (results.json keys, as dotted paths, with their column headers: added
   to the report's default table for runs of the method), ``report_plots``
   (:class:`ReportPlot`: a figure over the report's groups of runs) and ``run_plots`` (files
   the method writes into its run directory that ``report.html`` shows, with a heading).
8. **State that grows with the data** -- ``state_buffers(sizes)``: the buffers whose size
   grows with the train split or the classes (:class:`StateSizes`), with the shape and dtype
   ``setup`` gives them (:class:`StateBuffer`). docs/methods.md's memory table is made from
   it (``scripts/state_memory.py``) and a test checks it against the buffers ``setup``
   makes.

A method sees the run only through :class:`MethodContext`, never the Trainer or the
DataModule; ``tests/helpers`` has one fake context that serves every method test.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .hyperparameters import typed_init

Batch = dict[str, Tensor]


@dataclass
class Outputs:
    """What a forward pass of a student or teacher hands to a method."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class GroupStats:
    """One group of a report (runs that differ only in the seed), as a report plot gets it:
    its label (``method=alm_kd, noise.rate=0.4``) and, per column of the plot, the mean and
    sample standard deviation over its runs (NaN where no run has a value)."""

    label: str
    mean: dict[str, float]
    std: dict[str, float]


@dataclass(frozen=True)
class ReportPlot:
    """A figure ``kdlab report`` draws when some run's method declares it (once, however
    many methods declare the same ``name``): ``draw(groups, path)`` with every group that
    has a value in ``columns`` (results.json keys, dotted), into ``<out>/<name>.png``, shown
    under ``caption`` in report.html. Drawn only when some finished run has all columns."""

    name: str
    columns: tuple[str, ...]
    draw: Callable[[list[GroupStats], Path], Any]
    caption: str


@dataclass(frozen=True)
class StateSizes:
    """What the size of a method's state depends on besides the method's own settings: the
    train examples N, the classes C, the teachers K and the (first) teacher's penultimate
    feature width."""

    num_examples: int
    num_classes: int
    num_teachers: int = 1
    teacher_width: int = 512


@dataclass(frozen=True)
class StateBuffer:
    """One buffer of a method's state that grows with the data, as ``setup`` shapes it:
    ``rows`` says what its first dimension counts (``"example"``: the train examples,
    ``"class"``: the classes; ``""``: a flat vector whose length depends on C)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    rows: Literal["example", "class", ""] = "example"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def bytes_per_row(self) -> int | None:
        return self.nbytes // self.shape[0] if self.rows and self.shape[0] else None


class MethodContext(Protocol):
    """Everything a method may use of the running training (:class:`kdlab.context.RunContext`
    serves it in a run; ``tests/helpers/context.py`` fakes it). A plain object, not a module:
    a method may keep it as an attribute.

    Sizes and progress: ``num_classes``, ``input_shape``, ``train_size`` (examples in the
    train split), ``batch_size`` (train batch per rank), ``current_epoch``, ``global_step``,
    ``max_epochs``, ``total_steps`` (optimiser steps of the whole run), ``current_lr``,
    ``seed``, ``device``, ``global_rank``, ``world_size``, ``is_global_zero``, ``run_dir``.
    Models: ``student``; ``teachers`` (frozen, eval mode). ``noise_mask`` marks the train
    examples whose label was corrupted: for analysis and reporting only, training must not
    read it. All of these are read-only.
    """

    @property
    def student(self) -> nn.Module: ...

    @property
    def teachers(self) -> Sequence[nn.Module]: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    @property
    def train_size(self) -> int: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def current_epoch(self) -> int: ...

    @property
    def global_step(self) -> int: ...

    @property
    def max_epochs(self) -> int: ...

    @property
    def total_steps(self) -> int: ...

    @property
    def current_lr(self) -> float: ...

    @property
    def seed(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def global_rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def is_global_zero(self) -> bool: ...

    @property
    def run_dir(self) -> Path: ...

    @property
    def noise_mask(self) -> Tensor | None: ...

    def teacher_outputs(self, x: Tensor, paths: tuple[str, ...] = ()) -> list[Outputs]:
        """The frozen teachers on inputs ``x`` (float32, no autograd history)."""

    def examples(self, split: str, index: Tensor | None = None) -> Batch:
        """Un-augmented examples of ``split`` (train | meta | val) on the device, as a batch
        ``{input, target, index}``; ``index``: positions in the split (default: all of it).
        The train split's targets are its (possibly noisy) training labels."""

    def clean_train_teacher_outputs(self, batch: Batch) -> list[Outputs]:
        """Teachers on a batch of ``examples("train", ...)``: looked up in the teacher-logit
        cache when there is one, so per-example passes cost no teacher forward."""

    def precision_context(self) -> AbstractContextManager:
        """The trainer's precision (e.g. bf16 autocast) for a method's own forward passes."""

    def all_gather(self, tensor: Tensor) -> Tensor:
        """(world_size, *shape) stacked over DDP ranks (shape unchanged on one process)."""

    def log(self, name: str, value: Any, **kwargs: Any) -> None:
        """Log a metric (Lightning's ``self.log``)."""


class Method(nn.Module):
    """Base class: subclasses set ``name``/``description`` and implement ``loss_terms``.

    Hyper-parameters are the keyword parameters of the subclass's ``__init__``, each with an
    annotation and a default (``temperature: float = 4.0``): the value is converted to that
    type, or refused with one error line, and kept as ``self.temperature`` before the body
    runs (:mod:`kdlab.methods.hyperparameters`). Unannotated ones pass through untouched.
    """

    name: str = "method"
    description: str = ""
    needs_teacher: bool = True
    student_features: tuple[str, ...] = ()
    teacher_features: tuple[str, ...] = ()
    # What `kdlab report` shows for runs of this method, besides what every run has: results
    # keys (dotted) -> column headers for its default table, figures over the groups of
    # runs, and files in the run directory -> the heading report.html shows them under.
    report_metrics: ClassVar[dict[str, str]] = {}
    report_plots: ClassVar[tuple[ReportPlot, ...]] = ()
    run_plots: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in vars(cls):
            cls.__init__ = typed_init(cls.__init__)

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch: Batch
                   ) -> dict[str, Tensor]:
        raise NotImplementedError

    @classmethod
    def describe(cls, config: Mapping[str, Any]) -> str:
        """The line ``kdlab methods`` prints for a method config (its keys: ``config``):
        ``description``, unless a setting changes what the method is (KD with
        ``logit_standardization``, ND with ``base: dkd``); such a method says how here."""
        return cls.description

    @classmethod
    def setting(cls, config: Mapping[str, Any], key: str) -> Any:
        """``config[key]``, or the constructor's default when the config leaves it out (or
        it refers to a key outside the method's config)."""
        default = inspect.signature(cls).parameters[key].default
        try:
            return config.get(key, default)
        except Exception:  # an interpolation that only resolves in a composed run config
            return default

    def forward(self, student: Outputs, teachers: list[Outputs], batch: Batch):
        return self.loss_terms(student, teachers, batch)

    # Extra views of each training batch the method reads (``batch["input_<view>"]``).
    input_views: tuple[str, ...] = ()

    def check(self, student: nn.Module, teachers: Sequence[nn.Module]) -> None:
        """Raise a ConfigError if the method cannot apply to these models."""

    def transform_batch(self, batch: Batch, ctx: MethodContext) -> Batch:
        """The training batch the student and the teachers see (default: unchanged)."""
        return batch

    @property
    def transforms_batch(self) -> bool:
        return type(self).transform_batch is not Method.transform_batch

    def evaluated_models(self) -> dict[str, nn.Module]:
        """Networks besides the student that the run tests (online peers), by name."""
        return {}

    def predict(self, logits: Tensor) -> Tensor:
        """The logits the student's prediction is, from its raw outputs (default: as they
        are). Validation, test, ``kdlab eval`` and ``DistillModule(x)`` go through it; a
        method whose loss only sees a transform of the logits (mixup KD's s / std(s))
        says so here."""
        return logits

    # Hooks: the default is to do nothing.
    def setup(self, ctx: MethodContext) -> None:
        pass

    def on_fit_start(self, ctx: MethodContext) -> None:
        pass

    def on_train_epoch_start(self, ctx: MethodContext) -> None:
        pass

    def on_train_batch_end(self, ctx: MethodContext, batch: Batch) -> None:
        pass

    def results(self) -> dict[str, Any]:
        return {}

    def state_buffers(self, sizes: StateSizes) -> dict[str, StateBuffer]:
        """The buffers whose size grows with the train split or the classes, by name, with
        the shape and dtype ``setup`` gives them for ``sizes`` (every DDP rank holds them
        whole). Learned parts (parameters) and their optimiser state count with the models
        unless they are buffers. Default: none."""
        return {}

    def extra_parameters(self) -> list[nn.Parameter]:
        """Learnable parts of the method (e.g. a FitNet regressor) that join the optimiser."""
        return [p for p in self.parameters() if p.requires_grad]


# -- shared pieces, written once and reused by the methods ---------------------------------


def require_teachers(method: str, count: int, exactly: int | None = None) -> None:
    """A one-line ConfigError unless there is a teacher (``exactly`` teachers if given)."""
    if exactly is not None and count != exactly:
        raise ConfigError(f"method {method} takes exactly {exactly} teacher(s), got {count}"
                          + ("; set `teacher` and leave `teachers` null" if exactly == 1 else ""))
    if count == 0:
        raise ConfigError(f"method {method} needs a teacher but none was given")


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy against hard labels, computed in float32."""
    return F.cross_entropy(logits.float(), target)


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Mean over the batch of -sum_c q_c log softmax(s)_c."""
    return -(target_probs * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = sum_c p_c (log p_c - log q_c) over the last dim, one value per row."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor,
          reduction: str = "mean") -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes.

    ``reduction="mean"`` averages over the batch, ``"none"`` returns one value per example
    (teacher logits of shape (K, n, C) give (K, n)). The dtype of float64 inputs is kept (the
    tests use it); lower precisions go to float32. A tensor ``temperature`` stays in the graph
    (a learned temperature).
    """
    t = temperature if isinstance(temperature, Tensor) else float(temperature)
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    log_p_s = F.log_softmax(student_logits.to(dtype) / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.to(dtype) / t, dim=-1)
    per_example = kl_divergence(log_p_t, log_p_s) * t * t
    return per_example if reduction == "none" else per_example.mean()


def derived_seed(seed: int, counter: int, rank: int = 0) -> int:
    """A seed from (run seed, a counter such as the epoch or step, DDP rank): a function of
    where the run is, so a resumed run draws what the uninterrupted run drew."""
    return (int(seed) * 1_000_003 + int(counter)) * 1009 + int(rank)


def epoch_seed(ctx: MethodContext, salt: int) -> int:
    """A seed for a method's own draws in this epoch, from (run seed, epoch, rank) and a
    per-method ``salt`` (the global RNG at a step is not reproducible across a resume; see
    docs/methods.md)."""
    return (derived_seed(ctx.seed, ctx.current_epoch, ctx.global_rank) * 7919 + salt) % 2**63


def linear_warmup(epoch: Tensor, warmup_epochs: int) -> Tensor:
    """min(1, epoch / warmup_epochs) as a tensor on ``epoch``'s device (no host sync)."""
    if warmup_epochs <= 0:
        return torch.ones((), device=epoch.device)
    return (epoch.float() / warmup_epochs).clamp(max=1.0)


def step_with_flat_state(optimizer: type[torch.optim.Optimizer], params: list[Tensor],
                         grad: Tensor, flat_state: dict[str, Tensor], steps: Tensor,
                         **settings: Any) -> None:
    """One step of ``optimizer`` (e.g. ``torch.optim.Adam``, with ``settings``) on ``params``
    with the flat gradient ``grad``, for a part a method trains itself: the optimiser's
    per-parameter state lives in flat buffers of the method (``flat_state``: state name ->
    a tensor over all the parameters, in order; ``steps``: the step count), so checkpoints
    and resume carry it. The optimiser, made for the step, works on views of the buffers
    and updates them in place."""
    opt = optimizer(params, **settings)
    offset = 0
    for p in params:
        flat = slice(offset, offset + p.numel())
        p.grad = grad[flat].view_as(p).to(p.dtype)
        opt.state[p] = {"step": torch.tensor(float(steps)),
                        **{name: buffer[flat].view_as(p) for name, buffer in flat_state.items()}}
        offset += p.numel()
    opt.step()
    for p in params:
        p.grad = None
    steps += 1


def gather_from_ranks(ctx: MethodContext, value: Tensor) -> Tensor:
    """``value`` concatenated over DDP ranks along dim 0 (unchanged on one process)."""
    if ctx.world_size <= 1:
        return value
    return ctx.all_gather(value).flatten(0, 1)

