"""Everything about teachers: which ones a run has, where their weights come from, and
their outputs during training.

* Weights: ``teacher.ckpt`` (a kdlab checkpoint, a ``state_dict`` file, ``tv:<weights>``),
  or ``auto``: the teacher is trained first with CE on the **dataset's recipe**
  (``dataset.recipe``: epochs, SGD settings, schedule), whatever the student's optimiser,
  schedule or epochs; ``teacher.max_epochs``, ``teacher.lr``, ``teacher.weight_decay`` and
  ``teacher.label_noise`` (``same``: the run's noisy labels; ``none``: the clean labels of the
  same train split) change it. The result is cached under ``paths.cache_dir/teachers``,
  keyed by everything that determines it, and trained once under a file lock when several
  jobs of a sweep need it.
* :class:`Teachers` is the one object the LightningModule calls for teacher outputs: frozen
  models (eval mode, no gradients, channels_last), run under ``inference_mode``. It decides
  its caches itself at fit start (:meth:`Teachers.prepare`: from the datamodule, the method's
  declared needs and the precision). The **teacher-logit cache**: each teacher's logits on
  the un-augmented train split, computed once and looked up by example index -- for training
  batches when the train transform is deterministic, and for a method's own passes over the
  clean train examples (e.g. a meta-learning pass) always (built on first use).
  ``teacher_cache``: auto (when it fits in 4 GiB) | memory | disk (also saved under
  ``paths.cache_dir/teacher_logits``, named by the teachers' weights, the train inputs, the
  precision and the kdlab version) | views | off.
* ``views`` (and ``auto`` when more epochs will read it than it costs): the teachers' logits
  for every (example, augmented view) of an enumerable augmentation (CIFAR's crop + flip: 162
  views), a memory-mapped :class:`ViewCache` built once (resumable, under a lock) and looked
  up by the view each example got. Methods that need teacher features or transform the
  batch always run the teachers.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from . import __version__
from .config import TEACHER_OPTIONS, conf_dir
from .errors import ConfigError
from .io import atomic_torch_save, atomic_write_json
from .methods.base import Method, Outputs
from .models import build_model, count_parameters, model_config
from .models.features import FeatureHooks
from .models.loading import freeze, load_weights
from .selection import selection_rule

log = logging.getLogger("kdlab")

# teacher_cache=auto keeps the logit cache only below this size (memory and disk force it).
LOGIT_CACHE_AUTO_BYTES = 4 * 2**30


# -- which teachers ------------------------------------------------------------------------


@dataclass
class TeacherSpec:
    where: str            # its config key: teacher, teachers[1], ...
    name: str             # the config option (conf/model/<name>.yaml) or the _target_
    arch: DictConfig      # _target_ + architecture options
    options: dict[str, Any]  # ckpt, allow_pickle, label_noise, max_epochs, lr, weight_decay

    @property
    def ckpt(self) -> str:
        return str(self.options.get("ckpt") or "auto")


# Options of `teacher` that the entries of a `teachers` list inherit unless they set their own:
# how an auto-trained teacher is trained (`teacher.label_noise=none` applies to all of them).
INHERITED_OPTIONS = ("label_noise", "max_epochs", "lr", "weight_decay")


def teacher_specs(cfg: DictConfig) -> list[TeacherSpec]:
    """The run's teachers: the ``teachers`` list when set, else ``teacher``."""
    inherited = {}
    if cfg.get("teachers"):
        nodes = [(f"teachers[{i}]", node, None) for i, node in enumerate(cfg.teachers)]
        inherited = {k: cfg.teacher[k] for k in INHERITED_OPTIONS
                     if cfg.get("teacher") is not None and cfg.teacher.get(k) is not None}
    else:
        nodes = [("teacher", cfg.teacher, (cfg.get("choices") or {}).get("teacher"))]
    specs = []
    for where, node, choice in nodes:
        data = OmegaConf.to_container(node, resolve=True)
        options = {**inherited, **{k: data.pop(k) for k in TEACHER_OPTIONS if k in data}}
        model = options.pop("model", None)
        arch = OmegaConf.merge(model_config(model), data) if model else OmegaConf.create(data)
        name = model or choice or str(arch.get("_target_", "?")).rsplit(".", 1)[-1]
        specs.append(TeacherSpec(where, str(name), arch, options))
    return specs


def describe_model(name: str, model: nn.Module) -> dict[str, Any]:
    """What results.json and the summary say about a model: option name and architecture."""
    return {"name": name, "arch": type(model).__name__, "params": count_parameters(model)}


# -- auto-training -------------------------------------------------------------------------

# Trainer settings that change what an auto-trained teacher learns (part of its cache key).
TEACHER_TRAINER_KEYS = ("limit_train_batches", "limit_val_batches", "accumulate_grad_batches",
                        "gradient_clip_val")


def training_config(cfg: DictConfig, spec: TeacherSpec) -> DictConfig:
    """The CE run that trains teacher ``spec``: the same data, split and seed as ``cfg``, on
    the dataset's recipe (with the teacher's own overrides), one process, CSV log only."""
    teacher_cfg = cfg.copy()
    OmegaConf.set_struct(teacher_cfg, False)
    recipe = teacher_cfg.dataset.recipe
    for key in ("max_epochs", "lr", "weight_decay"):
        if spec.options.get(key) is not None:
            recipe[key] = spec.options[key]
    # a shortened recipe (teacher.max_epochs) never reaches its later milestones
    recipe.milestones = [m for m in recipe.get("milestones") or [] if m <= recipe.max_epochs]
    if str(spec.options.get("label_noise") or "same") == "none":
        teacher_cfg.noise = {"type": "none", "rate": 0.0}
    teacher_cfg.method = {"_target_": "kdlab.methods.ce.CE"}
    teacher_cfg.student = spec.arch
    teacher_cfg.teachers = None
    teacher_cfg.resume = False
    teacher_cfg.choices = {**cfg.get("choices", {}), "method": "ce", "student": spec.name,
                           "teacher": None, "noise": teacher_cfg.noise.type}
    teacher_cfg.optimizer = OmegaConf.load(conf_dir() / "optimizer" / "sgd.yaml")
    teacher_cfg.scheduler = OmegaConf.load(conf_dir() / "scheduler" / "recipe.yaml")
    teacher_cfg.trainer.max_epochs = "${dataset.recipe.max_epochs}"
    # Selection sees every epoch of the teacher (its epochs need not suit the student's
    # validation cadence).
    teacher_cfg.trainer.check_val_every_n_epoch = 1
    # One process: a nested multi-process launch would re-run this whole script.
    teacher_cfg.trainer.strategy = "auto"
    teacher_cfg.trainer.devices = 1
    teacher_cfg.logger = {"csv": cfg.logger.csv} if "csv" in (cfg.logger or {}) else {}
    teacher_cfg.callbacks = {}
    OmegaConf.resolve(teacher_cfg)
    return teacher_cfg


def weights_cache_dir(teacher_cfg: DictConfig) -> Path:
    """Cache entry keyed by everything that determines a CE-trained teacher."""
    dataset = OmegaConf.to_container(teacher_cfg.dataset, resolve=True)
    # where/how the data is read changes nothing (its content is the same or refused)
    for k in ("root", "system_root", "url", "download", "num_workers"):
        dataset.pop(k, None)
    dataset.get("recipe", {}).pop("num_threads", None)
    key_source = {
        "dataset": dataset,
        "noise": OmegaConf.to_container(teacher_cfg.noise, resolve=True),
        "arch": OmegaConf.to_container(teacher_cfg.student, resolve=True),
        "optimizer": OmegaConf.to_container(teacher_cfg.optimizer, resolve=True),
        "scheduler": OmegaConf.to_container(teacher_cfg.scheduler, resolve=True),
        "max_epochs": teacher_cfg.trainer.max_epochs,
        "precision": teacher_cfg.trainer.precision,
        # which batches it trains and validates on, and how steps are taken
        "trainer": {k: teacher_cfg.trainer.get(k) for k in TEACHER_TRAINER_KEYS},
        "seed": teacher_cfg.seed,
        # which of its epochs the students learn from
        "selection": selection_rule(teacher_cfg).as_dict(),
    }
    digest = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:16]
    dataset_name = teacher_cfg.choices.get("dataset") or "data"
    return (Path(teacher_cfg.paths.cache_dir) / "teachers"
            / f"{dataset_name}-{teacher_cfg.choices.student}-{digest}")


def selected_checkpoint(entry: Path) -> str | None:
    """Which checkpoint of the auto-trained teacher in cache ``entry`` the students learn
    from (``epoch 27 of 30, best val/acc, ties broken by ...``), from its meta.json."""
    try:
        meta = json.loads((Path(entry) / "meta.json").read_text())
        selection = meta["selection"]
        return f"epoch {selection['epoch']} of {meta['epochs']}, {selection['rule']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recipe_line(teacher_cfg: DictConfig) -> str:
    """``30 epochs, SGD lr 0.05 (momentum 0.9, wd 0.0005), cosine schedule, noisy labels``."""
    r = teacher_cfg.dataset.recipe
    labels = ("clean labels" if teacher_cfg.noise.type == "none"
              else f"{teacher_cfg.noise.type} {teacher_cfg.noise.rate} noisy labels")
    return (f"{r.max_epochs} epochs, SGD lr {r.lr:g} (momentum {r.momentum:g}, "
            f"wd {r.weight_decay:g}{', nesterov' if r.nesterov else ''}), {r.schedule} "
            f"schedule, {labels}")


@contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_trained(cfg: DictConfig, spec: TeacherSpec) -> Path:
    """The cached weights of an auto-trained teacher, training it with CE first if needed."""
    from .train import run  # a teacher's training is a kdlab run of its own

    teacher_cfg = training_config(cfg, spec)
    entry = weights_cache_dir(teacher_cfg)
    weights = entry / "teacher.pt"
    if weights.is_file():
        log.info("teacher %s: reuse %s (%s; CE: %s)", spec.name, weights,
                 selected_checkpoint(entry) or "its best epoch", recipe_line(teacher_cfg))
        return weights
    with file_lock(entry.parent / ".locks" / f"{entry.name}.lock"):
        if weights.is_file():  # another job trained it while we waited
            return weights
        log.info("teacher %s: no %s.ckpt given, training it with CE first: %s -> %s",
                 spec.name, spec.where, recipe_line(teacher_cfg), entry)
        run_dir = entry / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
        results = run(teacher_cfg, run_dir)
        best = torch.load(results["checkpoints"]["best"], map_location="cpu", weights_only=True)
        atomic_write_json(entry / "meta.json", {"arch": spec.name, "run_dir": str(run_dir),
                                                "recipe": recipe_line(teacher_cfg),
                                                "test": results["test"],
                                                "best_epoch": results["best_epoch"],
                                                "epochs": results["epochs"],
                                                "selection": results["selection"]})
        atomic_torch_save(best["state_dict"], weights)
        log.info("teacher %s: trained; the students learn from %s (%s)", spec.name,
                 selected_checkpoint(entry), results["selection"]["reason"])
    return weights


def load_teachers(cfg: DictConfig, num_classes: int, input_shape: tuple[int, ...]
                  ) -> list[tuple[TeacherSpec, nn.Module]]:
    """Every teacher built, its weights loaded (auto-training it first if needed), frozen."""
    out = []
    for spec in teacher_specs(cfg):
        model = build_model(spec.arch, num_classes, input_shape, where=spec.where)
        ckpt = spec.ckpt if spec.ckpt != "auto" else str(ensure_trained(cfg, spec))
        load_weights(model, ckpt, allow_pickle=bool(spec.options.get("allow_pickle", False)))
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


@contextmanager
def _progress(description: str, total: int, unit: str, show: bool, done: int = 0):
    """A progress bar on stderr over ``total`` units (``done`` of them already); yields
    ``advance(n)``. The bar ends as one finished line and a newline; when another bar holds
    the line (a lazy build inside Lightning's epoch bar) it is cleared instead."""
    if not show:
        yield lambda n=1: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, initial=done, desc=description, unit=unit, leave=None) as bar:
        yield bar.update


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
            with _progress("teacher logits (train split, once)", train_size, "example",
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


class ViewCache:
    """Every teacher's logits for every (train example, augmented view): a (K, N, V, C)
    table in a memory-mapped file, built view by view (resumable: ``<name>.json`` records
    how many views are done) under a file lock, so that the jobs of a sweep build it once.

    Stored in the teachers' output precision: bfloat16 under bf16-mixed (the teachers' logits
    are bfloat16 values there, so nothing is lost), float32 otherwise.
    """

    def __init__(self, path: Path, shape: tuple[int, int, int, int], dtype: torch.dtype):
        self.path, self.shape, self.dtype = Path(path), tuple(shape), dtype
        self.meta_path = self.path.with_suffix(".json")
        self.table: Tensor | None = None

    def _meta(self) -> dict[str, Any]:
        expected = {"shape": list(self.shape), "dtype": str(self.dtype), "version": __version__}
        if self.meta_path.is_file() and self.path.is_file():
            meta = json.loads(self.meta_path.read_text())
            if {k: meta.get(k) for k in expected} == expected:
                return meta
        return {**expected, "views_done": 0}

    def build(self, fill_view: Callable[[int, Tensor], None], show_progress: bool) -> bool:
        """Fill the views not done yet (``fill_view(v, table)`` writes view v); True if the
        table was complete already."""
        numel = int(torch.Size(self.shape).numel())
        with file_lock(self.path.with_suffix(".lock")):
            meta = self._meta()
            if meta["views_done"] == 0:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "wb") as f:  # a sparse file of the final size
                    f.truncate(numel * torch.empty(0, dtype=self.dtype).element_size())
            table = torch.from_file(str(self.path), shared=True, size=numel,
                                    dtype=self.dtype).view(self.shape)
            complete = meta["views_done"] == self.shape[2]
            with _progress("teacher logits (every augmented view, once)", self.shape[2], "view",
                           show_progress and not complete, done=meta["views_done"]) as advance:
                for v in range(meta["views_done"], self.shape[2]):
                    fill_view(v, table)
                    meta["views_done"] = v + 1
                    atomic_write_json(self.meta_path, meta)
                    advance(1)
        self.table = table
        return complete

    def lookup(self, index: Tensor, views: Tensor) -> list[Outputs]:
        at = torch.stack([index, views]).cpu()  # one device-to-host copy per step
        rows = self.table[:, at[0], at[1]]  # (K, B, C)
        return [Outputs(r.to(index.device, torch.float32)) for r in rows]


def data_key(dm, precision: str) -> bytes:
    """What a teacher-logit cache of ``dm``'s train split depends on besides the teachers."""
    h = hashlib.sha256()
    h.update(f"{dm.name}|{dm.num_classes}|{precision}".encode())
    h.update(_tensor_buffer(dm.splits["train"].inputs))
    return h.digest()
