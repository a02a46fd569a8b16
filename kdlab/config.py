"""Config plumbing: where conf/ lives, composition outside a Hydra app, the config search
path that group files are read through, and the keys a config may have.

Only configs here: what checks a config against the code (its models, datamodule and method
built) is :mod:`kdlab.preflight`.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import inspect
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from .errors import ConfigError

CONFIG_MODULE = "kdlab.conf"
# Keys of a `_target_` node that Hydra reads itself.
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
# Keys of a teacher node (`teacher` and the entries of `teachers`) that say how to get the
# teacher, not what its architecture is.
TEACHER_OPTIONS = ("model", "ckpt", "allow_pickle", "label_noise", "max_epochs", "lr",
                   "weight_decay")
CHOICE_GROUPS = ("dataset", "student", "teacher", "method", "noise")
# Config nodes that take new keys of the user's (`+callbacks.NAME={_target_: ...}`).
FREE_KEY_NODES = ("callbacks", "logger")


def conf_dir() -> Path:
    return Path(str(resources.files(CONFIG_MODULE)))


@functools.cache
def not_the_experiment() -> tuple[str, ...]:
    """Config keys that do not change what a run computes (``resume``, ``logger``, threads,
    machine paths, ...): conf/train.yaml's ``hydra.job.config.override_dirname.exclude_keys``,
    the one list that keeps them out of sweep job directory names, out of ``kdlab report``'s
    grouping and out of resume's same-config check."""
    train = OmegaConf.load(conf_dir() / "train.yaml")
    return tuple(train.hydra.job.config.override_dirname.exclude_keys)


def changes_the_experiment(key: str) -> bool:
    """False for a key of :func:`not_the_experiment` or below one (``logger.wandb.tags``)."""
    key = key.lstrip("+~")
    return not any(key == k or key.startswith(f"{k}.") for k in not_the_experiment())


def hydra_quoted(value: str) -> str:
    """A value in Hydra's override grammar as one quoted string (directory names of sweep
    jobs hold ``=`` and ``,``, which Hydra would otherwise parse)."""
    escaped = re.sub(r'(\\*)"', lambda m: 2 * m.group(1) + '\\"', value)
    return '"' + re.sub(r"(\\+)$", lambda m: 2 * m.group(1), escaped) + '"'


def compose(overrides: list[str] | None = None, config_dirs: list[str | Path] = (),
            config_name: str = "train", keep_hydra: bool = False) -> DictConfig:
    """The config ``kdlab train OVERRIDES`` would run, composed outside a Hydra app.

    ``config_dirs`` are extra config directories (like ``--config-dir``), searched after
    kdlab's own: they add options (a config of the same name as kdlab's is kdlab's). Group
    files read later (:func:`read_group`) come from the same search path. ``choices`` holds
    the option names; ``+key`` overrides are checked. ``keep_hydra``: keep Hydra's own
    settings under ``hydra`` (unresolved).
    """
    overrides = list(overrides or [])
    if config_dirs:  # like --config-dir (with any hydra.searchpath given)
        given = [o for o in overrides if o.startswith("hydra.searchpath=")]
        overrides = [o for o in overrides if o not in given]
        paths = [hydra_quoted(f"file://{Path(d).resolve()}") for d in config_dirs]
        for o in given:
            paths += [p.strip() for p in o.split("=", 1)[1].strip("[]").split(",") if p.strip()]
        overrides.append(f"hydra.searchpath=[{','.join(paths)}]")
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        try:
            cfg = hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
        except ConfigCompositionException as e:
            if not isinstance(e.__cause__, (ConfigAttributeError, ConfigKeyError)):
                raise
            key = e.__cause__.full_key  # the first key of the override that does not exist
            rest = [o for o in overrides if _override_key(o) != key
                    and not _override_key(o).startswith(f"{key}.")]
            base = hydra_compose(config_name, overrides=rest, return_hydra_config=False)
            parent_key = key.rpartition(".")[0]
            raise unknown_key_error(key, OmegaConf.select(base, parent_key) if parent_key
                                    else base) from None
    use_config_sources(cfg.hydra.runtime.config_sources)
    choices = cfg.hydra.runtime.choices
    with open_dict(cfg):
        cfg.choices = {g: choices.get(g) for g in CHOICE_GROUPS}
        if not keep_hydra:
            del cfg["hydra"]
    check_added_keys(cfg, overrides)
    return cfg


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


# -- group files, through the config search path -------------------------------------------

# The search path of the latest composition (compose(), or the Hydra app running the job),
# as the entries it has besides kdlab's own conf and Hydra's: --config-dir, hydra.searchpath.
# Group files read through it are kept while no file on the search path changes (a sweep's
# jobs, or the tests' runs, read each once; an edited file is read again).
_extra_sources: list[str] = []
_read: dict[tuple, DictConfig] = {}
_read_stamp: tuple | None = None
KDLAB_SOURCE = f"pkg://{CONFIG_MODULE}"
_OWN_SOURCES = (KDLAB_SOURCE, "pkg://hydra.conf", "structured://")


def use_config_sources(sources: Iterable[Any]) -> None:
    """Read group files from ``sources`` from now on: a composition's
    ``hydra.runtime.config_sources`` (kdlab's conf, ``--config-dir``, ``hydra.searchpath``)."""
    _extra_sources[:] = [url for url in (f"{s.schema}://{s.path}" for s in sources)
                         if url not in _OWN_SOURCES]


def _source_dir(url: str) -> Path | None:
    """The directory a search-path entry reads from, or None (a package that is not a
    directory on disk: a zip)."""
    schema, _, where = url.partition("://")
    if schema == "file":
        return Path(where)
    if schema == "pkg":
        try:
            found = resources.files(where.replace("/", "."))
        except (ModuleNotFoundError, TypeError):
            return None
        return found if isinstance(found, Path) else None
    return None


def _sources_stamp() -> tuple | None:
    """(path, mtime, size) of every file on the search path: the state of the config files
    that the group-file cache is valid for (None: a source cannot be listed, no cache)."""
    stamp = []
    for url in (KDLAB_SOURCE, *_extra_sources):
        root = _source_dir(url)
        if root is None:
            return None
        if root.is_dir():
            for path in sorted(root.rglob("*.yaml")):
                info = path.stat()
                stamp.append((str(path), info.st_mtime_ns, info.st_size))
    return tuple(stamp)


def _search_path_override() -> str:
    """kdlab's conf (also under another app's Hydra) and the composition's extra entries."""
    return f"hydra.searchpath=[{','.join(map(hydra_quoted, [KDLAB_SOURCE, *_extra_sources]))}]"


@contextmanager
def _config_loader():
    """Hydra's config loader: the running app's, else one for kdlab's conf."""
    if GlobalHydra.instance().is_initialized():
        yield GlobalHydra.instance().config_loader()
        return
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        yield GlobalHydra.instance().config_loader()


def read_group(group: str, option: str) -> DictConfig:
    """The group file ``<group>/<option>.yaml`` as Hydra finds it on the config search path
    (kdlab's conf/, then the user's directories); ``hydra.errors.MissingConfigException``
    (with the group's ``options``) when there is none."""
    global _read_stamp
    stamp = _sources_stamp()
    if stamp is None or stamp != _read_stamp:
        _read.clear()
        _read_stamp = stamp
    key = (tuple(_extra_sources), group, option)
    if key not in _read:
        with _config_loader() as loader:
            cfg = loader.load_configuration(
                config_name=None, overrides=[_search_path_override(), f"+{group}={option}"],
                run_mode=RunMode.RUN)
        node = OmegaConf.select(cfg, group.replace("/", "."))
        _read[key] = OmegaConf.create(OmegaConf.to_container(node, resolve=False))
    return copy.deepcopy(_read[key])


def group_options(group: str) -> list[str]:
    """The options of a config group on the config search path (``model``: cnn, ...)."""
    with _config_loader() as loader:
        return loader.get_group_options(group, ObjectType.CONFIG, config_name=None,
                                        overrides=[_search_path_override()])


# -- keys ----------------------------------------------------------------------------------


def suggest(key: str, candidates: list[str]) -> str:
    """``"; did you mean X?"`` for the closest candidate key, or ``""``.

    Compares the last dotted part: an abbreviation by initials (``learning_rate`` -> ``lr``),
    then a prefix (``max_epoch`` -> ``max_epochs``), then string similarity.
    """
    parent, _, name = key.lower().rpartition(".")
    siblings = [c for c in candidates if c.lower().rpartition(".")[0] == parent]
    last = {c.rsplit(".", 1)[-1].lower(): c for c in siblings or candidates}
    initials = "".join(w[0] for w in name.split("_") if w)
    for short, full in last.items():
        if len(name.split("_")) > 1 and short == initials:
            return f"; did you mean {full}?"
    for short, full in last.items():
        if short.startswith(name) or name.startswith(short) and len(short) > 3:
            return f"; did you mean {full}?"
    close = difflib.get_close_matches(name, list(last), n=1, cutoff=0.6)
    return f"; did you mean {last[close[0]]}?" if close else ""


def unknown_key_error(key: str, parent: Any) -> ConfigError:
    """``unknown key a.b; did you mean a.c?`` from the keys the ``parent`` node of ``key``
    has, or takes (a ``_target_``'s parameters)."""
    parent_key = key.rpartition(".")[0]
    names = [str(n) for n in parent] if isinstance(parent, DictConfig) else []
    target = ""
    if isinstance(parent, DictConfig) and "_target_" in parent:
        target = str(parent._target_)
        names += accepted_keys(import_target(target, parent_key)) or []
    candidates = [f"{parent_key}.{n}" if parent_key else n for n in dict.fromkeys(names)
                  if not n.startswith("_") and n != key.rsplit(".", 1)[-1]]
    hint = suggest(key, candidates)
    if not hint:
        takes = [c.rsplit(".", 1)[-1] for c in candidates]
        hint = (f" ({target or parent_key or 'the config'} takes: {', '.join(takes[:12])}"
                f"{', ...' if len(takes) > 12 else ''})" if takes else ": kdlab does not read it")
    return ConfigError(f"unknown key {key}{hint}")


def check_added_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """``+a.b.key=value`` adds a key: only under a ``_target_`` node (whose signature is
    checked by :func:`validate`), never a key kdlab would silently ignore."""
    for override in overrides:
        if not override.startswith("+") or override.startswith("++"):
            continue
        key = override.lstrip("+").split("=", 1)[0]
        if key.startswith("hydra") or "@" in key:
            continue
        parent_key, _, name = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if (isinstance(parent, DictConfig) and "_target_" in parent) or \
                parent_key in FREE_KEY_NODES:
            continue
        raise unknown_key_error(key, parent)


def nodes_with_target(node: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            if path == "" and key == "hydra":
                continue
            yield from nodes_with_target(node._get_node(key), f"{path}.{key}".lstrip("."))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from nodes_with_target(item, f"{path}[{i}]")


def import_target(target: str, where: str):
    module, _, name = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        hint = ("; is its package installed or on PYTHONPATH (the current directory is)?"
                if isinstance(e, ImportError) else "")
        raise ConfigError(f"{where}._target_: cannot import {target} "
                          f"({type(e).__name__}: {e}){hint}") from None


def accepted_keys(target: Any) -> list[str] | None:
    """The keyword names ``target`` accepts, or None when it takes any (``**kwargs``).

    For a class whose ``__init__`` passes ``**kwargs`` on, the parents' names count too.
    """
    owners = [c for c in inspect.getmro(target) if "__init__" in vars(c)] \
        if inspect.isclass(target) else [target]
    names: list[str] = []
    for owner in owners:
        try:
            params = inspect.signature(owner.__init__ if inspect.isclass(owner) else owner
                                       ).parameters
        except (TypeError, ValueError):
            return None  # a builtin without an inspectable signature
        names += [n for n, p in params.items()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"]
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return names
    return None


def check_signature(where: str, node: DictConfig, ignore: tuple[str, ...] = ()) -> None:
    """Every key of a ``_target_`` node must be a parameter of the callable."""
    known = accepted_keys(import_target(node._target_, where))
    if known is None:
        return
    for key in node:
        if key not in HYDRA_KEYS and key not in ignore and key not in known:
            raise unknown_key_error(f"{where}.{key}", node)
