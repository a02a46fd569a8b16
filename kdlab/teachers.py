"""The teachers of a run: loaded and frozen, and their outputs during training.

* :func:`load_teachers` builds each teacher, loads the weights its spec carries (a ``ckpt``
  given, or an auto-trained teacher's, trained before by :mod:`kdlab.pipeline`), freezes it.
* :class:`Teachers` is the one object the LightningModule calls for teacher outputs: frozen
  models (eval mode, no gradients, channels_last) under ``inference_mode``, and the caches it
  decides at fit start (:meth:`Teachers.prepare`: from the datamodule, the method's declared
  needs and the precision). ``teacher_cache``: auto | memory | disk | views | off. The
  **teacher-logit cache** holds each teacher's logits on the un-augmented train split (auto:
  when it fits in 4 GiB; disk: also saved under ``paths.cache_dir/teacher_logits``, named by
  the teachers' weights, the train inputs, the precision and the kdlab version), looked up by
  example for training batches when the train transform is deterministic, and for a method's
  passes over the clean train examples always. ``views`` (and ``auto`` when more epochs read
  it than it costs): :class:`~kdlab.view_cache.ViewCache`, the logits of every augmented
  view. Methods that need teacher features or transform the batch always run the teachers.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .errors import ConfigError, TeacherLoadError
from .io import atomic_torch_save, progress
from .methods.base import Method, Outputs
from .models import build_model
from .models.features import FeatureHooks
from .models.loading import freeze, load_weights
from .teacher_config import TeacherSpec
from .view_cache import ViewCache

log = logging.getLogger("kdlab")

# teacher_cache=auto keeps the logit cache only below this size (memory and disk force it).
LOGIT_CACHE_AUTO_BYTES = 4 * 2**30


def load_teachers(specs: list[TeacherSpec], num_classes: int, input_shape: tuple[int, ...]
                  ) -> list[tuple[TeacherSpec, nn.Module]]:
    """Every teacher built, its weights loaded (``spec.weights``), frozen."""
    out = []
    for spec in specs:
        if spec.weights is None:
            raise TeacherLoadError(f"{spec.where} ({spec.name}) has no weights yet: "
                                   "ckpt=auto teachers are trained by kdlab.pipeline first")
        model = build_model(spec.arch, num_classes, input_shape, where=spec.where)
        load_weights(model, spec.weights, allow_pickle=bool(spec.options.get("allow_pickle")))
        out.append((spec, freeze(model)))
    return out


# -- outputs during training ---------------------------------------------------------------


def channels_last(x: Tensor) -> Tensor:
    """Image batches (N, C, H, W) in the channels_last layout the models are kept in."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def forward_with_features(model: nn.Module, x: Tensor, paths: tuple[str, ...]) -> Outputs:
    if not paths:
        return Outputs(logits=model(x))
    with FeatureHooks(model, paths) as feats:
        logits = model(x)
    return Outputs(logits=logits, features=dict(feats))


def _as_float(t: Tensor) -> Tensor:
    """A float32 copy (bf16 outputs of autocast); float64 stays float64 (the tests)."""
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32, copy=True)


def _tensor_buffer(t: Tensor):
    """The tensor's bytes as a buffer for hashing (no copy when it is already on the CPU)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


@dataclass(frozen=True)
class Placement:
    """Where and how the teachers run in this process: the device, the trainer's precision
    (its name, part of a cache's key, and its autocast context), whether this process writes
    shared cache files (DDP rank 0) and shows progress bars."""

    device: Any = "cpu"
    precision: str = "32-true"
    autocast: Callable[[], AbstractContextManager] = nullcontext
    writes_files: bool = True
    show_progress: bool = False


class Teachers:
    """The frozen teachers of a run and the caches of their logits on the train split.

    Not an ``nn.Module`` on purpose: teachers are neither optimised nor written into every
    checkpoint. ``forward``/``for_training_batch``/``for_train_examples`` return float32
    outputs without autograd history; callers run them inside the trainer's precision.
    """

    def __init__(self, loaded: list[tuple[TeacherSpec, nn.Module]] | list[nn.Module] = (),
                 cache_mode: str = "auto", cache_dir: str | Path | None = None,
                 cache_runs: int = 1):
        """``loaded``: (spec, frozen model) pairs as :func:`load_teachers` returns, or
        plain models."""
        pairs = [item if isinstance(item, tuple) else (None, item) for item in loaded]
        self.specs = [s for s, _ in pairs]
        self.models = tuple(m for _, m in pairs)
        self.cache_mode = cache_mode
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.cache_runs = int(cache_runs)  # runs expected to read a cache (a sweep's size)
        self._logits: list[Tensor] | None = None  # (N_train, C) per teacher
        self.views: ViewCache | None = None  # (K, N_train, views, C), teacher_cache=views
        self._cache_allowed = False
        self._batches_are_examples = False  # decided by prepare()
        self._dm: Any = None  # the run's datamodule and placement, from prepare()
        self._placement = Placement()
        self.cache_seconds = 0.0
        self.cache_loaded = False

    def __len__(self) -> int:
        return len(self.models)

    def __getitem__(self, i: int) -> nn.Module:
        return self.models[i]

    def __iter__(self):
        return iter(self.models)

    def to(self, device) -> Teachers:
        # channels_last: measured 1.2x faster frozen-teacher convolutions on CPU (oneDNN),
        # and the tensor-core layout on GPUs; no effect on non-conv models.
        for t in self.models:
            t.to(device, memory_format=torch.channels_last).eval()
        return self

    def forward(self, x: Tensor, paths: tuple[str, ...] = ()) -> list[Outputs]:
        """Every teacher's logits (and features at ``paths``), float32, no autograd history."""
        x = channels_last(x)
        with torch.inference_mode():
            raw = [forward_with_features(t, x, paths) for t in self.models]
        # clone out of inference mode: the tensors may be saved for a backward pass
        return [Outputs(_as_float(o.logits),
                        {k: _as_float(v) for k, v in o.features.items()}) for o in raw]

    # -- the caches ------------------------------------------------------------------------
    def prepare(self, dm, method: Method, epochs: int, placement: Placement) -> None:
        """At fit start: which caches this run keeps, decided from the datamodule (its size
        and classes, whether a training batch is its stored examples, its enumerable views),
        the method's declared needs (a teacher, features, a batch transform) and the
        precision. A cache that training batches read is built now; the un-augmented logit
        cache of a method's own clean passes on first use."""
        self.to(placement.device)
        self._dm, self._placement = dm, placement
        # a training batch's inputs are the stored examples (no random augmentation, no
        # batch transform): teacher logits may be looked up by example
        self._batches_are_examples = bool(dm.deterministic_train) and not method.transforms_batch
        features = bool(method.teacher_features)
        if self.plan_cache(dm.train_size, dm.num_classes, self._batches_are_examples,
                           features) and method.needs_teacher:
            self._build_train_cache()
        elif method.needs_teacher and self.use_views(epochs, dm.augmentation_views, features,
                                                     method.transforms_batch):
            self.build_view_cache(
                dm, key=lambda: data_key(dm, placement.precision)
                + f"|views:{dm.augmentation_views}".encode(),  # the crop padding's views
                device=placement.device, precision=placement.autocast,
                dtype=torch.bfloat16 if "bf16" in placement.precision else torch.float32,
                show_progress=placement.show_progress)

    def for_training_batch(self, batch: dict[str, Tensor], paths: tuple[str, ...] = ()
                           ) -> list[Outputs]:
        """Outputs for a training batch: looked up when the batch's inputs are stored
        examples (see :meth:`prepare`) or enumerated views of them (``batch["view"]`` with
        the view cache), and no features are needed; else the teachers run."""
        if paths:
            return self.forward(batch["input"], paths)
        if self._logits is not None and self._batches_are_examples:
            return self._lookup(batch["index"])
        if self.views is not None and "view" in batch:
            return self.views.lookup(batch["index"], batch["view"])
        return self.forward(batch["input"], paths)

    def for_train_examples(self, batch: dict[str, Tensor]) -> list[Outputs]:
        """Outputs for un-augmented train examples (``batch["index"]`` = their positions):
        from the cache, built on first use when :meth:`prepare` allowed it."""
        if self._logits is None and self._cache_allowed:
            self._build_train_cache()
        if self._logits is not None:
            return self._lookup(batch["index"])
        return self.forward(batch["input"])

    def _lookup(self, index: Tensor) -> list[Outputs]:
        return [Outputs(cached[index]) for cached in self._logits]

    def _build_train_cache(self) -> None:
        """Every teacher's logits on the whole un-augmented train split (every rank)."""
        dm, where = self._dm, self._placement
        positions = torch.arange(dm.train_size).split(dm.eval_batch_size)
        self.build_cache((dm.examples("train", pos, where.device) for pos in positions),
                         dm.train_size, dm.num_classes, where.device,
                         key=lambda: data_key(dm, where.precision), save=where.writes_files,
                         show_progress=where.show_progress, precision=where.autocast)

    def plan_cache(self, train_size: int, num_classes: int, deterministic: bool,
                   needs_features: bool) -> bool:
        """Whether the cache may be kept; True when it should be built before training."""
        self._cache_allowed = False
        if self.cache_mode == "off" or not self.models:
            return False
        size = train_size * num_classes * 4 * len(self.models)
        if self.cache_mode == "auto" and size > LOGIT_CACHE_AUTO_BYTES:
            log.info("teacher_cache=auto: %.1f GiB of teacher logits is over the %.0f GiB "
                     "limit; teachers run every step (teacher_cache=memory forces the cache)",
                     size / 2**30, LOGIT_CACHE_AUTO_BYTES / 2**30)
            return False
        self._cache_allowed = True
        return deterministic and not needs_features

    def build_cache(self, batches: Iterable[dict[str, Tensor]], train_size: int,
                    num_classes: int, device, key: Callable[[], bytes], save: bool,
                    show_progress: bool, precision: Callable[[], Any] = nullcontext) -> None:
        """Fill the cache from ``batches`` (un-augmented, on ``device``, every example once),
        or load it from disk (``teacher_cache=disk``)."""
        start = time.perf_counter()
        path = self._cache_file(key) if self.cache_mode == "disk" else None
        cache = self._load(path, (train_size, num_classes), device) if path else None
        self.cache_loaded = cache is not None
        if cache is None:
            cache = [torch.empty(train_size, num_classes, device=device) for _ in self.models]
            with progress("teacher logits (train split, once)", train_size, "example",
                          show_progress) as advance:
                for batch in batches:
                    with precision():
                        outs = self.forward(batch["input"])
                    for store, out in zip(cache, outs, strict=True):
                        store[batch["index"]] = out.logits
                    advance(len(batch["index"]))
            if path is not None and save:
                atomic_torch_save([c.cpu() for c in cache], path)
        self._logits = cache
        self.cache_seconds += time.perf_counter() - start

    def use_views(self, epochs_reading: int, views: int, needs_features: bool,
                  transforms_batch: bool) -> bool:
        """Whether to build the every-view cache: asked for (``views``), or, with ``auto``,
        when more epochs will read it (this run's times ``cache_runs``) than the views it
        must compute. Never for teacher features or a batch transform."""
        if not views or not self.models or needs_features or transforms_batch:
            return False
        if self.cache_mode == "views":
            return True
        return self.cache_mode == "auto" and epochs_reading * self.cache_runs > views

    def build_view_cache(self, dm, key: Callable[[], bytes], device, precision: Callable,
                         dtype: torch.dtype, show_progress: bool) -> None:
        """Every teacher's logits for every view of every train example (see ViewCache)."""
        start = time.perf_counter()
        n, views = dm.train_size, dm.augmentation_views
        cache = ViewCache(self._cache_file(key, suffix="views.bin"),
                          (len(self.models), n, views, dm.num_classes), dtype)

        def fill_view(v: int, table: Tensor) -> None:
            for index in torch.arange(n).split(dm.eval_batch_size):
                x = dm.train_view(index, torch.full_like(index, v), device)
                with precision():
                    outs = self.forward(x)
                for k, out in enumerate(outs):
                    table[k, index, v] = out.logits.to("cpu", dtype)

        self.cache_loaded = cache.build(fill_view, show_progress)
        self.views = cache
        self.cache_seconds += time.perf_counter() - start

    def _cache_file(self, key: Callable[[], bytes], suffix: str = "pt") -> Path:
        """A file named by everything the logits depend on: the teachers' classes and
        weights, the data (``key``: dataset, train inputs, precision) and the kdlab version."""
        if self.cache_dir is None:
            raise ConfigError("teacher_cache=disk needs a cache directory (paths.cache_dir)")
        h = hashlib.sha256()
        h.update(key())
        h.update(__version__.encode())
        for teacher in self.models:
            h.update(type(teacher).__name__.encode())
            for name, value in sorted(teacher.state_dict().items()):
                h.update(name.encode())
                h.update(_tensor_buffer(value))
        return self.cache_dir / f"{h.hexdigest()[:24]}.{suffix}"

    def _load(self, path: Path, shape: tuple[int, int], device) -> list[Tensor] | None:
        """A saved cache, or None when it is missing or unusable (then recomputed)."""
        if not path.is_file():
            return None
        try:
            cache = torch.load(path, map_location=device, weights_only=True)
        except Exception as err:  # a truncated or foreign file: recompute and overwrite it
            log.warning("ignoring teacher logit cache %s (%s); recomputing it", path, err)
            return None
        if (not isinstance(cache, list) or len(cache) != len(self.models)
                or any(not isinstance(c, Tensor) or tuple(c.shape) != shape for c in cache)):
            log.warning("ignoring teacher logit cache %s (unexpected contents); recomputing",
                        path)
            return None
        return [c.float() for c in cache]


def data_key(dm, precision: str) -> bytes:
    """What a teacher-logit cache of ``dm``'s train split depends on besides the teachers."""
    h = hashlib.sha256()
    h.update(f"{dm.name}|{dm.num_classes}|{precision}".encode())
    dm.hash_train_inputs(h)
    return h.digest()
