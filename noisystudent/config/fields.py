"""Building a typed dataclass tree from plain dicts (YAML, ``--set``), checking every value.

Generic: nothing here knows the config's keys. Errors name the dotted key and what it must be.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from ..errors import ConfigError


def _one_of(choices: tuple) -> str:
    shown = [repr(c) if c == "" else str(c) for c in choices]
    return ", ".join(shown[:-1]) + f" or {shown[-1]}" if len(shown) > 1 else shown[0]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) or value not in choices or type(value) not in {type(c) for c in choices}:
            raise ConfigError(f"config key '{key}' must be {_one_of(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0]
            if len(errors) == 1
            else f"config key '{key}' must be one of {' | '.join(_type_name(a) for a in args)}, got {value!r}"
        )
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"config key '{key}': unsupported annotation {tp!r}")  # a schema bug, not a user error


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def build(cls: type, values: dict, prefix: str = "") -> Any:
    """An instance of dataclass ``cls`` with ``values`` merged onto its defaults, every value checked."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' "
            f"(valid keys under '{prefix or '<top>'}': {', '.join(sorted(names))})"
        )
    base = cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            current = getattr(base, f.name)
            if dataclasses.is_dataclass(current) and isinstance(values[f.name], dict):
                # merge onto the field's own default (e.g. the student's noisier AugmentConfig)
                merged = deep_merge(to_dict(current), values[f.name])
                kwargs[f.name] = _coerce(merged, type(current), prefix + f.name)
            else:
                kwargs[f.name] = _coerce(values[f.name], hints[f.name], prefix + f.name)
    return dataclasses.replace(base, **kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def set_dotted(raw: dict, keys: list[str], value: Any) -> dict:
    """``raw`` with ``value`` merged in at the nested path ``keys`` (siblings kept)."""
    nested: Any = value
    for k in reversed(keys):
        nested = {k: nested}
    return deep_merge(raw, nested)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
