"""``DistillModule``: the generic LightningModule.

It trains a student with whatever method it is given, through the method contract in
``kdlab/methods/base.py``; it never asks which method that is. Teachers are frozen, kept
out of the module's registered children (so they are neither optimised nor written into
every checkpoint) and moved to the device with the module.

Teacher cost: teachers run under ``inference_mode`` in the trainer's precision (autocast
covers the training step), in channels_last memory format. Each teacher's logits on the
un-augmented train examples are computed once before training and looked up by
``batch["index"]`` (``teacher_cache``: auto | memory | disk | off; ``disk`` also keeps them
in a file named by teachers and data, for later runs) when they can stand in for a
forward pass: for training batches when every train example reaches the model as the same
tensor (no random augmentation), and for per-example passes over the un-augmented train
split that a method declares (``Method.reads_clean_train_teacher``, e.g. ALM-KD's meta
pass). Methods that need teacher features always run the teachers.

Randomness is re-seeded at every epoch start from (seed, epoch, rank), so a run resumed
from an epoch-end checkpoint continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from . import __version__
from .errors import ConfigError, NonFiniteLossError
from .io import atomic_torch_save
from .methods.base import Method, Outputs
from .metrics import Agreement, ReliabilityBins, classification_metrics
from .models.features import FeatureHooks

log = logging.getLogger(__name__)

TEACHER_CACHE_MODES = ("auto", "memory", "disk", "off")
# teacher_cache=auto keeps the cache only below this size (memory and disk force it).
TEACHER_CACHE_AUTO_BYTES = 4 * 2**30


def _progress(loader, description: str, show: bool):
    if not show:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=description, unit="batch", leave=False)


def check_teacher_cache_mode(mode: str) -> None:
    if mode not in TEACHER_CACHE_MODES:
        raise ConfigError(f"teacher_cache must be one of {', '.join(TEACHER_CACHE_MODES)}, "
                          f"got {mode!r}")


def _tensor_buffer(t: Tensor):
    """The tensor's bytes as a buffer for hashing (no copy when it is already on the CPU)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def load_teacher_logits(path: Path, shape: tuple[int, int], count: int,
                        device) -> list[Tensor] | None:
    """A saved teacher-logit cache, or None when it is missing or unusable (recomputed)."""
    if not path.is_file():
        return None
    try:
        cache = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated or foreign file: recompute and overwrite it
        log.warning("ignoring teacher logit cache %s (%s); recomputing it", path, err)
        return None
    if (not isinstance(cache, list) or len(cache) != count
            or any(not isinstance(c, Tensor) or tuple(c.shape) != shape for c in cache)):
        log.warning("ignoring teacher logit cache %s (unexpected contents); recomputing it", path)
        return None
    return [c.float() for c in cache]


def channels_last(x: Tensor) -> Tensor:
    """Image batches (N, C, H, W) in the channels_last layout the models are kept in."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def forward_with_features(model: nn.Module, x: Tensor, paths: tuple[str, ...]) -> Outputs:
    if not paths:
        return Outputs(logits=model(x))
    with FeatureHooks(model, paths) as feats:
        logits = model(x)
    return Outputs(logits=logits, features=dict(feats))


class DistillModule(L.LightningModule):
    def __init__(self, student: nn.Module, method: Method, teachers: list[nn.Module],
                 num_classes: int, optimizer: dict[str, Any], scheduler: dict[str, Any],
                 teacher_names: list[str] | None = None, seed: int = 0,
                 teacher_cache: str = "auto", teacher_cache_dir: str | Path | None = None):
        super().__init__()
        check_teacher_cache_mode(teacher_cache)
        self.student = student
        self.method = method
        self._teachers = tuple(teachers)  # a tuple: not registered as submodules
        self.seed = int(seed)
        self.teacher_cache = teacher_cache
        # Teachers' logits on the un-augmented train split, (N_train, C) per teacher.
        self._train_teacher_logits: list[Tensor] | None = None
        self.teacher_cache_dir = teacher_cache_dir
        self.teacher_cache_seconds = 0.0
        self.teacher_cache_loaded = False
        self.teacher_names = list(teacher_names or [f"teacher{i}" for i in range(len(teachers))])
        self.num_classes = num_classes
        self.optimizer_cfg = dict(optimizer)
        self.scheduler_cfg = dict(scheduler)
        self.val_metrics = classification_metrics(num_classes).clone(prefix="val/")
        self.test_metrics = classification_metrics(num_classes).clone(prefix="test/")
        self.test_reliability = ReliabilityBins()
        self.teacher_test_metrics = nn.ModuleList(
            classification_metrics(num_classes).clone(prefix=f"teacher{i}/test/")
            for i in range(len(teachers)))
        self.test_agreement = nn.ModuleList(Agreement() for _ in teachers)

    # -- forward passes --------------------------------------------------------------------
    @property
    def teachers(self) -> tuple[nn.Module, ...]:
        return self._teachers

    def _teachers_to_device(self) -> None:
        # channels_last: measured 1.2x faster frozen-teacher convolutions on CPU (oneDNN),
        # and the tensor-core layout on GPUs; no effect on non-conv models.
        for t in self._teachers:
            t.to(self.device, memory_format=torch.channels_last).eval()

    def precision_context(self) -> AbstractContextManager:
        """The trainer's precision (e.g. bf16 autocast) for forward passes outside its steps."""
        if self._trainer is None:
            return nullcontext()
        return self._trainer.precision_plugin.forward_context()

    def teacher_outputs(self, x: Tensor, paths: tuple[str, ...] = ()) -> list[Outputs]:
        """Frozen teachers' logits (and features at ``paths``), float32, no autograd history."""
        x = channels_last(x)
        outs = []
        with torch.inference_mode(), self.precision_context():
            raw = [forward_with_features(t, x, paths) for t in self._teachers]
        for o in raw:  # clone out of inference mode: the tensors may be saved for backward
            outs.append(Outputs(o.logits.float().clone(),
                                {k: v.float().clone() for k, v in o.features.items()}))
        return outs

    def teacher_outputs_for(self, batch: dict[str, Tensor]) -> list[Outputs]:
        """Teacher outputs for a training batch: from the per-example cache when the train
        transform is deterministic (the batch's inputs are then the cached examples)."""
        if (self._train_teacher_logits is not None
                and self.trainer.datamodule.deterministic_train):
            return self._cached_teacher_outputs(batch)
        return self.teacher_outputs(batch["input"], self.method.teacher_features)

    def clean_train_teacher_outputs(self, batch: dict[str, Tensor]) -> list[Outputs]:
        """Teachers' logits for a batch of ``train_eval_dataloader`` (un-augmented train
        examples, looked up by index): from the cache when there is one."""
        cached = self._cached_teacher_outputs(batch)
        return cached if cached is not None else self.teacher_outputs(batch["input"])

    def _cached_teacher_outputs(self, batch: dict[str, Tensor]) -> list[Outputs] | None:
        if self._train_teacher_logits is None:
            return None
        return [Outputs(cached[batch["index"]]) for cached in self._train_teacher_logits]

    def _build_teacher_cache(self) -> None:
        dm = self.trainer.datamodule
        method = self.method
        if (self.teacher_cache == "off" or not self._teachers or not method.needs_teacher
                or method.teacher_features):
            return
        if not (dm.deterministic_train or method.reads_clean_train_teacher):
            if self.teacher_cache != "auto":
                raise ConfigError(f"teacher_cache={self.teacher_cache} needs a deterministic "
                                  "train transform (e.g. dataset.augment=false); use "
                                  "teacher_cache=auto")
            return
        size = dm.train_size * self.num_classes * 4 * len(self._teachers)
        if self.teacher_cache == "auto" and size > TEACHER_CACHE_AUTO_BYTES:
            log.info("teacher_cache=auto: %.1f GiB of teacher logits is over the %.0f GiB "
                     "limit; teachers run every step (teacher_cache=memory forces the cache)",
                     size / 2**30, TEACHER_CACHE_AUTO_BYTES / 2**30)
            return
        start = time.perf_counter()
        path = self._teacher_cache_file(dm) if self.teacher_cache == "disk" else None
        cache = load_teacher_logits(path, (dm.train_size, self.num_classes),
                                    len(self._teachers), self.device) if path else None
        self.teacher_cache_loaded = cache is not None
        if cache is None:
            cache = self._compute_train_teacher_logits(dm)
            if path is not None and self.trainer.is_global_zero:
                atomic_torch_save([c.cpu() for c in cache], path)
        self._train_teacher_logits = cache
        self.teacher_cache_seconds = time.perf_counter() - start

    def _compute_train_teacher_logits(self, dm) -> list[Tensor]:
        """Every teacher's logits on the whole un-augmented train split (every rank)."""
        cache = [torch.empty(dm.train_size, self.num_classes, device=self.device)
                 for _ in self._teachers]
        loader = dm.train_eval_dataloader(shard=False)
        show = self.trainer.is_global_zero and self.trainer.progress_bar_callback is not None
        for batch in _progress(loader, "teacher logits (train split, once)", show):
            batch = dm.model_batch(batch, self.device, train=False)
            for store, out in zip(cache, self.teacher_outputs(batch["input"]), strict=True):
                store[batch["index"]] = out.logits
        return cache

    def _teacher_cache_file(self, dm) -> Path:
        """``teacher_cache=disk``: a file named by everything the logits depend on: the
        teachers' classes and weights, the train split's inputs in order, the dataset,
        the number of classes, the precision and the kdlab version."""
        if self.teacher_cache_dir is None:
            raise ConfigError("teacher_cache=disk needs a cache directory (paths.cache_dir)")
        h = hashlib.sha256()
        h.update(f"{dm.name}|{self.num_classes}|{self.trainer.precision}|{__version__}".encode())
        h.update(_tensor_buffer(dm.splits["train"].inputs))
        for teacher in self._teachers:
            h.update(type(teacher).__name__.encode())
            for name, value in sorted(teacher.state_dict().items()):
                h.update(name.encode())
                h.update(_tensor_buffer(value))
        return Path(self.teacher_cache_dir) / f"{dm.name}-{h.hexdigest()[:24]}.pt"

    def forward(self, x: Tensor) -> Tensor:
        return self.student(channels_last(x))

    # -- training --------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # The student's conv weights in channels_last too (measured 1.15x faster training
        # steps of resnet8x4 in bf16 on CPU); a no-op for models without 4-d weights.
        self.student.to(memory_format=torch.channels_last)
        self._teachers_to_device()
        self.method.setup(self)

    def on_fit_start(self) -> None:
        self._teachers_to_device()
        self._build_teacher_cache()
        self.method.on_fit_start(self)

    def on_train_epoch_start(self) -> None:
        # Each epoch's randomness depends only on (seed, epoch, rank): exact resume.
        torch.manual_seed((self.seed * 1_000_003 + self.current_epoch) * 1009 + self.global_rank)
        self.method.on_train_epoch_start(self)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x = channels_last(batch["input"])  # once, for student and teachers
        batch = {**batch, "input": x}
        teachers = self.teacher_outputs_for(batch) if self.method.needs_teacher else []
        student = forward_with_features(self.student, x, self.method.student_features)
        terms = self.method(student, teachers, batch)
        self._check_finite(terms)
        loss = torch.stack([v.float() for v in terms.values()]).sum()
        n = x.shape[0]
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.method.on_train_batch_end(self, batch)

    def _check_finite(self, terms: dict[str, Tensor]) -> None:
        for name, value in terms.items():
            v = float(value.detach())
            if not math.isfinite(v):
                raise NonFiniteLossError(
                    f"loss term {name!r} became {v} at step {self.global_step} "
                    f"(epoch {self.current_epoch}); training stopped, the last good "
                    "checkpoint is kept (lower the learning rate or check the data)")

    # -- evaluation ------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["input"]).float()
        self.val_metrics.update(logits, batch["target"])

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()  # torchmetrics has already synced the ranks
        self.log("val/acc", values.pop("val/acc"), prog_bar=True)
        self.log_dict(values)
        self.val_metrics.reset()

    def on_test_start(self) -> None:
        self._teachers_to_device()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x, y = channels_last(batch["input"]), batch["target"]
        logits = self(x).float()
        self.test_metrics.update(logits, y)
        self.test_reliability.update(logits, y)
        for i, t in enumerate(self.teacher_outputs(x)):
            self.teacher_test_metrics[i].update(t.logits, y)
            self.test_agreement[i].update(logits, t.logits)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        for i, metrics in enumerate(self.teacher_test_metrics):
            self.log_dict(metrics.compute())
            self.log(f"teacher{i}/test/agreement", self.test_agreement[i].compute())
        self.reliability_bins = {k: v.cpu() for k, v in self.test_reliability.compute().items()}
        for m in [self.test_metrics, self.test_reliability, *self.teacher_test_metrics,
                  *self.test_agreement]:
            m.reset()

    # -- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self):
        params = list(self.student.parameters()) + self.method.extra_parameters()
        optimizer = build_optimizer(params, self.optimizer_cfg)
        scheduler = build_scheduler(optimizer, self.scheduler_cfg, self.trainer.max_epochs)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    @property
    def current_lr(self) -> float:
        return float(self.trainer.optimizers[0].param_groups[0]["lr"])


def build_optimizer(params, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    cfg = dict(cfg)
    name = cfg.pop("name", "sgd")
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg.get("momentum", 0.9),
                               weight_decay=cfg.get("weight_decay", 0.0),
                               nesterov=bool(cfg.get("nesterov", False)))
    if name in ("adam", "adamw"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(params, lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
    raise ValueError(f"unknown optimizer.name {name!r}; available: sgd, adam, adamw")


def build_scheduler(optimizer, cfg: dict[str, Any], max_epochs: int):
    cfg = dict(cfg)
    name = cfg.pop("name", "none")
    if name in ("none", None):
        return None
    if name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(cfg["milestones"]), gamma=cfg.get("gamma", 0.1))
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, int(max_epochs)), eta_min=cfg.get("eta_min", 0.0))
    raise ValueError(f"unknown scheduler.name {name!r}; available: none, multistep, cosine")
