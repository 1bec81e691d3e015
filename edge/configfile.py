"""Reading a configuration file strictly: one loader for the daemon's TOML and training's.

A section is a dataclass; a table becomes one only if every key is one of its fields and every
value has the field's type (an int where a float is wanted is taken as that float). A typo or
a wrong type is an error naming the file, the table and the key, never a silently ignored or
mistyped option.
"""

from __future__ import annotations

import tomllib
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_args, get_origin, get_type_hints

from .errors import FieldScopeError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["PATH", "ConfigError", "build", "check_table", "read_toml"]
# Marks an option whose value is a file or folder (``field(default="", metadata=PATH)``): the
# daemon makes it absolute against the config file's folder, or the working directory for a
# command-line value.
PATH = {"path": True}
T = TypeVar("T", bound="DataclassInstance")


class ConfigError(FieldScopeError):
    """A mistake in a configuration file or option, said with the file and key."""


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict, or a ConfigError naming the file."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {p}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc


def check_table(cls: type[DataclassInstance], raw: Any, where: str) -> None:
    """``raw`` must be a table whose keys are fields of the dataclass ``cls``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown option(s) {', '.join(unknown)}",
            f"known options: {', '.join(sorted(known))}",
        )


_MISMATCH = object()


def _coerce(hint: Any, value: Any) -> Any:
    """``value`` as the type ``hint`` names, or _MISMATCH."""
    if hint is Any:
        return value
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in get_args(hint):
            got = _coerce(arm, value)
            if got is not _MISMATCH:
                return got
        return _MISMATCH
    if origin is list or hint is list:
        if not isinstance(value, list):
            return _MISMATCH
        (item,) = get_args(hint) or (Any,)
        items = [_coerce(item, v) for v in value]
        return _MISMATCH if any(v is _MISMATCH for v in items) else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            return _MISMATCH
        _, item = get_args(hint) or (str, Any)
        out = {k: _coerce(item, v) for k, v in value.items()}
        return _MISMATCH if any(v is _MISMATCH for v in out.values()) else out
    if hint is type(None):
        return value if value is None else _MISMATCH
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else _MISMATCH
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _MISMATCH
    return value  # a hint this loader does not check (none in the kit's sections)


def _name(hint: Any) -> str:
    if get_origin(hint) is not None:  # list[str], int | list[int]
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", None) or str(hint)


def build(cls: type[T], raw: Any, where: str) -> T:
    """The dataclass ``cls`` from the table ``raw`` (``where``: the file and table, for the
    messages), every key known and every value of its field's type."""
    check_table(cls, raw, where)
    hints = get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        got = _coerce(hints[key], value)
        if got is _MISMATCH:
            raise ConfigError(f"{where}.{key}: expected {_name(hints[key])}, got {value!r}")
        values[key] = got
    try:
        return cls(**values)
    except TypeError as exc:  # a required option is missing
        missing = [f.name for f in fields(cls) if f.name not in values and f.init
                   and f.default is MISSING and f.default_factory is MISSING]
        raise ConfigError(f"{where}: missing {', '.join(missing) or exc}") from exc
