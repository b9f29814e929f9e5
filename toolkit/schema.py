"""Strict construction of frozen dataclasses from YAML/JSON mappings.

Unknown keys are errors naming the file, the key path and the allowed keys; values are checked
against the dataclass field types (lists become tuples); ``__post_init__`` ValueErrors are reported
with their key path. The same dataclasses drive the CLI options, so defaults are declared once.

Numbers are checked here for every setting at once (``check_numbers``): a float must be finite (YAML's
``.nan`` and ``.inf`` and argparse's ``nan`` compare false with every bound a ``__post_init__`` writes), and an
int (a count, a size, a seed) must be >= 0 and fit in 64 bits, unless its field names the negative values it
accepts in ``metadata={SENTINELS: (-1,)}`` (``group_size: -1``, one group per row).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union

from toolkit.errors import ToolkitError

T = TypeVar("T")

SENTINELS = "sentinels"  # field metadata: the negative values an int setting accepts (they mean something)
INT_LIMIT = 2**63  # every int setting ends up in a C int64 (torch, numpy, onnxruntime)

_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict, _BRIEF.maxstring, _BRIEF.maxother = 2, 4, 4, 60, 60


def brief(value: Any) -> str:
    """A short repr for messages: a YAML alias bomb expands to millions of items, its message must not."""
    return _BRIEF.repr(value)


def _where(origin: str, path: str) -> str:
    return f"{origin}: {path}" if path else origin


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, origin: str, path: str) -> Any:
    base = typing.get_origin(tp)
    args = typing.get_args(tp)
    if base in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, origin, path)
            except ToolkitError as exc:
                errors.append(str(exc))
        raise ToolkitError(errors[0] if errors else f"{_where(origin, path)}: invalid value {brief(value)}")
    if base is tuple:
        if not isinstance(value, list | tuple):
            raise ToolkitError(f"{_where(origin, path)}: expected a list, got {brief(value)}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, origin, f"{path}[{i}]") for i, v in enumerate(value))
    if base is typing.Literal:
        if value not in args:
            raise ToolkitError(f"{_where(origin, path)}: {brief(value)} is not one of {list(args)}")
        return value
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, origin, path)  # type: ignore[arg-type]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= INT_LIMIT:  # float() of a longer int overflows; no setting wants one
            raise ToolkitError(f"{_where(origin, path)}: {brief(value)} is too large for a setting")
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ToolkitError(f"{_where(origin, path)}: expected true or false, got {brief(value)}")
    if tp in (int, float) and isinstance(value, bool):
        raise ToolkitError(f"{_where(origin, path)}: expected a number, got {brief(value)}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ToolkitError(f"{_where(origin, path)}: expected {_type_name(tp)}, got {brief(value)}")
    return value


def build(cls: type[T], data: Any, origin: str, path: str = "") -> T:
    """``cls(**data)`` with strict key and type checks; errors name ``origin`` and the key path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ToolkitError(f"{_where(origin, path)}: expected a mapping of settings, got {brief(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            key_path = f"{path}.{key}" if path else str(key)
            raise ToolkitError(
                f"{origin}: unknown key '{key_path}'{hint}; allowed keys: {', '.join(fields) or 'none'}"
            )
    kwargs = {k: _coerce(v, hints[k], origin, f"{path}.{k}" if path else k) for k, v in data.items()}
    check_numbers(cls, kwargs, origin, path)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ToolkitError(f"{_where(origin, path)}: {exc}") from None


def _choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """The ``typing.Literal`` fields of ``cls`` (``X | None`` too) and their allowed values."""
    found: dict[str, tuple[Any, ...]] = {}
    for name, tp in typing.get_type_hints(cls).items():
        args = typing.get_args(tp)
        optional: tuple[Any, ...] = ()
        if typing.get_origin(tp) in (Union, types.UnionType):
            optional = (None,) if type(None) in args else ()
            tp = next((a for a in args if typing.get_origin(a) is typing.Literal), tp)
            args = typing.get_args(tp)
        if typing.get_origin(tp) is typing.Literal:
            found[name] = args + optional
    return found


def check_choices(obj: Any) -> None:
    """Raise ValueError naming the allowed values when a ``Literal`` field of the dataclass ``obj`` holds another
    (``build`` refuses it in a recipe already; this catches a config built in Python)."""
    for name, allowed in _choices(type(obj)).items():
        value = getattr(obj, name)
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _number_problem(value: Any, sentinels: tuple[int, ...]) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a finite number, got {value}"
    if isinstance(value, int) and value < 0 and value not in sentinels:
        allowed = f" or {', '.join(map(str, sentinels))}" if sentinels else ""
        return f"expected a count, size or seed >= 0{allowed}, got {value}"
    if isinstance(value, int) and value >= INT_LIMIT:
        return f"{brief(value)} is too large (at most 2**63 - 1)"
    return None


def check_numbers(cls: type, values: Mapping[str, Any], origin: str, path: str = "") -> None:
    """Refuse a NaN or infinite float and a negative or oversized int in any field of ``cls`` (tuples item by
    item) before ``cls`` is built: the ``__post_init__`` bounds cannot see NaN, and no setting is negative."""
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in values:
            continue
        value = values[f.name]
        items = enumerate(value) if isinstance(value, tuple | list) else [(None, value)]
        for i, item in items:
            problem = _number_problem(item, f.metadata.get(SENTINELS, ()))
            if problem:
                key = f"{path}.{f.name}" if path else f.name
                raise ToolkitError(f"{_where(origin, key if i is None else f'{key}[{i}]')}: {problem}")


def record(obj: Any) -> Any:
    """A JSON-ready dict of a (nested) dataclass, tuples as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: record(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.name.startswith("_")}
    if isinstance(obj, tuple | list):
        return [record(v) for v in obj]
    return obj
