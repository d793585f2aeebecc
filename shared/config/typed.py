"""Build frozen dataclasses from untyped JSON, collecting every problem instead of stopping at the first.

Config files are parsed at the edge: this module turns a JSON object into a typed dataclass, checking each
value against the field's annotation (bool, int, float, str, Literal, Optional, list[str], dict) and the
field's ``check`` metadata. Problems carry the JSON path so the user can find them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin

from shared.errors import Problem

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Check = Callable[[Any], "str | None"]
D = TypeVar("D", bound="DataclassInstance")


def field(
    default: Any = dataclasses.MISSING, *, check: Check | None = None, doc: str = "", aliases: tuple[str, ...] = ()
) -> Any:
    """A dataclass field with an optional value check (returns an error message or None) and a doc line."""
    meta = {"check": check, "doc": doc, "aliases": aliases}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is Union or origin is types.UnionType:
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin is list:
        return "a list of " + _type_name(get_args(tp)[0]) + "s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def coerce(value: Any, tp: Any) -> tuple[Any, str | None]:
    """Convert a JSON value to ``tp``; returns (value, None) or (None, message)."""
    origin = get_origin(tp)
    if tp is Any:
        return value, None
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None, None
        for a in args:
            if a is type(None):
                continue
            v, err = coerce(value, a)
            if err is None:
                return v, None
        return None, f"expected {_type_name(tp)}, got {value!r}"
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value, None
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        return None, f"{value!r} is not valid; expected {_type_name(tp)}{extra}"
    if origin is list:
        if isinstance(value, str) and get_args(tp)[0] is str:
            value = [value]
        if not isinstance(value, list):
            return None, f"expected {_type_name(tp)}, got {value!r}"
        out = []
        for item in value:
            v, err = coerce(item, get_args(tp)[0])
            if err:
                return None, f"list item: {err}"
            out.append(v)
        return out, None
    if tp is bool:
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes"), None
        return None, f"expected true or false, got {value!r}"
    if tp is int:
        if isinstance(value, bool):
            return None, f"expected an integer, got {value!r}"
        if isinstance(value, int):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
        if isinstance(value, str):
            try:
                return int(value), None
            except ValueError:
                pass
        return None, f"expected an integer, got {value!r}"
    if tp is float:
        if isinstance(value, bool):
            return None, f"expected a number, got {value!r}"
        if isinstance(value, (int, float)):
            return float(value), None
        if isinstance(value, str):
            try:
                return float(value), None
            except ValueError:
                pass
        return None, f"expected a number, got {value!r}"
    if tp is str:
        if isinstance(value, str):
            return value, None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value), None
        return None, f"expected a string, got {value!r}"
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value), None
        return None, f"expected an object, got {value!r}"
    raise TypeError(f"unsupported annotation {tp!r}")


def build(
    cls: type[D], raw: dict[str, Any], where: str, problems: list[Problem], ignored: list[str] | None = None
) -> D:
    """Construct ``cls`` from ``raw``; bad values are appended to ``problems`` (the field keeps its default so
    that later cross-field checks can still run), unknown keys to ``ignored``. Returns the instance."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases = {a: f.name for f in fields.values() for a in f.metadata.get("aliases", ())}
    values: dict[str, Any] = {}
    bad: set[str] = set()
    for key, value in raw.items():
        name = aliases.get(key, key)
        if name not in fields or not fields[name].init:
            if ignored is not None:
                ignored.append(f"{where}.{key} [unknown key]")
            continue
        v, err = coerce(value, hints[name])
        check = fields[name].metadata.get("check")
        if err is None and check is not None and v is not None:
            err = check(v)
        if err is not None:
            problems.append(Problem(f"{where}.{key}", err))
            bad.add(name)
            continue
        values[name] = v
    for n in bad:
        if _required(fields[n]):
            values[n] = None
    missing = [
        n
        for n, f in fields.items()
        if f.init
        and n not in values
        and n not in bad
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    for n in missing:
        problems.append(Problem(f"{where}.{n}", "is required"))
        values[n] = None
    return cls(**values)


def names(cls: type) -> set[str]:
    """The keys ``build`` accepts for ``cls``: its init fields and their aliases."""
    out = set()
    for f in dataclasses.fields(cls):
        if f.init:
            out.add(f.name)
            out.update(f.metadata.get("aliases", ()))
    return out


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def positive(v: Any) -> str | None:
    return None if v > 0 else f"must be > 0, got {v}"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else f"must be >= 0, got {v}"


def probability(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else f"must be between 0 and 1, got {v}"
