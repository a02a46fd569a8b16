"""Typed hyper-parameters: a method declares each of its settings once, as an annotated
keyword parameter of its ``__init__`` with a default.

:class:`~kdlab.methods.base.Method` wraps every subclass's ``__init__`` in
:func:`typed_init`: before the constructor body runs, each annotated parameter's value
(from the YAML, the command line, a checkpoint's hyper-parameters or a Python call) is
checked against its annotation, converted, and kept as the attribute of the same name. So
``method.temperature=4`` arrives as ``self.temperature == 4.0``, and
``method.temperature=abc`` is the one error line ``method.temperature must be a number,
got 'abc'`` while the config is checked, before any work.

What an annotation accepts and gives:

* ``float``: an int or a float (not a bool), as a float;
* ``int``: an int (not a bool; ``2.5`` is refused, never rounded);
* ``bool``: true or false; ``str``: a string; ``None``: null;
* ``Literal["a", "b"]``: one of the listed values;
* ``X | Y``: the first of X, Y (in that order) that accepts the value;
* ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``: a list (of the given length for
  ``tuple[X, Y]``), each item as X (Y), as a tuple (list);
* ``Mapping[...]`` / ``dict``: any mapping (a config node), unchanged;
* ``Any`` or another type: unchanged.

Parameters without an annotation pass through untouched and are not kept: typing is opt-in
for a user's method (kdlab's own methods annotate every parameter, a test checks it).
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

from ..errors import ConfigError

# The annotations a value is checked against (anything else passes unchanged).
SCALARS = {float: "a number", int: "an integer", bool: "true or false", str: "a string",
           type(None): "null"}
PLURALS = {float: "numbers", int: "integers", bool: "booleans", str: "strings"}


class _Mismatch(Exception):
    """The value does not fit the annotation (caught to try a union's next member)."""


@functools.cache
def declared_types(init: Callable) -> dict[str, Any]:
    """The annotated parameters of ``init`` (not ``self``, ``*args``, ``**kwargs``), by name,
    in order; ``{}`` when its annotations do not resolve (e.g. names only imported for a
    type checker: such a method is treated as untyped)."""
    try:
        hints = typing.get_type_hints(init)
    except Exception:
        return {}
    params = list(inspect.signature(init).parameters.values())[1:]
    return {p.name: hints[p.name] for p in params if p.name in hints
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def expected(kind: Any) -> str:
    """What ``kind`` accepts, in words: ``a number``, ``an integer or null``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind in SCALARS:
        return SCALARS[kind]
    if origin in (Union, types.UnionType):
        return " or ".join(expected(a) for a in args)
    if origin is Literal:
        return ", ".join(map(str, args)) if len(args) == 1 else \
            f"one of {', '.join(map(str, args))}"
    if origin in (tuple, list):
        if origin is list or args[1:] == (Ellipsis,):
            return f"a list of {PLURALS.get(args[0], 'values')}"
        if len(set(args)) == 1:
            return f"a list of {len(args)} {PLURALS.get(args[0], 'values')}"
        return f"a list of {len(args)} values ({', '.join(expected(a) for a in args)})"
    if origin in (dict, Mapping) or kind in (dict, Mapping):
        return "a mapping"
    return str(kind)


def _convert(value: Any, kind: Any) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind in SCALARS:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is float and number:
            return float(value)
        if kind is int and number and isinstance(value, int) or \
                kind in (bool, str, type(None)) and isinstance(value, kind):
            return value
    elif origin in (Union, types.UnionType):
        for member in args:
            try:
                return _convert(value, member)
            except _Mismatch:
                pass
    elif origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
    elif origin in (tuple, list):
        if isinstance(value, Sequence) and not isinstance(value, str):
            fixed = origin is tuple and args[1:] != (Ellipsis,)
            items = args if fixed else args[:1] * len(value)
            if len(items) == len(value):
                return origin(_convert(v, k) for v, k in zip(value, items, strict=True))
    elif origin in (dict, Mapping) or kind in (dict, Mapping):
        if isinstance(value, Mapping):
            return value
    else:  # Any, or a type this module does not check
        return value
    raise _Mismatch


def convert(where: str, value: Any, kind: Any) -> Any:
    """``value`` as the annotation ``kind`` declares it, else a one-line ConfigError naming
    ``where`` (the key), what it must be and the value."""
    try:
        return _convert(value, kind)
    except _Mismatch:
        raise ConfigError(f"{where} must be {expected(kind)}, got {value!r}") from None


def typed_init(init: Callable) -> Callable:
    """``init`` that first converts its annotated arguments (:func:`convert`, errors named
    ``method.<parameter>``) and keeps each as ``self.<parameter>``."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def init_with_typed_arguments(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        for name, kind in declared_types(init).items():
            value = convert(f"method.{name}", bound.arguments[name], kind)
            bound.arguments[name] = value
            setattr(self, name, value)
        init(*bound.args, **bound.kwargs)

    return init_with_typed_arguments

