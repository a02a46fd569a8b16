"""Typed hyper-parameters: every method declares its settings' types once, as annotations
on its constructor, and values are converted or refused there with one error line.

Table-driven over every shipped method config (conf/method/*.yaml): each builds with its
defaults, a wrong type for a numeric key is one ConfigError line, and the declared types
agree with the YAML's values. An ast scan keeps casts of hyper-parameters out of the method
constructors. (The command line's way -- one `kdlab: error:` line, no run directory -- is
tests/test_bad_input.py's "value of the wrong type".)
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

import kdlab.methods
from kdlab.config import compose, conf_dir
from kdlab.errors import ConfigError
from kdlab.methods.alm_kd import ALMKD
from kdlab.methods.at import AT
from kdlab.methods.base import Method
from kdlab.methods.dhkd import DHKD
from kdlab.methods.dkd import DKD
from kdlab.methods.dml import DML
from kdlab.methods.hyperparameters import declared_types
from kdlab.methods.kd import KD
from kdlab.methods.mlkd import MLKD
from kdlab.methods.tgeo_kd import TGeoKD

if TYPE_CHECKING:
    from collections.abc import Sequence

CONFIGS = sorted(p.stem for p in (conf_dir() / "method").glob("*.yaml"))
METHODS_DIR = Path(kdlab.methods.__file__).parent


@pytest.fixture(scope="module")
def method_configs() -> dict[str, dict]:
    """Each method config's keys as a run composes them (interpolations resolved)."""
    return {name: OmegaConf.to_container(compose([f"method={name}"]).method, resolve=True)
            for name in CONFIGS}


def build(config: dict, **changes):
    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    return get_class(config["_target_"])(**{**settings, **changes})


def first_numeric_key(config: dict) -> tuple[str, str]:
    """The config's first key declared exactly float or int, and how its error says so."""
    types = declared_types(get_class(config["_target_"]).__init__)
    words = {float: "a number", int: "an integer"}
    return next((key, words[types[key]]) for key in config if types.get(key) in words)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_method_config_builds_with_its_defaults(name, method_configs):
    method = build(method_configs[name])
    assert isinstance(method, Method) and method.name in (name, name.removesuffix("_ls"),
                                                          "nd")


@pytest.mark.parametrize("name", CONFIGS)
def test_a_wrong_type_for_a_numeric_key_is_one_error_line(name, method_configs):
    key, expected = first_numeric_key(method_configs[name])
    with pytest.raises(ConfigError) as error:
        build(method_configs[name], **{key: "abc"})
    assert str(error.value) == f"method.{key} must be {expected}, got 'abc'"


def same_kind(value, kind) -> bool:
    """Whether a YAML value is literally of the declared kind (4 is not a float, [1, 2] is a
    tuple[float, ...] only if its items are floats)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is typing.Any:
        return False  # kdlab's own methods declare a checked type for every setting
    if origin in (typing.Union, types.UnionType):
        return any(same_kind(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list):
        items = args[:1] * len(value) if origin is list or args[1:] == (Ellipsis,) else args
        return isinstance(value, list) and len(items) == len(value) and all(
            same_kind(v, k) for v, k in zip(value, items, strict=True))
    if origin is not None and issubclass(origin, typing.Mapping):
        return isinstance(value, dict)
    return type(value) is kind


@pytest.mark.parametrize("name", CONFIGS)
def test_the_declared_types_agree_with_the_yaml_defaults(name, method_configs):
    config = method_configs[name]
    init = get_class(config["_target_"]).__init__
    types = declared_types(init)
    for key, value in config.items():
        if not key.startswith("_"):
            assert same_kind(value, types[key]), (key, value, types[key])
    # the constructor's own defaults too
    defaults = {p.name: p.default for p in inspect.signature(init).parameters.values()
                if p.name in types}
    for key, default in defaults.items():
        value = list(default) if isinstance(default, tuple) else default
        assert same_kind(value, types[key]), (key, default, types[key])


def kdlab_methods() -> list[type[Method]]:
    for info in pkgutil.iter_modules([str(METHODS_DIR)]):
        importlib.import_module(f"kdlab.methods.{info.name}")
    found, todo = [], list(Method.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return [c for c in found if c.__module__.startswith("kdlab.methods.")]


def test_every_kdlab_method_types_every_constructor_parameter():
    methods = kdlab_methods()
    shipped = {get_class(OmegaConf.load(p)._target_)
               for p in (conf_dir() / "method").glob("*.yaml")}
    assert shipped <= set(methods)
    for cls in methods:
        params = [p for p in inspect.signature(cls.__init__).parameters.values()][1:]
        types = declared_types(cls.__init__)
        for p in params:
            assert p.name in types, f"{cls.__name__}.{p.name} has no annotation"
            assert types[p.name] is not typing.Any, f"{cls.__name__}.{p.name}: Any"


CASTS = {"float", "int", "bool", "str", "tuple", "list"}


def casts_of_parameters(path: Path) -> list[str]:
    """``float(x)``-style calls in a constructor of ``path`` whose argument mentions one of
    the constructor's parameters (``x`` or ``self.x``)."""
    found = []
    for cls in ast.walk(ast.parse(path.read_text())):
        if not isinstance(cls, ast.ClassDef):
            continue
        for init in cls.body:
            if not (isinstance(init, ast.FunctionDef) and init.name == "__init__"):
                continue
            params = {a.arg for a in [*init.args.args[1:], *init.args.kwonlyargs]}
            for call in ast.walk(init):
                if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                        and call.func.id in CASTS):
                    continue
                named = {n.id for n in ast.walk(call) if isinstance(n, ast.Name)}
                named |= {n.attr for n in ast.walk(call) if isinstance(n, ast.Attribute)
                          and isinstance(n.value, ast.Name) and n.value.id == "self"}
                if named & params:
                    found.append(f"{path.name}:{call.lineno} {ast.unparse(call)}")
    return found


def test_the_scan_finds_a_cast(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("class M:\n    def __init__(self, t=1, w=2):\n"
                      "        self.t = float(t)\n        self.w = w\n"
                      "        self.s = int(self.w)\n        self.n = float('nan')\n")
    assert casts_of_parameters(source) == ["m.py:3 float(t)", "m.py:5 int(self.w)"]


def test_no_method_constructor_casts_a_hyperparameter():
    files = sorted(METHODS_DIR.glob("*.py"))
    assert len(files) > 25
    assert [c for f in files for c in casts_of_parameters(f)] == []


# -- the conversion itself, one declared kind at a time ------------------------------------


@pytest.mark.parametrize("method,key,given,held", [
    (KD, "temperature", 4, 4.0),                        # an int where a float is declared
    (KD, "logit_standardization", True, True),
    (DKD, "warmup_epochs", 7, 7),
    (ALMKD, "meta_every", 3, 3),                        # int | "auto"
    (ALMKD, "meta_every", "auto", "auto"),
    (TGeoKD, "init_alpha", None, None),                 # float | None
    (ALMKD, "scale_max", 3, 3.0),
    (TGeoKD, "controller_betas", [0.5, 0], (0.5, 0.0)),  # a YAML list to a tuple of floats
    (MLKD, "temperatures", [1, 2.5, 3], (1.0, 2.5, 3.0)),
    (MLKD, "temperatures", OmegaConf.create([1, 2]), (1.0, 2.0)),  # a config's list node
    (AT, "student_layers", ["layer1", "layer2"], ["layer1", "layer2"]),
    (DHKD, "head", "mlp", "mlp"),
    (DML, "peer", {"_target_": "x.y"}, None),           # kept until setup builds the peer
])
def test_values_arrive_as_their_declared_type(method, key, given, held):
    value = getattr(method(**{key: given}), key)
    assert value == held and type(value) is type(held)


@pytest.mark.parametrize("method,key,given,message", [
    (KD, "temperature", "abc", "method.temperature must be a number, got 'abc'"),
    (KD, "temperature", True, "method.temperature must be a number, got True"),
    (KD, "logit_standardization", 1, "method.logit_standardization must be true or false, "
                                     "got 1"),
    (DKD, "warmup_epochs", 2.5, "method.warmup_epochs must be an integer, got 2.5"),
    (ALMKD, "meta_every", 2.5, "method.meta_every must be an integer or auto, got 2.5"),
    (ALMKD, "scale_max", "big", "method.scale_max must be a number or null, got 'big'"),
    (DHKD, "head", "conv", "method.head must be one of linear, mlp, got 'conv'"),
    (TGeoKD, "controller_betas", [0.9], "method.controller_betas must be a list of 2 numbers, "
                                        "got [0.9]"),
    (MLKD, "temperatures", [2, "x"], "method.temperatures must be a list of numbers, "
                                     "got [2, 'x']"),
    (AT, "student_layers", 3, "method.student_layers must be a string or a list of strings, "
                              "got 3"),
    (DML, "peer", 3, "method.peer must be a string or a mapping or null, got 3"),
])
def test_a_value_of_another_type_is_refused_by_name(method, key, given, message):
    with pytest.raises(ConfigError) as error:
        method(**{key: given})
    assert str(error.value) == message


class Untyped(Method):
    """A user's method in the style of docs/extending.md before annotations: untouched."""

    name = "untyped"

    def __init__(self, weight=1, mode="a"):
        super().__init__()
        self.weight, self.mode = weight, mode


class Typed(Method):
    name = "typed"

    def __init__(self, weight: float = 1.0, mode: typing.Literal["a", "b"] = "a",
                 later: Sequence[str] = ()):  # only a type checker sees Sequence
        super().__init__()


class TypedSubclass(KD):
    """A subclass that adds a setting and passes KD's on."""

    def __init__(self, extra: int = 2, **kwargs):
        super().__init__(**kwargs)


def test_a_method_without_annotations_gets_its_values_as_given():
    method = Untyped(weight="heavy", mode=3)
    assert (method.weight, method.mode) == ("heavy", 3)
    assert Untyped(weight=2).weight == 2 and type(Untyped(weight=2).weight) is int


def test_annotations_that_do_not_resolve_leave_a_method_untyped():
    # `Sequence` is imported for type checkers only: the annotations cannot be evaluated,
    # so nothing is converted, checked or kept (the method still builds)
    method = Typed(weight=2, mode="zzz")
    assert not hasattr(method, "weight") and not hasattr(method, "mode")


def test_a_subclass_converts_its_own_settings_and_its_parents():
    method = TypedSubclass(extra=3, temperature=2)
    assert (method.extra, method.temperature) == (3, 2.0) and type(method.temperature) is float
    with pytest.raises(ConfigError, match="method.extra must be an integer, got 'x'"):
        TypedSubclass(extra="x")


def test_describe_and_setting_still_read_the_constructor():
    assert KD.setting({}, "temperature") == 4.0
    assert KD.setting({"temperature": 2.0}, "temperature") == 2.0
    assert KD.describe({"logit_standardization": True}).startswith("KD with logit")
    assert KD.describe({}) == KD.description
