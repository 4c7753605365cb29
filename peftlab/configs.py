"""Dataclass configs built from plain dicts (YAML, JSON, CLI overrides), strictly.

`from_dict(Cls, d, source)` refuses unknown keys with a message that names the source and lists
the valid keys, and checks each value against the field's annotated type, so a typo in a YAML
file is an error instead of a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Dict, Type, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def check_keys(cls: type, d: Dict[str, Any], source: str) -> None:
    """Raise `ConfigError` if `d` has keys that `cls` does not define."""
    valid = field_names(cls)
    unknown = [k for k in d if k not in valid]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, valid, n=1)
            hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(f"{source}: unknown key(s) {', '.join(hints)} for {cls.__name__}; "
                          f"valid keys: {', '.join(valid)}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently coerce int->float) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        for a in args:
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: value {value!r} does not match {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    return value


def from_dict(cls: Type[T], d: Dict[str, Any], source: str = "config") -> T:
    """Build dataclass `cls` from `d`, refusing unknown keys and ill-typed values."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping for {cls.__name__}, got {type(d).__name__}")
    check_keys(cls, d, source)
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{source}: field '{k}'") for k, v in d.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None
